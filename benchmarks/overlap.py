"""How much of Streaming DiLoCo's all-reduce its delay hides, on W = 2 gloo processes.

Usage:
    python benchmarks/overlap.py [--numel 1048576] [--compute-ms 30] [--period 8]
                                 [--fragments 2] [--windows 10] [--reduce avgfn|functional]
                                 [--breakdown] [--json]

Two processes on one machine form a gloo group over loopback. Each holds
params of two equal leaves (``--numel`` float32 elements in all, one leaf per
fragment), and runs Streaming DiLoCo (``period``, ``num_fragments``; the
default outer step, Nesterov SGD) with ``avgfn.collectives.all_reduce_mean(
in_flight=True)``, whose result is a tensor that waits when first read: the
fragment's mean is started at the start step and read ``delay`` steps later, at
the apply step (``--reduce functional``: torch's functional all-reduce instead,
without avgfn's per-round agreement). Each step's compute is

* **modelled**: the process sleeps ``--compute-ms`` (an accelerator computing
  while the host is idle, which is what overlap is for), or
* **real**: CPU matmuls on one thread for about as long,

and the same schedules run side by side in one run: compute only (no
averaging), ``delay=0``, and each ``delay`` from 1 to ``period / fragments - 1``.
A fragment is synced every ``h = period / fragments`` steps, so the step time
is measured over windows of ``h`` steps (each window holds one fragment's
round): ``median_step_ms`` is the median over ``--windows`` windows (after one
period of warm-up) of the window's time divided by ``h``. The two processes
stay in step through the collectives themselves; the reported figure is rank
0's.

``--breakdown`` times ``update`` itself instead (modelled compute, avgfn's Reduce),
per kind of step (the sync step of ``delay=0``; the start and apply steps of
``delay = h / 2``), with the per-round agreement on and off, and one blocking
all-reduce of a fragment: what the overlap can hide and what it cannot.

``--json`` prints one object per line with ``name`` (``compute``, ``delay0``,
``delay1``...), ``compute`` (``modelled`` or ``real``) and ``median_step_ms``;
then ``{"hidden_fraction": x, "compute": "modelled"}`` and the same for real
compute, where ``x = 1 - (t_best_delay - t_compute) / (t_delay0 - t_compute)``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import avgfn  # noqa: E402

WORLD = 2


class FunctionalMean:
    """The mean over the default group, in flight until first read (torch's functional all-reduce)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(tensor / self.size, "sum", dist.group.WORLD)


def _calibrate(ms: float) -> int:
    """How many 128x128 matmuls take about ``ms`` milliseconds on one thread."""
    a = torch.randn(128, 128)
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < 0.2:
        a = torch.tanh(a @ a)
        n += 1
    per = (time.perf_counter() - start) / n
    return max(1, round(ms / 1000 / per))


def _compute(kind: str, ms: float, matmuls: int, x: torch.Tensor) -> torch.Tensor:
    if kind == "modelled":
        time.sleep(ms / 1000)
        return x
    for _ in range(matmuls):
        x = torch.tanh(x @ x)
    return x


def _schedule(rank: int, args: Any, kind: str, delay: Optional[int], matmuls: int) -> float:
    h = args.period // args.fragments
    half = args.numel // args.fragments
    g = torch.Generator().manual_seed(0)
    params = {f"f{k}": torch.randn(half, generator=g) for k in range(args.fragments)}
    avg = None
    if delay is not None:
        reduce = FunctionalMean(WORLD) if args.reduce == "functional" else avgfn.collectives.all_reduce_mean(
            in_flight=True
        )
        avg = avgfn.streaming_diloco(args.period, reduce=reduce, num_fragments=args.fragments, delay=delay)
    state = None if avg is None else avg.init(params)
    x = torch.randn(128, 128) / 128
    warm = args.period
    steps = warm + args.windows * h
    marks = []
    dist.barrier()
    for step in range(steps):
        if step >= warm and (step - warm) % h == 0:
            marks.append(time.perf_counter())
        x = _compute(kind, args.compute_ms, matmuls, x)
        local = {k: v + 1e-6 * (rank + 1) for k, v in params.items()} if step % h == h - 1 else params
        if avg is not None:
            params, state = avg.update(local, state, step)
    marks.append(time.perf_counter())
    if state is not None and state.pending is not None:
        _ = float(state.pending.sum())  # settle what is still in flight
    windows = [(b - a) / h * 1000 for a, b in zip(marks, marks[1:])]
    return statistics.median(windows)


def _breakdown(rank: int, args: Any) -> list[dict[str, Any]]:
    """Time ``update`` itself per kind of step (``--breakdown``), with the agreement on and off."""
    h = args.period // args.fragments
    half = args.numel // args.fragments
    rows = []
    for agree in (True, False):
        for delay in (0, h // 2):
            torch.manual_seed(0)  # the replicas start alike (the first round checks it)
            params = {f"f{k}": torch.randn(half) for k in range(args.fragments)}
            reduce = avgfn.collectives.all_reduce_mean(in_flight=True)
            avg = avgfn.streaming_diloco(
                args.period, reduce=reduce, num_fragments=args.fragments, delay=delay,
                round=avgfn.Round(agree=agree),
            )  # fmt: skip
            state = avg.init(params)
            times: dict[str, list[float]] = {}
            dist.barrier()
            for step in range(args.period + args.windows * h):
                time.sleep(args.compute_ms / 1000)
                local = {k: v + 1e-6 * (rank + 1) for k, v in params.items()} if step % h == h - 1 else params
                apply_k, start_k = (step + 1) % h == 0, delay and (step + 1 + delay) % h == 0
                kind = "sync step" if apply_k and not delay else "apply step" if apply_k else (
                    "start step" if start_k else "off-step")  # fmt: skip
                started = time.perf_counter()
                params, state = avg.update(local, state, step)
                if step >= args.period:
                    times.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
            for kind, values in times.items():
                rows.append({"name": f"delay{delay} {kind}", "agree": agree,
                             "median_ms": round(statistics.median(values), 3)})  # fmt: skip
    buf = torch.randn(half)
    waits = []
    for _ in range(args.windows):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buf)
        waits.append((time.perf_counter() - started) * 1000)
    rows.append({"name": "blocking all_reduce of one fragment", "agree": None,
                 "median_ms": round(statistics.median(waits), 3)})  # fmt: skip
    return rows


def _worker(rank: int, folder: str, args: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    try:
        if args.breakdown:
            rows = _breakdown(rank, args)
            if rank == 0:
                torch.save(rows, os.path.join(folder, "rows.pt"))
            dist.barrier()
            return
        matmuls = _calibrate(args.compute_ms)
        h = args.period // args.fragments
        rows = []
        for kind in ("modelled", "real"):
            for name, delay in [("compute", None), ("delay0", 0)] + [(f"delay{d}", d) for d in range(1, h)]:
                rows.append({"name": name, "compute": kind, "median_step_ms": round(
                    _schedule(rank, args, kind, delay, matmuls), 2)})  # fmt: skip
        if rank == 0:
            torch.save(rows, os.path.join(folder, "rows.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def hidden_fraction(rows: list[dict[str, Any]], kind: str) -> float:
    """``1 - (t_best_delay - t_compute) / (t_delay0 - t_compute)`` for one kind of compute."""
    times = {r["name"]: r["median_step_ms"] for r in rows if r["compute"] == kind}
    best = min(t for name, t in times.items() if name.startswith("delay") and name != "delay0")
    return 1 - (best - times["compute"]) / (times["delay0"] - times["compute"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=1024 * 1024, help="float32 elements in all")
    parser.add_argument("--compute-ms", type=float, default=30.0, help="modelled compute per step")
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--fragments", type=int, default=2)
    parser.add_argument("--windows", type=int, default=10, help="windows of period/fragments steps timed")
    parser.add_argument("--reduce", choices=("avgfn", "functional"), default="avgfn",
                        help="all_reduce_mean(in_flight=True), or torch's functional all-reduce")
    parser.add_argument("--breakdown", action="store_true",
                        help="time update itself per kind of step (modelled compute), agreement on and off")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.period % args.fragments or args.period // args.fragments < 2:
        parser.error("--fragments must divide --period, with period / fragments >= 2")
    with tempfile.TemporaryDirectory(prefix="avgfn-overlap-") as folder:
        mp.start_processes(_worker, args=(folder, args), nprocs=WORLD, start_method="spawn")
        rows = torch.load(os.path.join(folder, "rows.pt"), weights_only=True)
    if args.breakdown:
        for row in rows:
            print(json.dumps(row) if args.json else f"{row['name']:<40} agree={row['agree']!s:<5} "
                  f"{row['median_ms']:8.3f} ms")  # fmt: skip
        return
    fractions = {kind: hidden_fraction(rows, kind) for kind in ("modelled", "real")}
    if args.json:
        for row in rows:
            print(json.dumps(row))
        for kind, x in fractions.items():
            print(json.dumps({"hidden_fraction": round(x, 3), "compute": kind}))
        return
    print(f"W={WORLD} gloo processes, {args.numel:,} float32 params in {args.fragments} fragments, "
          f"period {args.period}, compute {args.compute_ms:g} ms per step, reduce {args.reduce}")  # fmt: skip
    for kind in ("modelled", "real"):
        print(f"\n{kind} compute:")
        print(f"  {'schedule':<10} {'median step (ms)':>16}")
        for row in rows:
            if row["compute"] == kind:
                print(f"  {row['name']:<10} {row['median_step_ms']:>16.2f}")
        print(f"  hidden_fraction = {fractions[kind]:.3f}")


if __name__ == "__main__":
    main()
