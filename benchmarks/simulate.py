"""Local SGD on W simulated replicas: avgfn.simulate under vmap against a loop of modules.

Usage:
    python benchmarks/simulate.py [--replicas 8] [--sizes 64,128,10] [--batch 32]
                                  [--period 4] [--steps 40] [--runs 7] [--no-compile] [--json]

The task: W replicas of an MLP (64-128-10 by default, ReLU), each with a batch
of 32 per step from its own data, plain SGD, params averaged every ``--period``
steps. Three ways to train them, in one process:

  loop              the obvious code: W ``nn.Module``\\ s, each with its own
                    ``torch.optim.SGD``, forward/backward one after the other,
                    and every ``period`` steps the params averaged by hand
                    (``torch.stack(...).mean(0)`` copied into each module).
  simulate_eager    one ``torch.func.vmap`` over the replicas of the step
                    ``grad -> SGD -> avg.update`` with ``avgfn.periodic`` and
                    ``avgfn.simulate.replica_mean()``.
  simulate_compiled the same vmapped step under ``torch.compile`` (default
                    inductor): the averaging is inside the compiled region.

Each is warmed up, then timed over ``--runs`` runs of ``--steps`` steps (a
multiple of the period, so every run has the same share of averaging steps),
the runs of the three interleaved so that they share the machine's noise. The
time per training step is the median over runs. ``compile_s`` is the wall time
of the compiled step's warm-up (every graph it compiles) less what those steps
cost at the steady-state speed. All three start from the same params and see
the same data; the benchmark checks that they end with the same params (up to
float32 rounding, and reports the largest difference).

``--json`` prints one JSON object with ``loop_ms``, ``simulate_eager_ms``,
``simulate_compiled_ms``, ``compile_s`` and ``speedup`` (the loop's time over
the best simulation's), plus the settings and each run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import avgfn  # noqa: E402
from avgfn import simulate  # noqa: E402

POOL = 8  # batches per replica, cycled


def make_model(sizes: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(a, b))
    return torch.nn.Sequential(*layers)


class Loop:
    """W modules, W optimizers, averaged by hand every ``period`` steps."""

    def __init__(self, models: list[torch.nn.Module], lr: float, period: int) -> None:
        self.models = models
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
        self.period = period

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor, step: int) -> None:
        for model, opt, x, y in zip(self.models, self.optimizers, xs, ys):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if step % self.period == 0:
            with torch.no_grad():
                for replicas in zip(*(m.parameters() for m in self.models)):
                    mean = torch.stack(replicas).mean(0)
                    for p in replicas:
                        p.copy_(mean)

    def params(self) -> dict[str, torch.Tensor]:
        return simulate.stack(self.models)


class Simulated:
    """The W replicas as one stacked pytree, trained by one vmapped step."""

    def __init__(
        self, model: torch.nn.Module, stacked: Any, lr: float, period: int, compiled: bool
    ) -> None:
        avg = avgfn.periodic(period, reduce=simulate.replica_mean())

        def loss_fn(params, x, y):
            return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

        def step_fn(params, state, x, y, step):
            grads = grad(loss_fn)(params, x, y)
            local = {k: p - lr * grads[k] for k, p in params.items()}
            return avg.update(local, state, step)

        train = vmap(step_fn, in_dims=(0, 0, 0, 0, None))
        self.train = torch.compile(train) if compiled else train
        self.stacked = stacked
        self.state = vmap(avg.init)(stacked)

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor, step: int) -> None:
        self.stacked, self.state = self.train(self.stacked, self.state, xs, ys, step)

    def params(self) -> dict[str, torch.Tensor]:
        return self.stacked


def _run(
    fn: Callable[..., None], data: tuple[torch.Tensor, torch.Tensor], start: int, n: int
) -> float:
    xs, ys = data
    t0 = time.perf_counter()
    for step in range(start, start + n):
        fn(xs[:, step % POOL], ys[:, step % POOL], step)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--sizes", default="64,128,10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=12, help="warm-up steps of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps % args.period or args.warmup % args.period:
        parser.error("--steps and --warmup must be multiples of --period")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    w = args.replicas

    torch.manual_seed(0)
    models = [make_model(sizes) for _ in range(w)]
    template = make_model(sizes)
    stacked = simulate.stack(models)
    xs = torch.randn(w, POOL, args.batch, sizes[0])
    ys = torch.randint(0, sizes[-1], (w, POOL, args.batch))

    variants: dict[str, Any] = {
        "loop": Loop(models, args.lr, args.period),
        "simulate_eager": Simulated(template, stacked, args.lr, args.period, compiled=False),
    }
    if not args.no_compile:
        variants["simulate_compiled"] = Simulated(
            template, stacked, args.lr, args.period, compiled=True
        )

    warm_s = {name: _run(fn, (xs, ys), 0, args.warmup) for name, fn in variants.items()}
    per_run: dict[str, list[float]] = {name: [] for name in variants}
    step = args.warmup
    for _ in range(args.runs):
        for name, fn in variants.items():
            per_run[name].append(_run(fn, (xs, ys), step, args.steps) / args.steps * 1e3)
        step += args.steps
    ms = {name: statistics.median(times) for name, times in per_run.items()}

    # Same init, same data, same schedule: the three must agree, up to the float32
    # rounding of different kernels (bmm against mm, fused code) grown over the run.
    reference = variants["loop"].params()
    drift = 0.0
    for name, fn in variants.items():
        for key, value in fn.params().items():
            torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-3)
            drift = max(drift, float((value - reference[key]).abs().max()))

    result: dict[str, Any] = {
        "loop_ms": round(ms["loop"], 4),
        "simulate_eager_ms": round(ms["simulate_eager"], 4),
        "simulate_compiled_ms": None,
        "compile_s": None,
        "speedup": None,
    }
    best = ms["simulate_eager"]
    if "simulate_compiled" in ms:
        result["simulate_compiled_ms"] = round(ms["simulate_compiled"], 4)
        compile_s = warm_s["simulate_compiled"] - args.warmup * ms["simulate_compiled"] / 1e3
        result["compile_s"] = round(compile_s, 2)
        best = min(best, ms["simulate_compiled"])
    result["speedup"] = round(ms["loop"] / best, 2)
    result["max_param_diff"] = drift
    result["settings"] = {
        "replicas": w, "sizes": sizes, "batch": args.batch, "period": args.period,
        "steps_per_run": args.steps, "runs": args.runs, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip
    result["runs_ms"] = {name: [round(t, 4) for t in times] for name, times in per_run.items()}

    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{w} replicas of an MLP {'-'.join(map(str, sizes))}, batch {args.batch} per replica, "
            f"SGD, averaged every {args.period} steps; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print(f"time per training step, median of {args.runs} runs of {args.steps} steps:")
        print(f"  loop of {w} modules + optimizers   {ms['loop']:8.3f} ms")
        print(f"  simulate, eager vmap             {ms['simulate_eager']:8.3f} ms")
        if "simulate_compiled" in ms:
            print(
                f"  simulate, torch.compile(vmap)    {ms['simulate_compiled']:8.3f} ms"
                f"   (compile {result['compile_s']:.1f} s)"
            )
        print(f"speedup of the best simulation over the loop: {result['speedup']:.2f}x")
        print(f"largest difference between the three trainings' final params: {drift:.1e}")
    return result


if __name__ == "__main__":
    main()
