"""Replicas in and out of one stacked pytree, and one data shard per replica."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from avgfn._core import tree as _tree
from avgfn._core.types import Params

__all__ = ["shard", "stack", "unstack"]


def _where(path: Any) -> str:
    return _tree.keystr(path) or "<root>"


def _module_params(module: torch.nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    out = {name: p.detach() for name, p in module.named_parameters()}
    if buffers:
        out.update((name, b.detach()) for name, b in module.named_buffers())
    return out


def _as_trees(replicas: Any, buffers: bool) -> list[Any]:
    if isinstance(replicas, (torch.Tensor, str, bytes)) or not isinstance(replicas, Sequence):
        raise TypeError(
            "stack: replicas must be a list of params pytrees or of nn.Modules, "
            f"got {type(replicas).__name__}"
        )
    if len(replicas) == 0:
        raise ValueError("stack: replicas must not be empty: a replica dimension of size 0")
    modules = [isinstance(r, torch.nn.Module) for r in replicas]
    if any(modules) and not all(modules):
        raise TypeError(
            "stack: replicas must be all nn.Modules or all params pytrees, got a mix "
            f"({[type(r).__name__ for r in replicas]})"
        )
    if all(modules):
        return [_module_params(m, buffers) for m in replicas]
    if buffers:
        raise ValueError("stack: buffers=True applies to nn.Modules only")
    return list(replicas)


def stack(replicas: Sequence[Any], *, buffers: bool = False) -> Params:
    """Stack W replicas into one params pytree with a leading replica dimension.

    Each leaf of the result is ``torch.stack`` of that leaf over the
    replicas: a new tensor of shape ``(W, *shape)``, detached (the simulation
    takes gradients with ``torch.func``, not with ``.grad``). The replicas are
    not modified and share no memory with the result.

    Modules are read as ``dict(module.named_parameters())`` (the params that
    torch's averagers average), plus ``named_buffers()`` when ``buffers=True``
    (in the same flat dict, as ``torch.func.functional_call`` takes them).
    This is ``torch.func.stack_module_state`` with its two dicts merged on
    request, made of detached tensors, and with the checks below.

    Args:
      replicas: a non-empty list of params pytrees of the same structure (same
        keys, same containers) whose leaves are tensors of the same shape,
        dtype and device; or a list of ``nn.Module``\\ s holding such params.
      buffers: with modules, also stack their buffers.

    Returns:
      A pytree with the structure of one replica and leaves of shape ``(W, ...)``.

    Raises:
      ValueError: an empty list (a replica dimension of size 0), replicas with
        different structures, or leaves that differ in shape, dtype or device
        (the message names the replica and the path).
      TypeError: ``replicas`` is not a list, mixes modules and pytrees, or
        holds a leaf that is not a tensor.

    Examples:
      >>> import torch
      >>> from avgfn import simulate
      >>> stacked = simulate.stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
      >>> stacked["w"]
      tensor([[0., 0.],
              [1., 1.]])
      >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
      >>> {k: tuple(v.shape) for k, v in simulate.stack(models).items()}
      {'weight': (4, 2, 3), 'bias': (4, 2)}
    """
    trees = _as_trees(replicas, buffers)
    first, spec = _tree.tree_flatten_with_path(trees[0])
    paths = [path for path, _ in first]
    columns: list[list[torch.Tensor]] = [[] for _ in first]
    for index, tree in enumerate(trees):
        flat, tree_spec = _tree.tree_flatten_with_path(tree)
        these = [path for path, _ in flat]
        if tree_spec != spec:
            only_first = ", ".join(_where(p) for p in paths if p not in these)
            only_this = ", ".join(_where(p) for p in these if p not in paths)
            detail = (
                f"paths only in replica 0: {only_first or 'none'}; only in replica {index}: "
                f"{only_this or 'none'}"
                if only_first or only_this
                else f"replica 0 is {spec}, replica {index} is {tree_spec}"
            )
            raise ValueError(
                f"stack: replica {index} has another structure than replica 0: {detail}"
            )
        for column, (path, leaf) in zip(columns, flat):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"stack: the leaf at {_where(path)} of replica {index} is "
                    f"{type(leaf).__name__} {leaf!r}, not a tensor"
                )
            if column:
                ref = column[0]
                if (leaf.shape, leaf.dtype, leaf.device) != (ref.shape, ref.dtype, ref.device):
                    raise ValueError(
                        f"stack: the leaf at {_where(path)} is a {ref.dtype} tensor of shape "
                        f"{tuple(ref.shape)} on {ref.device} in replica 0, but a {leaf.dtype} "
                        f"tensor of shape {tuple(leaf.shape)} on {leaf.device} in replica {index}"
                    )
            column.append(leaf.detach())
    return _tree.tree_unflatten([torch.stack(column) for column in columns], spec)


def _leading_size(tree: Any, what: str) -> tuple[list[Any], Any, int]:
    flat, spec = _tree.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError(f"{what}: params has no leaves, so no replica dimension")
    size = None
    first_path = None
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what}: the leaf at {_where(path)} is {type(leaf).__name__} {leaf!r}, "
                "not a tensor"
            )
        if leaf.dim() == 0:
            raise ValueError(
                f"{what}: the leaf at {_where(path)} is a 0-d tensor, with no replica dimension"
            )
        if size is None:
            size, first_path = leaf.shape[0], path
        elif leaf.shape[0] != size:
            raise ValueError(
                f"{what}: leaves disagree on the replica dimension: {size} at "
                f"{_where(first_path)}, {leaf.shape[0]} at {_where(path)}"
            )
    assert size is not None
    return [leaf for _, leaf in flat], spec, size


def unstack(params: Params) -> list[Params]:
    """Split a stacked params pytree into a list of W per-replica pytrees.

    The inverse of [`stack()`][avgfn.simulate.stack]: replica ``i`` gets ``leaf[i]`` of every
    leaf, as a fresh tensor (writing into it leaves ``params`` as it was). To
    put replica ``i`` back into a module, ``module.load_state_dict(replicas[i],
    strict=False)`` (``strict=False`` when the dict holds no buffers).

    Args:
      params: a pytree whose leaves are tensors sharing a leading dimension W.

    Returns:
      A list of W pytrees with the structure of ``params``.

    Raises:
      ValueError: a replica dimension of size 0, leaves with different leading
        sizes, a 0-d leaf, or no leaves at all.
      TypeError: a leaf that is not a tensor.

    Examples:
      >>> import torch
      >>> from avgfn import simulate
      >>> simulate.unstack({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
      [{'w': tensor([1., 2.])}, {'w': tensor([3., 4.])}]
    """
    leaves, spec, size = _leading_size(params, "unstack")
    if size == 0:
        raise ValueError("unstack: the replica dimension has size 0: there are no replicas")
    return [
        _tree.tree_unflatten([leaf[i].clone() for leaf in leaves], spec) for i in range(size)
    ]


def shard(data: Any, world_size: int) -> Any:
    """Give each of ``world_size`` replicas its own contiguous block of the data.

    Every tensor leaf of ``data`` of length ``n`` along dim 0 becomes one of
    shape ``(world_size, n // world_size, ...)``: replica ``r`` holds rows
    ``[r * n // world_size, (r + 1) * n // world_size)``. Map it with
    ``in_dims=0`` next to the stacked params. The result is a view of
    ``data`` where ``reshape`` can make one (nothing is written to either).

    Args:
      data: a tensor or a pytree of tensors (``(inputs, labels)``, a dict...).
      world_size: the number of replicas, ``>= 1``; it must divide the length
        of every leaf (trim the data first, e.g. ``x[: n - n % world_size]``).

    Returns:
      ``data`` with every leaf reshaped to ``(world_size, n // world_size, ...)``.

    Raises:
      ValueError: ``world_size < 1``, or a leaf whose length it does not
        divide, or a 0-d leaf.
      TypeError: a non-int ``world_size`` or a leaf that is not a tensor.

    Examples:
      >>> import torch
      >>> from avgfn import simulate
      >>> x, y = simulate.shard((torch.arange(12.0).reshape(6, 2), torch.arange(6)), 3)
      >>> x.shape, y
      (torch.Size([3, 2, 2]), tensor([[0, 1],
              [2, 3],
              [4, 5]]))
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(
            f"shard: world_size must be an int, got {type(world_size).__name__} {world_size!r}"
        )
    if world_size < 1:
        raise ValueError(f"shard: world_size must be >= 1, got {world_size}")
    flat, spec = _tree.tree_flatten_with_path(data)
    out = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"shard: the leaf at {_where(path)} is {type(leaf).__name__}, not a tensor"
            )
        if leaf.dim() == 0:
            raise ValueError(
                f"shard: the leaf at {_where(path)} is a 0-d tensor, with nothing to split"
            )
        n = leaf.shape[0]
        if n % world_size:
            raise ValueError(
                f"shard: world_size {world_size} does not divide the length {n} of the leaf at "
                f"{_where(path)}; trim it to {n - n % world_size} rows first"
            )
        out.append(leaf.reshape(world_size, n // world_size, *leaf.shape[1:]))
    return _tree.tree_unflatten(out, spec)
