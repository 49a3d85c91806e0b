"""What the default round's two checks cost, side by side with torch, on W = 2 gloo processes.

Usage:
    python benchmarks/round_parts.py [--params 1000000] [--leaves 160] [--rounds 60]

Each process times, back to back in every round (no barrier between them, as a
training loop runs), torch's ``average_parameters`` and ``avgfn.periodic``'s
update at an averaging step with: the default ``Round()``, ``Round(agree=False)``
(no per-round agreement), ``Round(nonfinite="ignore")`` (no check of the mean),
and both off; then the same four with ``donate=True`` (the params written in
place). Rank 0 prints each median (after 10 warm-up rounds) and its ratio to
torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.model_averaging import utils as torch_utils

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import avgfn  # noqa: E402


def _worker(rank: int, folder: str, args: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    sizes = [args.params // args.leaves] * args.leaves
    torch.manual_seed(0)
    reduce = avgfn.collectives.all_reduce_mean()
    params = {f"p{i}": torch.randn(n) for i, n in enumerate(sizes)}
    torch_params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]

    def make(**options: Any) -> Any:
        return avgfn.periodic(2, reduce=reduce, round=avgfn.Round(**options))

    state = make().init(params)
    held: dict[str, Any] = {}

    def run(avg: Any) -> Any:
        def once() -> None:
            held["params"] = avg.update(params, state, 0)[0]  # kept until the next round, as in training

        return once

    box = {"d": {f"p{i}": torch.randn(n) for i, n in enumerate(sizes)}}

    def runh(avg: Any) -> Any:
        def once() -> None:
            box["d"] = avg.update(box["d"], state, 0)[0]

        return once

    variants = {
        "torch": lambda: torch_utils.average_parameters(iter(torch_params), None),
        "default": run(make()),
        "agree=False": run(make(agree=False)),
        "nonfinite=ignore": run(make(nonfinite="ignore")),
        "both off": run(make(agree=False, nonfinite="ignore")),
        "donate": runh(make(donate=True)),
        "donate agree=False": runh(make(donate=True, agree=False)),
        "donate nonfinite=ignore": runh(make(donate=True, nonfinite="ignore")),
        "donate both off": runh(make(donate=True, agree=False, nonfinite="ignore")),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(10 + args.rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    if rank == 0:
        medians = {name: statistics.median(values[10:]) for name, values in times.items()}
        print(f"params={args.params:,} in {args.leaves} tensors, world=2, median of {args.rounds} rounds")
        for name, ms in medians.items():
            print(f"  {name:<18} {ms:8.3f} ms  {ms / medians['torch']:5.2f}x torch")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--leaves", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="avgfn-parts-") as folder:
        mp.start_processes(_worker, args=(folder, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
