"""Gradient clipping by global norm: ``torch.nn.utils.clip_grad_norm_``, made pure."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from avgfn._core import tree as _tree
from avgfn._core.types import Params
from avgfn.optim._base import Optimizer, OptState, check_float


def _check_norm_type(norm_type: Any) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number, got {type(norm_type).__name__} {norm_type!r}")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (or math.inf), got {norm_type}")
    return norm_type


def _group_order(leaves: list[torch.Tensor]) -> list[list[int]]:
    """The leaves' indices grouped by (device, dtype), in the order torch groups them.

    torch computes one norm per tensor, group by group, and the order of the
    groups (a hash map's, in C++) decides the order in which the norms are
    summed. The grouping is asked of torch itself, on empty tensors of the same
    devices and dtypes, so it reads no data and runs under vmap.
    """
    keys = [(leaf.device, leaf.dtype) for leaf in leaves]
    if len(set(keys)) == 1:
        return [list(range(len(leaves)))]
    # torch's helper takes lists whose entries may be None.
    proxies: list[Optional[torch.Tensor]] = [
        torch.empty(0, device=device, dtype=dtype) for device, dtype in keys
    ]
    grouped = _group_tensors_by_device_and_dtype([proxies], with_indices=True)
    return [list(indices) for _, (_, indices) in grouped.items()]


def clip_grad_norm(
    grads: Params, max_norm: float, *, norm_type: float = 2.0
) -> tuple[Params, torch.Tensor]:
    """Scale ``grads`` so that their global norm is at most ``max_norm``; pure.

    Computes what ``torch.nn.utils.clip_grad_norm_(params, max_norm,
    norm_type)`` computes, with the same operations, but returns new
    gradients instead of changing ``p.grad`` in place. The global norm is the
    ``norm_type``-norm of the per-tensor norms (taken with
    ``torch.linalg.vector_norm``, in torch's order of ``(device, dtype)``
    groups); every gradient is multiplied by
    ``min(max_norm / (total_norm + 1e-6), 1)``, so gradients whose norm is
    below ``max_norm`` are still multiplied (by 1.0), as in torch.

    A non-finite total norm is not an error (torch's ``error_if_nonfinite``
    would need the norm on the host): the gradients are scaled by it, to NaN
    or zero, as torch does by default.

    Args:
      grads: a pytree of gradient tensors. ``None`` entries (params without a
        gradient) are left as ``None``, as torch skips params whose ``grad``
        is ``None``.
      max_norm: the largest global norm, ``>= 0``.
      norm_type: the order of the norm, ``> 0``; ``math.inf`` for the largest
        absolute value.

    Returns:
      ``(clipped_grads, total_norm)``: new gradients with the structure of
      ``grads``, and the global norm before clipping (a 0-d tensor), which
      ``clip_grad_norm_`` also returns. With no gradient at all, ``grads`` and
      ``tensor(0.)``.

    Raises:
      TypeError: a leaf of ``grads`` that is not a tensor, or an argument of
        the wrong type.
      ValueError: ``max_norm`` negative or ``norm_type`` not positive.

    Examples:
      >>> import torch, avgfn
      >>> grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
      >>> clipped, norm = avgfn.optim.clip_grad_norm(grads, 1.0)
      >>> norm, clipped["a"], clipped["b"]
      (tensor(5.), tensor([0.6000, 0.0000]), tensor([0.8000]))
      >>> grads["a"]                         # the input is untouched
      tensor([3., 0.])
    """
    max_norm = check_float("max_norm", max_norm)
    norm_type = _check_norm_type(norm_type)
    leaves, spec = _tree.tree_flatten(grads)
    for i, leaf in enumerate(leaves):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"clip_grad_norm: every leaf of grads must be a tensor or None; the leaf at "
                f"{_tree.path_of(grads, i)} is {type(leaf).__name__}"
            )
    present = [leaf for leaf in leaves if leaf is not None]
    if not present:
        return grads, torch.tensor(0.0)
    norms: list[torch.Tensor] = []
    for indices in _group_order(present):
        norms.extend(torch.linalg.vector_norm(present[i], norm_type) for i in indices)
    first_device = present[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    # torch: clamp(max_norm / (total_norm + 1e-6), max=1.0), where a Python
    # number divided by a tensor is that tensor's reciprocal times the number.
    coef = torch.clamp(torch.mul(torch.reciprocal(torch.add(total, 1e-6)), max_norm), max=1.0)
    coefs: dict[torch.device, torch.Tensor] = {}
    clipped: list[Optional[torch.Tensor]] = []
    for g in leaves:
        if g is None:
            clipped.append(None)
            continue
        if g.device not in coefs:
            coefs[g.device] = coef.to(g.device)
        # torch multiplies in place, which keeps the gradient's dtype.
        clipped.append(torch.mul(g, coefs[g.device]).to(g.dtype))
    return _tree.tree_unflatten(clipped, spec), total


def clip_by_global_norm(
    max_norm: float, optimizer: Optimizer, *, norm_type: float = 2.0
) -> Optimizer:
    """``optimizer``, fed gradients clipped by [`clip_grad_norm()`][avgfn.optim.clip_grad_norm] first.

    The training step ``clip_grad_norm_(params, max_norm); opt.step()`` as one
    [`Optimizer`][avgfn.optim.Optimizer]. Its state is ``optimizer``'s own (clipping
    keeps no state), so it checkpoints, and loads into, the unclipped
    optimizer's state. The gradients passed to ``update`` are not modified.

    Args:
      max_norm: the largest global norm of the gradients, ``>= 0``.
      optimizer: the optimizer that takes the clipped gradients.
      norm_type: the order of the norm, ``> 0``; ``math.inf`` for the largest
        absolute value.

    Returns:
      An [`Optimizer`][avgfn.optim.Optimizer] with ``optimizer``'s ``init`` and state.

    Raises:
      TypeError: ``optimizer`` is not an [`Optimizer`][avgfn.optim.Optimizer], or an
        argument of the wrong type.
      ValueError: ``max_norm`` negative or ``norm_type`` not positive.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.clip_by_global_norm(1.0, avgfn.optim.sgd(0.5))
      >>> params = {"w": torch.tensor([0.0, 0.0])}
      >>> state = opt.init(params)
      >>> params, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
      >>> params["w"]                        # the gradient was scaled to norm 1
      tensor([-0.3000, -0.4000])
    """
    max_norm = check_float("max_norm", max_norm)
    norm_type = _check_norm_type(norm_type)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be an avgfn.optim.Optimizer, got {type(optimizer).__name__}"
        )
    inner = optimizer.update

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        clipped, _ = clip_grad_norm(grads, max_norm, norm_type=norm_type)
        return inner(clipped, state, params)

    settings = f"clip_by_global_norm({max_norm!r}, {optimizer.settings or 'an optimizer'}, norm_type={norm_type!r})"
    return Optimizer(init=optimizer.init, update=update, settings=settings)

