"""Recovering from a dead peer: checkpoints, a clean error, and torchrun's restarts.

Run it as::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 \\
        examples/elastic_recovery.py --ckpt-dir /tmp/avgfn-ckpt

Two ranks train a small MLP with local SGD (``avgfn.periodic``) over gloo and
save a checkpoint (params, averager state, step) every few steps. On the first
attempt (``TORCHELASTIC_RESTART_COUNT`` is ``0``), rank 1 SIGKILLs itself at
``--kill-at``, a step where the ranks average. Rank 0, waiting in that round,
gets :class:`avgfn.PeerError` at once (gloo sees the connection reset; a peer
that stalls instead would be given up after ``--timeout`` seconds); its params
are as they were before the round, and it exits with status 1. torchrun then
restarts both ranks; they agree on the newest checkpoint that both hold, load
it, and finish the run. The final params are bit for bit those of a run that
was never interrupted (``--no-kill``), because every rank's data depends only
on its rank and the step.

This is avgfn's answer to "average over the live replicas only": a gloo group
in which a rank died cannot be used again, and gloo has no all-reduce over a
subset of a broken group, so the recipe is to fail fast, restart the group
from the last checkpoint, and continue (see ``docs/failures.md``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import warnings

# The CPU wheel of torch does not need NumPy but warns when it is missing.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import avgfn  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True, help="where each rank keeps its checkpoints")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--period", type=int, default=4, help="steps between averagings (default 4)")
    parser.add_argument("--ckpt-every", type=int, default=5, help="steps between checkpoints (default 5)")
    parser.add_argument("--kill-at", type=int, default=16, help="step at which rank 1 dies (default 16)")
    parser.add_argument("--no-kill", action="store_true", help="run without the failure (the reference)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a peer (default 10)")
    parser.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (default 0.3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.period < 2 or args.ckpt_every < 1 or args.timeout <= 0:
        parser.error("need --steps >= 1, --period >= 2, --ckpt-every >= 1 and --timeout > 0")
    return args


def say(line: str) -> None:
    """Print one line in a single write, so that lines of two ranks never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def digest(params: dict[str, torch.Tensor]) -> str:
    """A checksum of the exact bits of every parameter (equal bits, equal digest)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    bits = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
    return f"{int((bits * weights).sum()) & 0xFFFFFFFF:08x}"


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at ``step``: a function of both only, so a resumed run sees the same data."""
    centers = 2.0 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(10_000 * rank + step)
    labels = torch.randint(0, NUM_CLASSES, (32,), generator=g)
    return centers[labels] + torch.randn(32, NUM_FEATURES, generator=g), labels


# --- checkpoints: one file per rank and step, written atomically, the last two kept -------------

PATTERN = re.compile(r"^rank(\d+)-step(\d+)\.pt$")


def save(folder: str, rank: int, step: int, params: dict, state: avgfn.PeriodicState) -> None:
    path = os.path.join(folder, f"rank{rank}-step{step}.pt")
    torch.save({"step": step, "params": params, "averager": avgfn.state_dict(state)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a rank killed while saving leaves no torn file behind
    # Keep two: a peer may die after this rank saved step s but before it saved s itself.
    for old in sorted(saved_steps(folder, rank))[:-2]:
        os.remove(os.path.join(folder, f"rank{rank}-step{old}.pt"))


def saved_steps(folder: str, rank: int) -> list[int]:
    return [int(m[2]) for m in map(PATTERN.match, os.listdir(folder)) if m and int(m[1]) == rank]


def newest_common_step(folder: str, rank: int) -> int:
    """The newest step every rank has a checkpoint of (0: none): one small all-reduce."""
    newest = torch.tensor(max(saved_steps(folder, rank), default=0))
    dist.all_reduce(newest, op=dist.ReduceOp.MIN)
    return int(newest)


def init_group(attempt: int) -> None:
    """``init_process_group("gloo")``, with a store of its own for each attempt.

    Under torchrun the elastic agent hosts the store at ``MASTER_PORT`` and
    keeps it across restarts, with the keys that the dead attempt's ranks
    wrote (their addresses among them): a restarted rank could read a dead
    peer's address and fail to connect. A prefix per attempt keeps each
    attempt's keys apart (torchrun's ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    is the other way out).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group("gloo")
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"elastic_recovery/attempt{attempt}/", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    init_group(attempt)
    rank = dist.get_rank()
    os.makedirs(args.ckpt_dir, exist_ok=True)

    torch.manual_seed(0)  # every rank builds the same initial model
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, NUM_CLASSES)
    )
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(params, x, y):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    grad_fn = torch.func.grad(loss_fn)

    reduce = avgfn.collectives.all_reduce_mean(timeout=args.timeout)
    avg = avgfn.periodic(args.period, reduce=reduce)
    state = avg.init(params)  # checks that both ranks hold params of one structure

    start = newest_common_step(args.ckpt_dir, rank)
    if start:
        path = os.path.join(args.ckpt_dir, f"rank{rank}-step{start}.pt")
        checkpoint = torch.load(path, weights_only=True)
        params = checkpoint["params"]
        state = avgfn.load_state_dict(state, checkpoint["averager"])
    say(f"[rank {rank}] attempt {attempt}: starting at step {start}")

    averaged = False
    for step in range(start, args.steps):
        x, y = batch(rank, step)
        grads = grad_fn(params, x, y)
        params = {k: p - args.lr * grads[k] for k, p in params.items()}
        if rank == 1 and attempt == 0 and step == args.kill_at and not args.no_kill:
            say(f"[rank {rank}] attempt {attempt}: killing myself at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        before, began = params, time.monotonic()
        try:
            params, state = avg.update(params, state, step)
        except avgfn.PeerError as error:
            assert all(params[k] is before[k] for k in params)  # nothing of ours was touched
            say(
                f"[rank {rank}] attempt {attempt}: PeerError at step {error.step} after "
                f"{time.monotonic() - began:.2f}s (timeout {error.timeout:g}s); params unchanged, "
                f"digest {digest(params)}; exiting so that torchrun restarts the group"
            )
            # Leave at once, without tearing the broken group down (that can
            # abort the process in gloo); torchrun restarts every rank.
            os._exit(1)
        averaged = params is not before
        if (step + 1) % args.ckpt_every == 0:
            save(args.ckpt_dir, rank, step + 1, params, state)

    if not averaged:
        params = avgfn.average(params, reduce)  # finish with the same model everywhere
    x, y = batch(rank, args.steps)
    say(
        f"[rank {rank}] attempt {attempt}: finished {args.steps} steps "
        f"({int(state.rounds)} averagings), loss {float(loss_fn(params, x, y)):.4f}, "
        f"final digest {digest(params)}"
    )
    # Leave together: a rank that tears its group down while the other is
    # still busy can abort at exit in gloo.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
