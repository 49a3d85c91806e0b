"""Spawn real gloo process groups on loopback for the tests.

``run_world(fn, world_size, *args)`` starts ``world_size`` fresh processes
(``spawn``), initialises a gloo group through a file store in a private
temporary folder, calls ``fn(rank, world_size, *args)`` in each, and returns
the list of their return values (anything ``torch.save`` can hold). An
exception in any rank fails the call with that rank's traceback; a world that
does not finish within ``timeout`` seconds is killed.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable[..., Any], world_size: int, folder: str, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on a fresh gloo world; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="avgfn-world-") as folder:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, folder, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"a {world_size}-process world did not finish in {timeout}s")
        return [
            torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
