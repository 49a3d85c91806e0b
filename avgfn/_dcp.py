"""Checkpoints of averager state over sharded params, through ``torch.distributed.checkpoint``.

[`avgfn.state_dict()`][avgfn.state_dict] is the simple path: one file per
replica, read back with ``torch.load``. Over FSDP2 params (``DTensor``s) a
state holds shards: the global copy of the DiLoCo family and its outer
optimizer state are DTensors laid out as the params. `sharded_state_dict()`
gives a dict that ``torch.distributed.checkpoint`` (DCP) saves with each
rank writing its own shards, and `load_sharded_state_dict()` rebuilds the
state from what ``dcp.load`` read into such a dict.

A plain tensor of the state (a counter, Streaming DiLoCo's buffer in
flight, which holds this rank's shards) is what this rank alone holds: DCP
would keep one copy of a plain tensor for every rank, so it is stored as
this rank's row of a DTensor over every rank of the default group.
Loading therefore resumes exactly on the same world and mesh.

DCP keeps one copy of each shard of a DTensor (by its offset). Between two
rounds the replicas' states differ (an EMA of local params, the local
params themselves), so each replica saves its own checkpoint over its shard
group: ``dcp.save(sd, checkpoint_id=f"{path}/replica{i}",
process_group=mesh["shard"].get_group())``, with ``group=`` that same group
here, as torchft's replica groups do. (Right after a DiLoCo outer step, the
global copy is the same in every replica; only then may one checkpoint over
every rank serve them all.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from avgfn._checkpoint import load_state_dict, state_dict
from avgfn._round import sharded as _sharded


def _world_mesh(group: Any) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sharded_state_dict needs an initialised process group (torch.distributed."
            "init_process_group): DCP saves each rank's shards; use avgfn.state_dict without one"
        )
    group = dist.group.WORLD if group is None else group
    backend = dist.get_backend(group)
    device = "cuda" if backend == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device)


def sharded_state_dict(state: Any, *, group: Optional[Any] = None) -> dict[str, Any]:
    """A DCP-ready dict of an averager state whose params are DTensors (or any state).

    The keys are those of [`avgfn.state_dict()`][avgfn.state_dict]. DTensor
    leaves stay as they are (DCP writes each shard once); a plain tensor
    becomes this rank's row of a DTensor sharded over every rank of
    ``group``, so each rank saves and loads its own. Python scalars are kept.
    The dict holds the state's own tensors (no copies): ``dcp.load`` writes
    into them, so load into the dict of a fresh ``avg.init(params)``.
    Save it with ``torch.distributed.checkpoint.save``, next to the model's
    and the optimizer's state dicts; to resume, build the same dict from
    ``avg.init(params)`` on the same mesh, ``dcp.load`` into it, and pass it
    to [`avgfn.load_sharded_state_dict()`][avgfn.load_sharded_state_dict].

    Args:
      state: a state from an averager's ``init`` or ``update``.
      group: the process group of the ranks that save this checkpoint
        together (default: the default group), the one passed to
        ``dcp.save(..., process_group=)``: a replica's shard group, so that
        each replica keeps its own values. All of them call this with
        states of one structure.

    Returns:
      A flat ``dict[str, DTensor | bool | int | float]``.

    Raises:
      RuntimeError: no process group is initialised.
      TypeError: a leaf that is neither a tensor nor a Python scalar.

    Examples:
      >>> import torch.distributed.checkpoint as dcp          # doctest: +SKIP
      >>> dcp.save({"avg": avgfn.sharded_state_dict(state)}, checkpoint_id=path)   # doctest: +SKIP
    """
    from torch.distributed.tensor import DTensor, Shard

    flat = state_dict(state)
    mesh = None
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, torch.Tensor) and not _sharded.is_dtensor(value):
            if mesh is None:
                mesh = _world_mesh(group)
            row = value.detach().reshape(1, *value.shape)
            if mesh.device_type == "cuda" and row.device.type != "cuda":
                row = row.to(torch.device("cuda", torch.cuda.current_device()))
            value = DTensor.from_local(row, mesh, [Shard(0)], run_check=False)
        out[key] = value
    return out


def load_sharded_state_dict(template_state: Any, loaded: Mapping[str, Any]) -> Any:
    """Rebuild a state from a [`sharded_state_dict()`][avgfn.sharded_state_dict] that ``dcp.load`` filled.

    Args:
      template_state: a state of the same averager over the same sharded
        params (``avg.init(params)``), on the same mesh.
      loaded: the dict made by ``sharded_state_dict(template_state)`` after
        ``torch.distributed.checkpoint.load`` read the checkpoint into it.

    Returns:
      A new state record with the loaded values (DTensors where the template
      has them, laid out as the template's).

    Raises:
      ValueError: missing or unknown keys, a tensor of another shape or
        dtype, or a DTensor with other placements than the template's.
      TypeError: ``loaded`` is not a mapping, or a value of the wrong type.
    """
    if not isinstance(loaded, Mapping):
        raise TypeError(f"load_sharded_state_dict: loaded must be a mapping, got {type(loaded).__name__}")
    template = state_dict(template_state)
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        want = template.get(key)
        if (
            _sharded.is_dtensor(value)
            and isinstance(want, torch.Tensor)
            and not _sharded.is_dtensor(want)
        ):
            value = _sharded.local(value)[0]  # this rank's row
        flat[key] = value
    return load_state_dict(template_state, flat)
