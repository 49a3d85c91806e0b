"""Local SGD with 8 simulated workers in one process (``avgfn.simulate`` under ``vmap``).

Run it with::

    python examples/simulate_local_sgd.py

from the root of the repository (the script imports avgfn from its checkout,
installed or not). Its options: ``--workers`` (default 8), ``--steps`` (300),
``--period`` (8), ``--batch`` (the mini-batch of each worker, 32), ``--lr``
(0.3) and ``--seed`` (0).

The task is made here, with a fixed seed, and nothing is downloaded: three
interleaved noisy spirals in the plane (a classification that a linear model
cannot do; a small MLP can). Each worker gets its own shard of the training
points, takes SGD steps on mini-batches of its shard, and every ``--period``
steps the workers average their params with ``avgfn.periodic`` and
``simulate.replica_mean()``: exactly what W processes would do on gloo with
``avgfn.collectives.all_reduce_mean()``.

At each averaging it prints every worker's loss on its mini-batch and the
spread between the workers' params (the largest max - min over the workers of
any parameter entry) just before and just after the averaging; at the end, the
accuracy of the averaged model on held-out points.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch.func import functional_call, grad_and_value, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import avgfn  # noqa: E402
from avgfn import simulate  # noqa: E402

CLASSES = 3


def spirals(num_points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_points`` points of three noisy interleaved spirals, shuffled; labels 0..2."""
    per = num_points // CLASSES
    xs, ys = [], []
    for c in range(CLASSES):
        radius = torch.linspace(0.05, 1.0, per)
        noise = 0.25 * torch.randn(per, generator=generator)
        angle = 4.0 * radius + 2 * math.pi * c / CLASSES + noise
        xs.append(torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1))
        ys.append(torch.full((per,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(y), generator=generator)
    return x[order], y[order]


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, CLASSES),
    )  # fmt: skip


def spread(params: dict[str, torch.Tensor]) -> float:
    """The largest (max - min) over the replicas of any entry: 0 iff all replicas are equal."""
    return max(float((p.amax(0) - p.amin(0)).max()) for p in params.values())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="mini-batch per worker")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workers = args.workers

    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = spirals(3072, generator)
    test_x, test_y = spirals(768, generator)
    usable = len(train_y) - len(train_y) % workers
    # (W, n / W, ...): worker r's own block of the training points
    shard_x, shard_y = simulate.shard((train_x[:usable], train_y[:usable]), workers)

    torch.manual_seed(args.seed)
    model = make_model()  # the architecture; its params are the template
    # every worker starts from the same init, as a real job's ranks would
    stacked = simulate.stack([model] * workers)
    avg = avgfn.periodic(args.period, reduce=simulate.replica_mean())
    state = vmap(avg.init)(stacked)

    def loss_fn(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def step_fn(params, state, x, y, step):
        grads, loss = grad_and_value(loss_fn)(params, x, y)
        local = {k: p - args.lr * grads[k] for k, p in params.items()}
        new, state = avg.update(local, state, step)
        return new, state, local, loss

    train_step = vmap(step_fn, in_dims=(0, 0, 0, 0, None))

    print(
        f"{workers} simulated workers, {shard_y.shape[1]} training points each, "
        f"local SGD (batch {args.batch}, lr {args.lr}) averaged every {args.period} steps"
    )
    rows = torch.arange(workers)[:, None]
    spreads = []
    for step in range(args.steps):
        pick = torch.randint(0, shard_y.shape[1], (workers, args.batch), generator=generator)
        x, y = shard_x[rows, pick], shard_y[rows, pick]
        stacked, state, local, losses = train_step(stacked, state, x, y, step)
        if step % args.period == 0:
            before, after = spread(local), spread(stacked)
            spreads.append((step, before, after))
            print(f"step {step:4d}  losses " + " ".join(f"{v:.3f}" for v in losses.tolist()))
            rounds = int(state.rounds[0])
            print(f"step {step:4d}  round {rounds}: spread {before:.3e} -> {after:.3e}")

    # Evaluate the mean of the workers (what one more averaging would give each).
    mean_params = {k: v.mean(0) for k, v in stacked.items()}
    with torch.no_grad():
        logits = functional_call(model, mean_params, (test_x,))
    accuracy = float((logits.argmax(1) == test_y).float().mean())
    final = spread(stacked)
    print(f"final spread {final:.3e}  test accuracy of the averaged model {accuracy:.3f}")
    return {"spreads": spreads, "accuracy": accuracy, "final_spread": final}


if __name__ == "__main__":
    main()
