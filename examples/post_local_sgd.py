"""Post-local SGD on four CPU processes over gloo: DDP, torch.optim and avgfn.

Run it with::

    torchrun --standalone --nproc-per-node 4 examples/post_local_sgd.py

The four ranks play two "nodes" of two ranks each (``--node-size``). One
description, ``avgfn.post_local_sgd``, drives the whole algorithm:

* for the first ``--start-step`` steps, DDP averages the gradients over all
  four ranks (plain data parallel);
* from then on, DDP averages the gradients only within each node, and every
  ``--period`` steps the parameters are averaged over all four ranks.

The gradient half runs in DDP's communication hook, the parameter half in the
optimizer wrapper, and both read the wrapper's one step counter, so their
switch step cannot disagree (in torch they are two objects with two counters,
``PostLocalSGDState`` and ``PostLocalSGDOptimizer``).

Each rank prints one line per step with a digest of the exact bits of its
parameters: equal within a node at every step, equal everywhere after an
averaging. ``--save-at N --checkpoint DIR`` saves every rank's checkpoint after
N steps; ``--resume --checkpoint DIR`` continues from it, exactly as the
uninterrupted run would.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# The CPU wheel of torch does not need NumPy but warns when it is missing.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import avgfn  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps (default 24)")
    parser.add_argument(
        "--start-step", type=int, default=6,
        help="steps of global gradient averaging before local SGD starts (default 6)",
    )  # fmt: skip
    parser.add_argument("--period", type=int, default=4, help="steps between param averagings (default 4)")
    parser.add_argument("--node-size", type=int, default=2, help="ranks per node (default 2)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--checkpoint", default=None, help="folder for the checkpoints")
    parser.add_argument("--save-at", type=int, default=None, help="save after this many steps")
    parser.add_argument("--resume", action="store_true", help="resume from --checkpoint")
    args = parser.parse_args(argv)
    if (args.save_at is not None or args.resume) and args.checkpoint is None:
        parser.error("--save-at and --resume need --checkpoint DIR")
    return args


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at this step: deterministic, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    centers = 2.0 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, NUM_CLASSES, (32,), generator=g)
    return centers[labels] + torch.randn(32, NUM_FEATURES, generator=g), labels


def digest(module: torch.nn.Module) -> str:
    """A checksum of the exact bits of every parameter (equal bits, equal digest)."""
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    bits = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
    return f"{int((bits * weights).sum()) & 0xFFFFFFFF:08x}"


def say(line: str) -> None:
    """Print one line in a single write, so that lines of several ranks never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    # Loopback only: torchrun --standalone provides RANK, WORLD_SIZE, MASTER_PORT...
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    # Consecutive ranks form a node, as torch's dist.new_subgroups() makes them.
    node_group, _ = dist.new_subgroups(args.node_size)
    algo = avgfn.post_local_sgd(
        args.start_step,
        global_reduce=avgfn.collectives.all_reduce_mean(),
        local_reduce=avgfn.collectives.all_reduce_mean(node_group),
        period=args.period,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, NUM_CLASSES)
    )
    ddp = DistributedDataParallel(model)
    opt = avgfn.AveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        avgfn.ModuleAverager(model, algo.averager),
    )
    # The hook reads the optimizer's counter: one step for both halves.
    ddp.register_comm_hook(*avgfn.collectives.ddp_comm_hook(algo.gradients, step=lambda: opt.iteration))

    path = None if args.checkpoint is None else os.path.join(args.checkpoint, f"rank{rank}.pt")
    if args.resume:
        # After DDP is built: DDP broadcasts rank 0's weights when it is constructed,
        # and in the local phase each rank's weights are its own.
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        if rank == 0:
            say(f"resumed at step {opt.iteration}")
    elif rank == 0:
        say(
            f"post-local SGD on {dist.get_world_size()} ranks, nodes of {args.node_size}: "
            f"gradients averaged globally for {args.start_step} steps, then within each "
            f"node, with params averaged globally every {args.period} steps"
        )

    for step in range(opt.iteration, args.steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()  # the hook averages the gradients as the schedule says for `step`
        rounds = int(opt.averager.state.rounds)
        opt.step()  # the local step, then the param averaging due at `step`
        if step < args.start_step:
            note = "gradients: global"
        elif int(opt.averager.state.rounds) > rounds:
            note = f"gradients: node, params averaged (round {int(opt.averager.state.rounds)})"
        else:
            note = "gradients: node"
        say(f"[rank {rank}] step {step:3d}  loss {loss.item():.4f}  digest {digest(model)}  {note}")
        if args.save_at is not None and step + 1 == args.save_at:
            os.makedirs(args.checkpoint, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    say(f"[rank {rank}] final digest {digest(model)}")
    dist.barrier()  # let every rank finish before any tears its connections down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
