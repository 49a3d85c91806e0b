"""The real run: one algorithm on W gloo processes under ``torchrun``, against its simulation.

Each rank rebuilds the demo's task (the same split, initial params and
mini-batches: they are fixed by the seed), trains its own shard with the very
recipe the study uses, given counting [`avgfn.collectives.all_reduce_mean()`][avgfn.collectives.all_reduce_mean]
Reduces instead of simulated ones, and writes its final params and its ledger
to ``--out``. The parent (`real_run()`) launches::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node W \\
        --local-addr 127.0.0.1 -m avgfn.demo._real --algorithms A,B ... --out DIR

over loopback (``GLOO_SOCKET_IFNAME=lo``), and `compare()` checks the
ranks' params against a W-replica simulation of the same configuration.

Unlike avgfn's algorithms, this launcher talks to ``torch.distributed``
itself: something has to start the process group.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from avgfn import collectives
from avgfn.demo._accounting import CountingReduce, Ledger
from avgfn.demo._study import (
    Config,
    Result,
    Task,
    algorithm,
    check_algorithm,
    group_label,
    make_task,
    world_label,
)

__all__ = ["Comparison", "compare", "real_run"]

# A float32 run of a few hundred steps that differs from its simulation only
# in the order of the additions (gloo's against replica order, mm against
# bmm) stays within ~1e-6 of it here; a missed or misplaced averaging moves
# params by 1e-3 and more.
TOLERANCE = 1e-4


class RealComm:
    """The Reduces of a real gloo world, counted: the twin of ``SimulatedComm``."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.ledger = Ledger()

    def world(self) -> CountingReduce:
        return CountingReduce(collectives.all_reduce_mean(), self.ledger, world_label(self.workers))

    def hierarchy(self, period_group_sizes: dict[int, int]) -> list[tuple[int, CountingReduce]]:
        levels = collectives.hierarchy(period_group_sizes)
        return [
            (period, CountingReduce(r, self.ledger, group_label(size, self.workers)))
            for (period, r), size in zip(levels, period_group_sizes.values())
        ]


def _config_args(config: Config) -> list[str]:
    return [
        "--steps", str(config.steps), "--batch-size", str(config.batch_size),
        "--lr", repr(config.lr), "--hidden", ",".join(map(str, config.hidden)),
        "--seed", str(config.seed), "--test-size", str(config.test_size),
    ]  # fmt: skip


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One rank of the demo's real run (start it with torchrun).")
    parser.add_argument("--algorithms", required=True, help="comma-separated, run one after the other")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--hidden", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--test-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="folder for <algorithm>-rank<r>.pt")
    return parser.parse_args(argv)


def _train(name: str, task: Task, rank: int) -> dict[str, Any]:
    """Train this rank's shard with ``name`` on the default group; its params and ledger."""
    from torch.func import grad_and_value

    config = task.config
    comm = RealComm(config.workers)
    train = algorithm(name).build(comm, config)
    params = {k: v.clone() for k, v in task.init.items()}
    state = train.init(params)
    shard_x, shard_y = task.shard_x[rank], task.shard_y[rank]
    started = time.perf_counter()
    for step in range(config.steps):
        pick = task.indices[step, rank]
        grads, _ = grad_and_value(task.loss)(params, shard_x[pick], shard_y[pick])
        params, state = train.update(grads, state, params, step)
    return {
        "params": {k: v.detach().clone() for k, v in params.items()},
        "calls": dict(comm.ledger.calls),
        "bytes": dict(comm.ledger.bytes),
        "seconds": time.perf_counter() - started,
        "master_addr": os.environ.get("MASTER_ADDR"),
    }


def rank_main(argv: Optional[Sequence[str]] = None) -> None:
    """What each rank runs: train its shard on the gloo world, save params and ledger."""
    import torch.distributed as dist

    args = _parse(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, workers = dist.get_rank(), dist.get_world_size()
        config = Config(
            workers=workers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            hidden=tuple(int(h) for h in args.hidden.split(",")), seed=args.seed,
            test_size=args.test_size,
        )  # fmt: skip
        task = make_task(config)
        for name in args.algorithms.split(","):
            out = _train(name, task, rank)
            torch.save(out, Path(args.out) / f"{name}-rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def real_run(
    names: Sequence[str], config: Config, *, timeout: float = 300
) -> dict[str, list[dict[str, Any]]]:
    """Run each of ``names`` on ``config.workers`` gloo processes, in one torchrun launch.

    Returns:
      ``name -> [output of rank 0, rank 1, ...]``; each output holds the
      rank's final ``params``, its ledger (``calls``, ``bytes`` by label), the
      training loop's ``seconds`` and the ``master_addr`` it rendezvoused on.

    Raises:
      ValueError: an unknown algorithm, or one that cannot run on ``config.workers``.
      RuntimeError: torchrun failed or timed out (with the tail of its output).
    """
    if not names:
        raise ValueError("real_run: names is empty")
    for name in names:
        check_algorithm(name, config.workers)  # fails here, not in W processes
    env = dict(os.environ)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds avgfn/
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="avgfn-demo-") as out:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(config.workers), "--local-addr", "127.0.0.1",
            "-m", "avgfn.demo._real", "--algorithms", ",".join(names), *_config_args(config),
            "--out", out,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"torchrun did not finish in {timeout:g}s: {' '.join(command)}") from error
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"torchrun failed with exit code {done.returncode}:\n{tail}")
        return {
            name: [
                torch.load(Path(out) / f"{name}-rank{r}.pt", weights_only=True)
                for r in range(config.workers)
            ]
            for name in names
        }


@attrs.frozen
class Comparison:
    """The real run against the simulation.

    Attributes:
      max_abs_diff: the largest ``|real - simulated|`` over every param entry
        of every rank.
      param_scale: the largest ``|param|`` (for scale).
      ledgers_match: every rank counted the calls and bytes the simulation counted.
      tolerance: the largest difference that passes.
    """

    max_abs_diff: float
    param_scale: float
    ledgers_match: bool
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        """The params agree within the tolerance and the ledgers match."""
        return self.max_abs_diff <= self.tolerance and self.ledgers_match


def compare(real: list[dict[str, Any]], simulated: Result, tolerance: float = TOLERANCE) -> Comparison:
    """Compare rank ``r``'s final params with simulated replica ``r``'s, leaf by leaf."""
    worst, scale, ledgers = 0.0, 0.0, True
    for rank, out in enumerate(real):
        if set(out["params"]) != set(simulated.params):
            raise ValueError(f"rank {rank} holds params {sorted(out['params'])}, the simulation {sorted(simulated.params)}")
        for key, want in simulated.params.items():
            got = out["params"][key]
            worst = max(worst, float((got - want[rank]).abs().max()))
            scale = max(scale, float(want[rank].abs().max()))
        ledgers &= out["calls"] == simulated.ledger.calls and out["bytes"] == simulated.ledger.bytes
    return Comparison(worst, scale, ledgers, tolerance)


if __name__ == "__main__":
    rank_main()
