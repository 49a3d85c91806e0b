"""One averaging of a params tree: torch's ``average_parameters``, made pure."""

from __future__ import annotations

from typing import Any

import torch

from avgfn import _select, _tree
from avgfn._base import Params, Reduce


def compute_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The dtype the mean is taken in: the promoted dtype of ``leaves``.

    This is the dtype ``torch.cat`` gives the flat buffer in torch's
    ``average_parameters``. Integer or bool leaves alone promote further to the
    default floating dtype, so their mean is not truncated before the cast back.
    """
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


def _check_result(result: Any, flat: torch.Tensor) -> torch.Tensor:
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"reduce must return a Tensor, got {type(result).__name__}")
    if result.shape != flat.shape:
        raise ValueError(
            f"reduce must return a tensor shaped like its input {tuple(flat.shape)}, "
            f"got {tuple(result.shape)}"
        )
    return result


def average_leaves(leaves: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
    """Average ``leaves`` with one Reduce call per device (one in the usual case).

    The leaves are copied into a fresh flat buffer of :func:`compute_dtype` (the
    only buffer the Reduce sees), and come back as views of the reduced buffer
    cast to their own dtype, shape and device. The inputs are never written.
    """
    dtype = compute_dtype(leaves)
    by_device: dict[torch.device, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_device.setdefault(leaf.device, []).append(i)
    out: list[Any] = [None] * len(leaves)
    for indices in by_device.values():
        parts = [leaves[i].detach().reshape(-1) for i in indices]
        flat = torch.cat(parts)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        reduced = _check_result(reduce(flat), flat)
        offset = 0
        for i in indices:
            leaf = leaves[i]
            n = leaf.numel()
            value = reduced[offset : offset + n].view(leaf.shape).to(leaf.dtype)
            if leaf.requires_grad:
                value.requires_grad_(True)
            out[i] = value
            offset += n
    return out


def average(params: Params, reduce: Reduce, *, where: _select.Where = None) -> Params:
    """Average the selected leaves of ``params`` over a group, once.

    The pure twin of torch's
    ``torch.distributed.algorithms.model_averaging.utils.average_parameters``:
    the selected leaves are flattened into one buffer of their promoted dtype
    (as ``torch.cat`` does), handed to ``reduce``, and split back. Each leaf
    keeps its dtype, shape and device; unselected leaves come back as the same
    objects; the inputs are never modified.

    Args:
      params: a pytree of tensors (other leaves pass through unless selected).
      reduce: the mean over the group (see :class:`avgfn.Reduce`);
        ``avgfn.collectives.all_reduce_mean()`` on a process group,
        ``avgfn.simulate.replica_mean()`` under ``vmap``.
      where: ``None`` (every floating-point tensor), a callable ``leaf -> bool``
        (torch's own filter is ``lambda p: p.grad is not None``), or a pytree
        of bools shaped like ``params``.

    Returns:
      A new params tree with the selected leaves averaged.

    Raises:
      ValueError: a ``where`` tree that does not match ``params``.
      TypeError: a selected leaf that is not a tensor, or a ``where`` that
        yields something other than a bool.

    Examples:
      >>> import torch, avgfn
      >>> params = {"w": torch.tensor([1.0, 3.0]), "step": 7}
      >>> peer = {"w": torch.tensor([3.0, 5.0]), "step": 7}
      >>> reduce = avgfn.testing.peers_mean(peer["w"])   # as if one peer held these
      >>> avgfn.average(params, reduce)
      {'w': tensor([2., 4.]), 'step': 7}
    """
    _select.check_where(where)
    leaves, spec = _tree.tree_flatten(params)
    mask = _select.selection(where, params, leaves, spec)
    chosen = [i for i, selected in enumerate(mask) if selected]
    if not chosen:
        return params
    averaged = average_leaves([leaves[i] for i in chosen], reduce)
    new_leaves = list(leaves)
    for i, value in zip(chosen, averaged):
        new_leaves[i] = value
    return _tree.tree_unflatten(new_leaves, spec)
