"""A harness for worlds in which ranks die or stall on purpose.

``tests/_dist.run_world`` treats any rank that does not return as a failure of
the whole world. The fault tests need the opposite: a rank that is SIGKILLed
(or that sleeps through a round) is the point of the test, and the survivors'
results are what is checked. So here:

* each rank runs ``fn(rank, world_size, *args)`` in a fresh ``spawn`` process
  on a gloo group made through a file store in a private temporary folder
  (loopback only);
* a rank that returns writes its result to a file and leaves with
  ``os._exit(0)``: a group with a dead member cannot be destroyed cleanly, and
  nothing after the result matters;
* a rank that raises writes its traceback and leaves with status 1;
* once every rank not listed in ``stragglers`` has exited, the stragglers
  (ranks meant to hang) are killed;
* a hard ``deadline`` kills every process still alive and fails the test:
  a fault test never hangs CI.
"""

from __future__ import annotations

import datetime
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Outcome:
    """What a faulty world left behind.

    Attributes:
      results: ``rank -> value`` for each rank that returned.
      errors: ``rank -> traceback text`` for each rank that raised.
      exitcodes: ``rank -> exit code`` (``-9`` for a SIGKILLed process).
    """

    def __init__(self, results: dict[int, Any], errors: dict[int, str], exitcodes: dict[int, int]) -> None:
        self.results = results
        self.errors = errors
        self.exitcodes = exitcodes

    def __repr__(self) -> str:
        return f"Outcome(returned={sorted(self.results)}, errors={self.errors}, exitcodes={self.exitcodes})"


def _worker(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        result = fn(rank, world_size, *args)
        path = os.path.join(folder, f"result{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(folder, f"error{rank}.txt"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)


def run_faulty_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    stragglers: Iterable[int] = (),
    deadline: float = 90.0,
) -> Outcome:
    """Run ``fn(rank, world_size, *args)`` on a gloo world whose ranks may die.

    Args:
      fn: a module-level function (it is pickled into ``spawn`` processes).
      world_size: the number of ranks.
      *args: more arguments for ``fn`` (picklable).
      stragglers: ranks expected to hang; they are killed once every other
        rank has exited.
      deadline: seconds after which every process still alive is killed and
        ``TimeoutError`` is raised.

    Returns:
      An :class:`Outcome`.
    """
    stragglers = set(stragglers)
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="avgfn-faults-") as folder:
        processes = [
            context.Process(target=_worker, args=(rank, world_size, folder, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        limit = time.monotonic() + deadline
        try:
            while True:
                waiting = [
                    r for r, p in enumerate(processes) if p.is_alive() and r not in stragglers
                ]
                if not waiting:
                    break
                if time.monotonic() > limit:
                    raise TimeoutError(
                        f"a {world_size}-process fault world did not finish in {deadline}s; "
                        f"ranks {waiting} were still running"
                    )
                processes[waiting[0]].join(timeout=0.1)
        finally:
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
            for process in processes:
                process.join(timeout=10)
        results, errors = {}, {}
        for rank in range(world_size):
            path = os.path.join(folder, f"result{rank}.pt")
            if os.path.exists(path):
                results[rank] = torch.load(path, weights_only=False)
            path = os.path.join(folder, f"error{rank}.txt")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    errors[rank] = f.read()
        exitcodes = {rank: p.exitcode for rank, p in enumerate(processes)}
        return Outcome(results, errors, exitcodes)
