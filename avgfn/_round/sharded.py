"""DTensor leaves in a round: average the local shards, hand back DTensors.

An FSDP2 replica (``torch.distributed.fsdp.fully_shard``) holds its params
as ``DTensor``s sharded over one dimension of a ``DeviceMesh``; averaging
runs over another dimension (the replicate group), where every member holds
the same piece of each tensor. A round therefore reduces each DTensor's
local shard (``to_local()``) like any plain tensor, and wraps the result
back with the leaf's own mesh, placements, shape and stride: no
communication on the shard dimension, and the result equals the mean of the
full tensors. Plain leaves may sit next to DTensor leaves in one round (say,
buffers replicated over the shard dimension): they are averaged over the
same group.

The agreement check compares what the replicas of the group can see: the
local shards' shapes and dtypes, the placements, the global shape and the
offset of the shard in the full tensor. Replicas holding different pieces
(a Reduce over the shard dimension by mistake) raise
[`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] before any value moves.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Optional

import torch

from avgfn._core.errors import PeerError, ReplicaMismatchError
from avgfn._core.traced import traced

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - a torch built without distributed
    _DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTensor is not None and isinstance(t, _DTensor)


def any_dtensor(leaves: list[Any]) -> bool:
    """Whether any of ``leaves`` is a DTensor."""
    if _DTensor is None:
        return False
    if torch.compiler.is_compiling():
        return any(isinstance(t, _DTensor) for t in leaves)
    return any(issubclass(kind, _DTensor) for kind in set(map(type, leaves)))  # a C loop over the leaves


def local(t: Any) -> Any:
    """The local shard of a DTensor, detached and sharing its storage; anything else as is."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local().detach()


def unwrap(leaves: list[Any]) -> tuple[list[Any], list[Any]]:
    """The local shards of ``leaves``, and the DTensors they came from (``None``: a plain leaf)."""
    origins: list[Any] = [t if is_dtensor(t) else None for t in leaves]
    return [local(t) for t in leaves], origins


def wrap(value: torch.Tensor, origin: Any, shard: Optional[torch.Tensor] = None) -> Any:
    """``value`` (a local shard) as a DTensor laid out as ``origin``; ``value`` for a plain leaf.

    When ``value`` is ``shard`` itself (the unwrapped local shard of
    ``origin``, written in place or left alone) ``origin`` comes back.
    """
    if origin is None:
        return value
    if shard is not None and value is shard:
        return origin
    out = _DTensor.from_local(
        value.detach(),
        origin.device_mesh,
        origin.placements,
        run_check=False,
        shape=origin.shape,
        stride=origin.stride(),
    )
    if origin.requires_grad:
        out.requires_grad_(True)
    return out


def rewrap(values: list[Any], origins: list[Any], shards: Optional[list[Any]] = None) -> list[Any]:
    """Each of ``values`` wrapped as its origin (see `wrap()`)."""
    if shards is None:
        shards = [None] * len(values)
    return [wrap(v, o, s) for v, o, s in zip(values, origins, shards)]


def describe_layout(t: Any) -> str:
    """A DTensor's placements and mesh, for error messages."""
    return f"{list(t.placements)} on {t.device_mesh}"


def _offset(t: Any) -> str:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - a torch without the helper
        return "?"
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return str(tuple(int(o) for o in offset))


def layout(t: Any) -> str:
    """What the agreement compares for a leaf beyond its (local) shape and dtype.

    Empty for a plain tensor; for a DTensor its global shape, placements and
    the offset of its shard in the full tensor.
    """
    if not is_dtensor(t):
        return ""
    placements = ", ".join(str(p) for p in t.placements)
    return f" shard of {tuple(t.shape)} [{placements}] at {_offset(t)}"


def layouts(leaves: list[Any]) -> Optional[tuple[str, ...]]:
    """`layout()` of each leaf, or ``None`` when no leaf is a DTensor."""
    if not any_dtensor(leaves):
        return None
    return tuple(layout(t) for t in leaves)


def _step_name(tag: int) -> str:
    return "no step" if tag == -1 else f"step {tag}"


def everywhere(
    flag: torch.Tensor, leaves: list[Any], step: Optional[int] = None, timeout: Optional[float] = None
) -> torch.Tensor:
    """``flag`` (a plain 0-d bool tensor) and-ed over the ranks that hold other shards of the leaves.

    A decision taken on local shards (are they finite?) must be the same on
    every shard of a replica, or its ranks would part ways (one skips a
    round that another applies). One small all-reduce per mesh dimension a
    leaf is split on (``Shard`` or ``Partial``); the ``Replicate``
    dimensions, where the replicas differ, are left to the round.

    The all-reduce carries the round's ``step``: the ranks of a replica that
    meet in it at different rounds (one of them refused its inputs, or
    failed, in an earlier round and left it; the round's check runs over
    the replicas, not over a replica's shards) raise
    [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] naming both
    steps, instead of taking one round's answer for another's. ``timeout``
    (seconds; the round's Reduce's): how long to wait for those ranks before
    [`avgfn.PeerError`][avgfn.PeerError] (``None``: the process group's own).
    """
    import torch.distributed as dist

    groups: list[tuple[Any, int]] = []  # (mesh, dim) of every dimension a leaf is split on
    for t in leaves:
        if not is_dtensor(t):
            continue
        for dim, placement in enumerate(t.placements):
            if not placement.is_replicate() and all(m is not t.device_mesh or d != dim for m, d in groups):
                groups.append((t.device_mesh, dim))
    if not groups:
        return flag
    tag = -1 if step is None else int(step)
    device = groups[0][0].device_type
    value = torch.cat([
        flag.to(device=device, dtype=torch.int64).reshape(1),
        torch.tensor([tag, -tag], dtype=torch.int64, device=device),
    ])  # (min of the flags, min step, -max step)
    for mesh, dim in groups:
        if traced(value):
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
            continue
        started = time.monotonic()
        try:
            work = dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh.get_group(dim), async_op=True)
            work.wait() if timeout is None else work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            raise PeerError(
                f"the ranks that hold the other shards of this replica (mesh dimension {dim}) failed "
                f"to answer after {time.monotonic() - started:.2f}s: one of them died, stalled, or left "
                "the round (it refused its inputs, or failed); the params passed to update are "
                "unchanged (unless donated), but the replica's ranks are no longer in step: restore "
                "params and state from a checkpoint on every rank of the replica, and rebuild its "
                f"process groups. Cause: {error}",
                group=f"mesh dimension {dim}",
                timeout=timeout,
            ) from error
    if not traced(value):
        low, high = int(value[1]), -int(value[2])
        if low != high:
            raise ReplicaMismatchError(
                f"the ranks that hold the shards of this replica are at different rounds "
                f"({_step_name(low)} and {_step_name(high)}): one of them refused its inputs or failed in an earlier "
                "round, and the replica's shards no longer match; the params passed to update "
                "are unchanged (unless donated): restore params and state from a checkpoint on "
                "every rank of the replica"
            )
    return value[0].to(flag.device).reshape(()).to(torch.bool)
