"""Stochastic gradient descent: ``torch.optim.SGD``, made pure."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from avgfn._core import tree as _tree
from avgfn._core.traced import traced, zeros_like_batch
from avgfn._core.types import Params
from avgfn._core.records import Record, record
from avgfn.optim._base import (
    Optimizer,
    check_float,
    check_state_type,
    flatten_like,
    flatten_params,
    settings_of,
)
from avgfn.optim._schedules import Schedule, check_lr, lr_at


@record
class SGDState(Record):
    """State of [`sgd()`][avgfn.optim.sgd].

    Attributes:
      step: int64 count of the steps taken.
      momentum_buffer: a tree shaped like the params, or ``None`` when
        ``momentum == 0``. Before the first step it holds zeros that are never
        read: torch's first step sets the buffer to the gradient itself.
    """

    step: torch.Tensor
    momentum_buffer: Optional[Any]


def _step_counter(leaves: list[torch.Tensor]) -> torch.Tensor:
    # Batched like the params under vmap, so vmap(init) gives update's strides.
    return zeros_like_batch(leaves)


def _check_sgd_options(
    lr: Union[float, Schedule],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Union[float, Schedule], float, float, float]:
    """Validate [`sgd()`][avgfn.optim.sgd]'s options, returning ``lr`` and the three floats."""
    lr = check_lr(lr)
    momentum = check_float("momentum", momentum)
    dampening = check_float("dampening", dampening)
    weight_decay = check_float("weight_decay", weight_decay)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {maximize!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "nesterov momentum requires momentum > 0 and dampening == 0, got "
            f"momentum={momentum}, dampening={dampening}"
        )
    return lr, momentum, dampening, weight_decay


def _buffer_leaves(
    state: SGDState, momentum: float, spec: Any, p_leaves: list[torch.Tensor]
) -> Optional[list[torch.Tensor]]:
    """The momentum buffers' leaves, or ``None`` when ``momentum == 0``."""
    if momentum != 0:
        if state.momentum_buffer is None:
            raise ValueError(
                "sgd.update: the state has no momentum buffers (made by an sgd with "
                f"momentum=0?) but this sgd has momentum={momentum}"
            )
        return flatten_like(
            "state.momentum_buffer", state.momentum_buffer, spec, p_leaves, "sgd.update"
        )
    if state.momentum_buffer is not None:
        raise ValueError(
            "sgd.update: the state has momentum buffers (made by an sgd with momentum > 0?) "
            "but this sgd has momentum=0"
        )
    return None


