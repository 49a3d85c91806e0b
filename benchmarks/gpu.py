"""avgfn on one GPU: simulated replicas, one round against NCCL, bf16 packing against bandwidth.

Usage:
    python benchmarks/gpu.py [--replicas 8,32,128] [--steps 8] [--json]

Needs a CUDA device; on a machine without one it says so and exits with
status 0. It prints three tables (under 5 minutes on one recent GPU):

1. simulated replicas per second: W replicas (W = 8, 32, 128) of a ~10M
   parameter MLP trained under ``torch.func.vmap`` with local SGD
   (``avgfn.periodic(4)`` over ``avgfn.simulate.replica_mean()``), against
   a Python loop over W ``nn.Module``s doing the same steps (forward,
   backward, SGD, and the mean of the W copies every 4 steps);
2. one averaging round (``avgfn.average`` over a world of one NCCL
   process) against the bare ``dist.all_reduce`` of a flat buffer of the
   same bytes: what avgfn adds (packing, the agreement, the health check);
3. bf16 pack and unpack (``Round(comm_dtype=torch.bfloat16)`` with an
   identity Reduce) against the device's copy bandwidth (a large
   ``Tensor.copy_``): the bytes a round reads and writes, per second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch

HIDDEN, WIDE, BATCH, PERIOD, LR = 1024, 4096, 32, 4, 0.01


def _timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, after a warm-up, synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _model() -> torch.nn.Module:
    # 2 * 1024 * 4096 + 1024 * 1024 weights: about 9.4M params (and biases)
    return torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, WIDE), torch.nn.GELU(), torch.nn.Linear(WIDE, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
    ).cuda()


def simulated(replicas: int, steps: int) -> dict[str, float]:
    """Replica-steps per second: vmapped avgfn against a loop of modules."""
    import avgfn
    from torch.func import functional_call, grad, vmap

    model = _model()
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(replicas, BATCH, HIDDEN, device="cuda")
    y = torch.randn(replicas, BATCH, HIDDEN, device="cuda")
    avg = avgfn.periodic(PERIOD, reduce=avgfn.simulate.replica_mean())

    def loss(params, xb, yb):
        return torch.nn.functional.mse_loss(functional_call(model, params, (xb,)), yb)

    def step(params, state, xb, yb, k):
        g = grad(loss)(params, xb, yb)
        return avg.update({n: params[n] - LR * g[n] for n in names}, state, k)

    stepped = vmap(step, in_dims=(0, 0, 0, 0, None))
    params = {n: t.expand(replicas, *t.shape).clone() for n, t in base.items()}
    state = vmap(avg.init)(params)

    def run_vmap() -> None:
        nonlocal params, state
        for k in range(steps):
            params, state = stepped(params, state, x, y, k)

    modules = [_model() for _ in range(replicas)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in modules]

    def run_loop() -> None:
        for k in range(steps):
            for i, (m, opt) in enumerate(zip(modules, opts)):
                opt.zero_grad()
                torch.nn.functional.mse_loss(m(x[i]), y[i]).backward()
                opt.step()
            if (k + 1) % PERIOD == 0:
                with torch.no_grad():
                    for group in zip(*(m.parameters() for m in modules)):
                        mean = torch.stack(group).mean(0)
                        for p in group:
                            p.copy_(mean)

    t_vmap, t_loop = _timed(run_vmap, 3), _timed(run_loop, 3)
    return {"replicas": replicas, "vmap_replica_steps_s": replicas * steps / t_vmap,
            "loop_replica_steps_s": replicas * steps / t_loop}  # fmt: skip


def round_against_nccl(repeat: int) -> dict[str, float]:
    """One avgfn round over a world of one NCCL process, against the bare all-reduce."""
    import torch.distributed as dist

    import avgfn
    from avgfn import collectives

    params = {n: p.detach().clone() for n, p in _model().named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    mean = collectives.all_reduce_mean()
    t_round = _timed(lambda: avgfn.average(params, mean), repeat)
    t_nccl = _timed(lambda: dist.all_reduce(flat), repeat)
    donated = avgfn.Round(donate=True)
    t_donate = _timed(lambda: avgfn.average(params, mean, round=donated), repeat)
    return {"params": flat.numel(), "avgfn_round_ms": 1e3 * t_round, "avgfn_donate_ms": 1e3 * t_donate,
            "nccl_all_reduce_ms": 1e3 * t_nccl}  # fmt: skip


def bf16_packing(repeat: int) -> dict[str, float]:
    """bf16 pack + unpack of a round (identity Reduce) against the device's copy bandwidth."""
    import avgfn

    params = {n: p.detach().clone() for n, p in _model().named_parameters()}
    numel = sum(p.numel() for p in params.values())
    rnd = avgfn.Round(comm_dtype=torch.bfloat16, nonfinite="ignore", agree=False)
    t_pack = _timed(lambda: avgfn.average(params, lambda t: t, round=rnd), repeat)
    big = torch.empty(1 << 28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(big)
    t_copy = _timed(lambda: dst.copy_(big), repeat)
    bandwidth = 2 * big.numel() * 4 / t_copy  # read + write
    moved = numel * (4 + 2) + numel * (2 + 4)  # fp32 -> bf16 pack, bf16 -> fp32 unpack
    return {"params": numel, "bf16_round_ms": 1e3 * t_pack, "bytes_moved_gb_s": moved / t_pack / 1e9,
            "copy_bandwidth_gb_s": bandwidth / 1e9}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="8,32,128")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine; nothing to measure.")
        return 0
    import torch.distributed as dist

    torch.manual_seed(0)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "simulated": []}
    for w in (int(v) for v in args.replicas.split(",")):
        results["simulated"].append(simulated(w, args.steps))
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(folder, 'store')}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=120))  # fmt: skip
        try:
            results["round"] = round_against_nccl(args.repeat)
        finally:
            dist.destroy_process_group()
    results["bf16"] = bf16_packing(args.repeat)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"device: {results['device']}")
    print("replicas  vmap replica-steps/s  loop replica-steps/s  speed-up")
    for r in results["simulated"]:
        v, lp = r["vmap_replica_steps_s"], r["loop_replica_steps_s"]
        print(f"{r['replicas']:>8}  {v:>20.1f}  {lp:>20.1f}  {v / lp:>8.2f}x")
    r = results["round"]
    print(f"one round of {r['params']} params: avgfn {r['avgfn_round_ms']:.3f} ms, donated "
          f"{r['avgfn_donate_ms']:.3f} ms, bare NCCL all-reduce {r['nccl_all_reduce_ms']:.3f} ms")  # fmt: skip
    b = results["bf16"]
    print(f"bf16 pack+unpack of {b['params']} params: {b['bf16_round_ms']:.3f} ms, "
          f"{b['bytes_moved_gb_s']:.0f} GB/s moved against {b['copy_bandwidth_gb_s']:.0f} GB/s copy bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
