"""Streaming DiLoCo across 2 replicas, each an FSDP2 group of 2 processes, with a DCP checkpoint.

Run it with::

    torchrun --standalone --nnodes 1 --nproc-per-node 4 examples/fsdp2_diloco.py

The 4 processes form a (replicate=2, shard=2) ``DeviceMesh``: ranks 0 and 1
are replica 0, ranks 2 and 3 replica 1. Inside a replica the model is
sharded with ``torch.distributed.fsdp.fully_shard`` (its params are
DTensors); across replicas, ``avgfn.streaming_diloco`` averages the local
shards over the replicate group, one fragment at a time. Everything runs on
CPU with gloo (on GPUs, pass ``--device cuda`` for NCCL).

Halfway through, each replica saves a checkpoint through
``torch.distributed.checkpoint`` (the model's shards and the averager's
state, each rank writing its own shards) into its own folder, over its shard
group. A second model and averager are then built from scratch, loaded from
that checkpoint, and trained to the end: the example checks that they end
bit for bit where the uninterrupted run ended, and that both replicas hold
the same global copy (the params every fragment's last outer step made).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import avgfn
from avgfn import collectives

PERIOD = 4


def build(mesh, device: str, reduce) -> tuple[torch.nn.Module, torch.optim.Optimizer, avgfn.ModuleAverager]:
    """The same model on every rank, sharded inside the replica, and its averager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    ).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    averager = avgfn.ModuleAverager(
        model, avgfn.streaming_diloco(PERIOD, reduce=reduce, num_fragments=2), params="all"
    )
    # SGD keeps no state: the checkpoint is the model and the averager
    return model, torch.optim.SGD(model.parameters(), lr=0.05), averager


def batch(replica: int, step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``replica``'s batch at ``step`` (both shards of a replica see the same batch)."""
    g = torch.Generator().manual_seed(1000 * replica + step)
    x = torch.randn(32, 16, generator=g)
    return x.to(device), (x[:, :4].sum(dim=1) > 0).long().to(device)


def train(model, opt, averager, replica: int, steps: range, device: str) -> float:
    loss = torch.zeros(())
    for step in steps:
        x, y = batch(replica, step, device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        averager.step(step)
    return float(loss)


def checkpoint(model, averager, group) -> dict:
    """What one replica saves: its model's shards and the averager's (sharded) state."""
    return {"model": model.state_dict(), "avg": avgfn.sharded_state_dict(averager.state, group=group)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--folder", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 4:
        raise SystemExit(f"run this example on 4 processes (--nproc-per-node 4), not {world}")
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = f"cuda:{torch.cuda.current_device()}"
    mesh = init_device_mesh(args.device, (2, 2), mesh_dim_names=("replicate", "shard"))
    replica = mesh.get_coordinate()[0]
    reduce = collectives.all_reduce_mean(mesh["replicate"].get_group())
    shard_group = mesh["shard"].get_group()
    half = (args.steps // 2) // PERIOD * PERIOD + 1  # mid-period: the replicas' states differ
    folder = args.folder or tempfile.gettempdir()
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")  # torchrun's id of this run: no clash with another
    path = os.path.join(folder, f"avgfn-fsdp2-diloco-{run}-replica{replica}")

    model, opt, averager = build(mesh, device, reduce)
    train(model, opt, averager, replica, range(half), device)
    dcp.save(checkpoint(model, averager, shard_group), checkpoint_id=path, process_group=shard_group)
    loss = train(model, opt, averager, replica, range(half, args.steps), device)
    final = {k: v.full_tensor() for k, v in model.named_parameters()}

    # Resume: a fresh model and averager, loaded from the checkpoint, on the same mesh.
    model2, opt2, averager2 = build(mesh, device, reduce)
    loaded = checkpoint(model2, averager2, shard_group)
    dcp.load(loaded, checkpoint_id=path, process_group=shard_group)
    model2.load_state_dict(loaded["model"])
    averager2.state = avgfn.load_sharded_state_dict(averager2.state, loaded["avg"])
    train(model2, opt2, averager2, replica, range(half, args.steps), device)
    resumed = {k: v.full_tensor() for k, v in model2.named_parameters()}
    same = all(torch.equal(final[k], resumed[k]) for k in final)

    # The replicas share the global copy (each fragment's, after its outer steps): compare shards.
    shards = [g.to_local().double() for g in averager.state.global_params]
    digest = torch.stack([torch.cat([s.reshape(-1) for s in shards]).sum()]).to(device)
    digests = [torch.zeros_like(digest) for _ in range(2)]
    dist.all_gather(digests, digest, group=mesh["replicate"].get_group())
    agree = torch.equal(digests[0], digests[1])
    print(f"rank {rank} (replica {replica}): loss {loss:.4f}, resumed run matches: {same}, replicas agree: {agree}")
    dist.barrier()
    if args.folder is None and mesh.get_coordinate()[1] == 0:
        shutil.rmtree(path, ignore_errors=True)  # one rank of each replica removes its checkpoint
    dist.destroy_process_group()
    if not (same and agree):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