def _lr_mover(
    lr: Union[float, Schedule], step: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function ``move(p, d)`` that returns ``p - lr * d`` as torch rounds it."""
    if not callable(lr):
        return lambda p, d: torch.add(p, d, alpha=-lr)
    neg_lr = torch.neg(lr_at(lr, step))
    # Rounded to each param's dtype, as torch's kernel rounds its alpha.
    neg_lrs: dict[torch.dtype, torch.Tensor] = {}

    def move(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if p.dtype not in neg_lrs:
            neg_lrs[p.dtype] = neg_lr.to(p.dtype)
        return torch.addcmul(p, d, neg_lrs[p.dtype])

    return move


def _sgd_direction(
    p: torch.Tensor,
    g: torch.Tensor,
    buf: Optional[torch.Tensor],
    first: Union[None, bool, torch.Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One leaf's step direction and new momentum buffer (``None`` without momentum)."""
    if maximize:
        g = torch.neg(g)
    if weight_decay != 0:
        g = torch.add(g, p, alpha=weight_decay)
    if momentum == 0:
        return g, None
    # With momentum the state has buffers, and ``first`` marks its first step.
    assert buf is not None and first is not None
    # torch: the first step clones the gradient, later ones
    # buf.mul_(momentum).add_(grad, alpha=1 - dampening).
    if isinstance(first, bool):  # known on the host: compute only the branch taken (the same bits)
        # a copy at the first step, as torch's clone: the state must not alias the caller's grads
        buf = torch.clone(g) if first else torch.add(torch.mul(buf, momentum), g, alpha=1 - dampening)
    else:
        later = torch.add(torch.mul(buf, momentum), g, alpha=1 - dampening)
        buf = torch.where(first, g, later)
    return (torch.add(g, buf, alpha=momentum) if nesterov else buf), buf


def sgd(
    lr: Union[float, Schedule],
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> Optimizer:
    """Stochastic gradient descent, with optional momentum and Nesterov momentum.

    Reproduces ``torch.optim.SGD`` (its single-tensor path, the one torch uses
    on CPU) bit for bit: the weight decay is added to the gradient, the first
    momentum step sets the buffer to that gradient (no dampening), later ones
    compute ``buf * momentum + (1 - dampening) * grad``, and the param moves by
    ``-lr`` times the buffer (Nesterov: times ``grad + momentum * buf``).

    ``lr`` may be a [`Schedule`][avgfn.optim.Schedule]: it is called with the state's ``step``
    (the steps taken before this one), as ``torch.optim.lr_scheduler`` sets a
    learning rate after each step, and the param moves with
    ``torch.addcmul(param, d, -lr)``: a tensor ``lr``, and on CPU the same
    fused multiply-add, to the bit, as torch's ``param.add_(d, alpha=-lr)``.

    Every operation is out of place, so ``update`` works under
    ``torch.func.vmap`` and ``torch.func.grad``.

    Args:
      lr: the learning rate, ``>= 0``, or a [`Schedule`][avgfn.optim.Schedule] of the step count.
      momentum: the momentum factor, ``>= 0``.
      dampening: dampening of the momentum, ``>= 0``.
      weight_decay: L2 penalty added to the gradient, ``>= 0``.
      nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
      maximize: ascend instead of descend.

    Returns:
      An [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer] whose state is an [`SGDState`][avgfn.optim.SGDState].

    Raises:
      ValueError: a negative hyperparameter, or ``nesterov`` without momentum
        or with dampening (as torch refuses them).
      TypeError: a hyperparameter that is not a real number.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.sgd(0.1, momentum=0.9)
      >>> params = {"w": torch.tensor([1.0])}
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     params, state = opt.update({"w": torch.tensor([1.0])}, state, params)
      >>> params["w"], int(state.step)
      (tensor([0.4390]), 3)
    """
    lr, momentum, dampening, weight_decay = _check_sgd_options(
        lr, momentum, dampening, weight_decay, nesterov, maximize
    )

    def init(params: Params) -> SGDState:
        leaves, spec = flatten_params(params, "sgd.init")
        buffers = None
        if momentum != 0:
            buffers = _tree.tree_unflatten([torch.zeros_like(p) for p in leaves], spec)
        return SGDState(_step_counter(leaves), buffers)

    def update(grads: Params, state: SGDState, params: Params) -> tuple[Params, SGDState]:
        check_state_type(state, SGDState, "sgd")
        p_leaves, spec = flatten_params(params, "sgd.update")
        g_leaves = flatten_like("grads", grads, spec, p_leaves, "sgd.update")
        b_leaves = _buffer_leaves(state, momentum, spec, p_leaves)
        first: Union[None, bool, torch.Tensor] = None
        if b_leaves is not None:
            first = state.step == 0
            if first.device.type == "cpu" and not traced(first):
                first = bool(first)  # no device sync on the CPU: skip the branch not taken
        move = _lr_mover(lr, state.step)
        new_params = []
        new_buffers = []
        for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
            buf = b_leaves[i] if b_leaves is not None else None
            d, buf = _sgd_direction(
                p, g, buf, first, momentum, dampening, weight_decay, nesterov, maximize
            )
            if buf is not None:
                new_buffers.append(buf)
            new_params.append(move(p, d))
        buffers = _tree.tree_unflatten(new_buffers, spec) if momentum != 0 else None
        return _tree.tree_unflatten(new_params, spec), SGDState(state.step + 1, buffers)

    settings = settings_of(
        "sgd", lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize,
    )  # fmt: skip
    return Optimizer(init=init, update=update, settings=settings)
