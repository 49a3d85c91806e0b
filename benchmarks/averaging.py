"""Averaging round cost on gloo over loopback: avgfn against torch and the floor.

Usage:
    python benchmarks/averaging.py [--params N] [--world W] [--leaves L] [--rounds R] [--json]

Spawns W gloo processes on 127.0.0.1. In one run, side by side (round-robin,
so every variant sees the same machine noise, in an order that turns every
round, so that none always runs right after the same other one), each
process times R averaging rounds of every variant below after a warm-up, and
rank 0 prints the medians. Each avgfn variant has its own process group, Reduce
and params, as a training job has one averager over its group:

  torch         torch's model_averaging.utils.average_parameters
  floor         one bare dist.all_reduce of a buffer of the same bytes
  floor-bf16    one bare dist.all_reduce of the same count of bf16 values
  avgfn         the default pure update at an averaging step
  avgfn-no-agree  the default update with Round(agree=False): no per-round check
  agree         the per-round agreement check alone (one all-reduce of 4 int64)
  avgfn-donate  update(..., donate=True): params written in place
  avgfn-bucket  donate=True with bucket_bytes (async all-reduce per bucket)
  avgfn-bf16    comm_dtype=torch.bfloat16 (pure), error against fp32 reported
  avgfn-bf16-donate  bf16 on the wire, written in place
  avgfn-bf16-bucket  bf16 on the wire, donated, staged in buckets
  floor-2g      the floor's buffer in two halves, one bare all_reduce of each on
                two process groups side by side
  avgfn-donate-2g       avgfn-donate over a Reduce with a spare group
                        (all_reduce_mean(group, spare_groups=[group2])): its
                        pieces run on both groups side by side
  avgfn-bf16-2g         avgfn-bf16 over that Reduce
  avgfn-bf16-donate-2g  avgfn-bf16-donate over that Reduce
  avgfn-bf16-bucket-2g  avgfn-bf16-bucket over that Reduce
  off-step      update at a step where nothing is due (microseconds)

Host CPU is the CPU time of the calling thread during a round (median): the
work the round does on the host (packing, checks, unpacking), without the
time gloo's own threads spend on the wire or the wait for the peer, which on
this kind of machine move by more than the differences between variants.
Faults are the thread's minor page faults during a round (median): each is a
first touch of memory the process had not used yet (about 4 KiB), which glibc
hands out for a large allocation unless it can reuse memory freed earlier.

Host buffers that the round engine keeps for reuse between rounds
(`avgfn.release_buffers()`) are dropped before each round of the memory
world, so that the peak shows what a round needs; the last line prints how
much the timing world kept at its end, over all the variants.

Peak extra memory is the rise of the process's peak RSS during one round
(Linux: /proc/self/clear_refs resets the peak) above its RSS before the round.
It is measured, as the largest over 3 rounds, in a second world started with MALLOC_MMAP_THRESHOLD_=1 MiB, so
that glibc returns every large buffer to the system when it is freed and the
RSS shows what a round really holds (in the timing world glibc may keep freed
buffers of up to 32 MiB and reuse them, which would hide them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.model_averaging import utils as torch_utils

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import avgfn  # noqa: E402

MB = 1024 * 1024


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _shapes(total: int, leaves: int) -> list[int]:
    base = total // leaves
    sizes = [base] * leaves
    sizes[-1] += total - base * leaves
    return sizes


def _make_params(sizes: list[int], rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(n, generator=g) for n in sizes]


def _faults() -> int:
    """Minor page faults of the calling thread so far (first touches of fresh memory)."""
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def _measure(fn, timings: dict, memory: dict, name: str, host: dict) -> None:
    dist.barrier()
    _reset_peak()
    before = _rss_kb("VmRSS")
    f0 = _faults()
    c0 = time.thread_time()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    spent = time.thread_time() - c0
    faults = _faults() - f0
    peak = _rss_kb("VmHWM")
    timings.setdefault(name, []).append(elapsed * 1e3)
    host.setdefault(name, []).append((spent * 1e3, faults))
    memory.setdefault(name, []).append(max(0, peak - before) / 1024)


def _worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    sizes = _shapes(args.params, args.leaves)
    torch_params = [torch.nn.Parameter(t) for t in _make_params(sizes, rank)]
    floor_buf = torch.randn(args.params)
    floor_bf16 = torch.randn(args.params).to(torch.bfloat16)
    bucket_bytes = args.bucket_mb * MB

    def tree() -> dict:
        return {f"p{i}": t for i, t in enumerate(_make_params(sizes, rank))}

    # Each avgfn variant has its own process group, Reduce and params, as a
    # training job has one averager over its group: the rounds over a process
    # group form one history, from which a group of two predicts the next
    # round's size (docs/round.md); the variants' rounds interleaved on one
    # group, in an order that turns every round, would never repeat. And a tree
    # shared by two variants would be warm in the cache for the second.
    def averager(lanes=1, **options):
        group = dist.new_group(list(range(world)))
        spare = [dist.new_group(list(range(world))) for _ in range(lanes - 1)]
        reduce = avgfn.collectives.all_reduce_mean(group, spare_groups=spare)
        return avgfn.periodic(2, reduce=reduce, round=avgfn.Round(**options))

    avg = averager()
    avg_donate = averager(donate=True)
    avg_bucket = averager(donate=True, bucket_bytes=bucket_bytes)
    avg_bf16 = averager(comm_dtype=torch.bfloat16)
    avg_bf16_donate = averager(comm_dtype=torch.bfloat16, donate=True)
    avg_bf16_bucket = averager(comm_dtype=torch.bfloat16, donate=True, bucket_bytes=bucket_bytes)
    avg_no_agree = averager(agree=False)
    avg_donate_2 = averager(lanes=2, donate=True)
    avg_bf16_2 = averager(lanes=2, comm_dtype=torch.bfloat16)
    avg_bf16_donate_2 = averager(lanes=2, comm_dtype=torch.bfloat16, donate=True)
    avg_bf16_bucket_2 = averager(lanes=2, comm_dtype=torch.bfloat16, donate=True, bucket_bytes=bucket_bytes)
    floor_groups = [dist.new_group(list(range(world))) for _ in range(2)]
    agree_reduce = avgfn.collectives.all_reduce_mean(dist.new_group(list(range(world))))
    pure, pure_no_agree, pure_bf16, pure_bf16_2 = tree(), tree(), tree(), tree()
    state = avg.init(pure)

    out = {}

    def donating(averager_):
        """A donated variant's round: it gives up its params and keeps the ones returned."""
        held = [tree()]

        def run():
            held[0] = averager_.update(held[0], state, 0)[0]

        return run

    def run_torch():
        torch_utils.average_parameters(iter(torch_params), None)

    def run_floor():
        dist.all_reduce(floor_buf)

    def run_floor_bf16():
        dist.all_reduce(floor_bf16)

    def run_floor_2():
        works = [
            dist.all_reduce(half, group=group, async_op=True) for half, group in zip(floor_buf.chunk(2), floor_groups)
        ]
        for work in works:
            work.wait()

    def run_avgfn():
        out["pure"] = avg.update(pure, state, 0)[0]

    def run_no_agree():
        out["no_agree"] = avg_no_agree.update(pure_no_agree, state, 0)[0]

    def run_agree():
        agree_reduce.agree(b"\x01" * 8, lambda: [])

    def run_bf16():
        out["bf16"] = avg_bf16.update(pure_bf16, state, 0)[0]

    def run_bf16_2():
        out["bf16_2"] = avg_bf16_2.update(pure_bf16_2, state, 0)[0]

    variants = {
        "torch": run_torch,
        "floor": run_floor,
        "floor-bf16": run_floor_bf16,
        "avgfn": run_avgfn,
        "avgfn-no-agree": run_no_agree,
        "agree": run_agree,
        "avgfn-donate": donating(avg_donate),
        "avgfn-bucket": donating(avg_bucket),
        "avgfn-bf16": run_bf16,
        "avgfn-bf16-donate": donating(avg_bf16_donate),
        "avgfn-bf16-bucket": donating(avg_bf16_bucket),
        "floor-2g": run_floor_2,
        "avgfn-donate-2g": donating(avg_donate_2),
        "avgfn-bf16-2g": run_bf16_2,
        "avgfn-bf16-donate-2g": donating(avg_bf16_donate_2),
        "avgfn-bf16-bucket-2g": donating(avg_bf16_bucket_2),
    }
    timings: dict = {}
    host: dict = {}
    memory: dict = {}
    memory_world = os.environ.get("AVGFN_BENCH_MEMORY") == "1"
    rounds = 3 if memory_world else args.rounds
    names = list(variants)
    for r in range(args.warmup + rounds):
        for j in range(len(names)):  # the order turns every round: no variant always follows the same one
            name = names[(j + r) % len(names)]
            timed = r >= args.warmup
            if memory_world:  # what a round needs, not what an earlier round left for it to reuse
                avgfn.release_buffers()
            _measure(variants[name], timings if timed else {}, memory if timed else {}, name, host if timed else {})
            out.clear()  # as a training loop drops the old params after a round

    if memory_world:
        if rank == 0:
            # the largest of the rounds: RSS accounting sometimes misses a peak
            peaks = {name: max(values) for name, values in memory.items()}
            if os.environ.get("AVGFN_BENCH_DEBUG"):
                print(memory, flush=True)
            with open(os.path.join(folder, "memory.json"), "w") as f:
                json.dump(peaks, f)
        dist.barrier()
        dist.destroy_process_group()
        return

    # bf16 error: average the same inputs in fp32 and bf16 once more
    exact = avg.update(pure, state, 0)[0]
    approx = avg_bf16.update(pure, state, 0)[0]
    err = max((exact[k] - approx[k]).abs().max().item() for k in exact)
    scale = max(exact[k].abs().max().item() for k in exact)

    # off-step: many calls, microseconds each
    off = []
    for _ in range(2000):
        t0 = time.perf_counter()
        avg.update(pure, state, 1)
        off.append((time.perf_counter() - t0) * 1e6)

    if rank == 0:
        rows = []
        torch_ms = statistics.median(timings["torch"])
        for name in variants:
            med = statistics.median(timings[name])
            rows.append(
                {
                    "name": name,
                    "median_ms": round(med, 3),
                    "ratio_to_torch": round(med / torch_ms, 3),
                    "host_cpu_ms": round(statistics.median(c for c, _ in host[name]), 3),
                    "page_faults": int(statistics.median(f for _, f in host[name])),
                    "peak_extra_mb": None,
                    "params": args.params,
                    "world": world,
                }
            )
        off_us = statistics.median(off)
        rows.append(
            {
                "name": "off-step",
                "median_ms": round(off_us / 1e3, 6),
                "ratio_to_torch": round(off_us / 1e3 / torch_ms, 6),
                "host_cpu_ms": None,
                "page_faults": None,
                "peak_extra_mb": 0.0,
                "params": args.params,
                "world": world,
            }
        )
        kept_mb = avgfn.release_buffers() / MB  # what the engine kept for reuse between rounds
        extra = {"bf16_max_abs_error": err, "max_abs_param": scale, "off_step_us": off_us, "kept_mb": kept_mb,
                 "bucket_mb": args.bucket_mb, "leaves": args.leaves, "rounds": args.rounds}
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"rows": rows, "extra": extra}, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=25_000_000, help="fp32 parameters per replica")
    parser.add_argument("--world", type=int, default=2, help="gloo processes")
    parser.add_argument("--leaves", type=int, default=160, help="tensors the params are split into")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--bucket-mb", type=int, default=16, help="bucket size of avgfn-bucket")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="avgfn-bench-") as folder:
        mp.start_processes(_worker, args=(args.world, folder, args), nprocs=args.world, start_method="spawn")
        with open(os.path.join(folder, "result.json")) as f:
            result = json.load(f)
    with tempfile.TemporaryDirectory(prefix="avgfn-bench-") as folder:
        saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "AVGFN_BENCH_MEMORY")}
        os.environ.update(MALLOC_MMAP_THRESHOLD_=str(MB), AVGFN_BENCH_MEMORY="1")
        try:
            mp.start_processes(_worker, args=(args.world, folder, args), nprocs=args.world, start_method="spawn")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        with open(os.path.join(folder, "memory.json")) as f:
            peaks = json.load(f)
    rows, extra = result["rows"], result["extra"]
    for row in rows:
        row["peak_extra_mb"] = round(peaks.get(row["name"], 0.0), 1)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"params={args.params:,} in {args.leaves} tensors, world={args.world}, "
          f"median of {args.rounds} rounds, bucket={args.bucket_mb} MiB")
    print(f"{'name':<20}{'median ms':>12}{'x torch':>10}{'host cpu ms':>13}{'faults':>8}{'peak extra MiB':>16}")  # noqa: E501
    for row in rows:
        ms = f"{row['median_ms']:.3f}" if row["name"] != "off-step" else f"{extra['off_step_us']:.1f} us"
        cpu = "" if row["host_cpu_ms"] is None else f"{row['host_cpu_ms']:.3f}"
        faults = "" if row["page_faults"] is None else str(row["page_faults"])
        print(f"{row['name']:<20}{ms:>12}{row['ratio_to_torch']:>10.3f}{cpu:>13}{faults:>8}{row['peak_extra_mb']:>16.1f}")
    print(f"bf16 on the wire: max abs error {extra['bf16_max_abs_error']:.3g} "
          f"(largest |param| {extra['max_abs_param']:.3g})")
    print(f"host buffers the round engine kept for reuse at the end (all variants): {extra['kept_mb']:.1f} MiB")


if __name__ == "__main__":
    main()
