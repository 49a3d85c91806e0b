"""Local SGD on two CPU processes over gloo, written with torch.func and avgfn.

Run it with::

    torchrun --standalone --nnodes 1 --nproc-per-node 2 examples/local_sgd_gloo.py

Each rank trains the same small MLP on its own shard of a synthetic
classification task. The training step is a pure function built from
``torch.func.functional_call`` and ``torch.func.grad``; SGD is one line of
tensor arithmetic. The schedule is post-local SGD:

* during the first ``--warmup`` steps the ranks average their *gradients* every
  step (``avgfn.average`` on the gradient dict: plain data parallel), so they
  stay identical;
* after that each rank steps on its own gradients and ``avgfn.periodic``
  averages the *parameters* every ``--period`` steps.

Every rank prints its loss on its shard; on each averaging step it also prints
a digest of the raw bits of its params, which is the same on every rank right
after an averaging. If the last step is not an averaging step, the ranks
average once more at the end, so the finished model is the same everywhere.
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

import avgfn  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 4
NUM_SAMPLES = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--period", type=int, default=4, help="steps between averagings (default 4)")
    parser.add_argument(
        "--warmup", type=int, default=8, help="steps of gradient averaging first (default 8)"
    )
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch (default 32)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.period < 2:
        parser.error(f"--period must be >= 2, got {args.period}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_dataset(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task, the same on every rank (fixed seed); this rank's shard of it.

    Four Gaussian clusters in 8 dimensions, one per class.
    """
    gen = torch.Generator().manual_seed(1234)
    centers = 2.0 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=gen)
    inputs = centers[labels] + torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=gen)
    return inputs[rank::world_size], labels[rank::world_size]


def digest(params: dict[str, torch.Tensor]) -> str:
    """A checksum of the exact bits of every parameter (equal bits, equal digest)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    bits = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
    return f"{int((bits * weights).sum()) & 0xFFFFFFFF:08x}"


def say(line: str) -> None:
    """Print one line in a single write, so that lines of two ranks never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    # Loopback only: torchrun --standalone provides RANK, WORLD_SIZE, MASTER_PORT...
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Every rank builds the same initial model: same seed.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, NUM_CLASSES)
    )
    params = {name: p.detach() for name, p in model.named_parameters()}
    inputs, labels = make_dataset(rank, world_size)

    def loss_fn(params, x, y):
        logits = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y)

    grad_fn = torch.func.grad(loss_fn)

    reduce = avgfn.collectives.all_reduce_mean()
    avg = avgfn.periodic(args.period, reduce=reduce, warmup_steps=args.warmup)
    state = avg.init(params)

    batches = torch.Generator().manual_seed(100 + rank)  # each rank draws its own batches
    first_loss = float(loss_fn(params, inputs, labels))
    if rank == 0:
        say(
            f"local SGD on {world_size} ranks over gloo: {args.steps} steps, "
            f"gradients averaged for the first {args.warmup}, "
            f"then params averaged every {args.period}"
        )

    averaged = False
    for step in range(args.steps):
        idx = torch.randint(0, len(labels), (args.batch_size,), generator=batches)
        grads = grad_fn(params, inputs[idx], labels[idx])
        if step < args.warmup:
            grads = avgfn.average(grads, reduce)  # data parallel during the warm-up
        params = {k: p - args.lr * grads[k] for k, p in params.items()}

        local = params
        params, state = avg.update(params, state, step)
        averaged = params is not local  # off-steps hand back the very same tree

        if averaged or (step < args.warmup and step % args.period == 0):
            loss = float(loss_fn(params, inputs, labels))
            if averaged:
                note = (
                    f"averaged params (round {int(state.rounds)}): "
                    f"digest {digest(local)} -> {digest(params)}"
                )
            else:
                note = "warm-up: gradients averaged"
            say(f"[rank {rank}] step {step:3d}  loss {loss:.4f}  {note}")

    if not averaged:
        # Finish with one averaging so that every rank holds the same model.
        params = avgfn.average(params, reduce)
    loss = float(loss_fn(params, inputs, labels))
    say(f"[rank {rank}] final     loss {loss:.4f}  digest {digest(params)}")

    if rank == 0:
        logits = torch.func.functional_call(model, params, (inputs,))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
        local_steps = max(0, args.steps - args.warmup)
        say(
            f"rank 0 summary: shard loss {first_loss:.4f} -> {loss:.4f}, accuracy {accuracy:.1%}; "
            f"{int(state.rounds)} param averagings in {local_steps} local steps "
            f"(plus {min(args.warmup, args.steps)} gradient averagings in the warm-up)"
        )
    dist.barrier()  # let every rank finish before any tears its connections down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
