"""One pure training-step update: gradient schedule, optimizer, then averager.

The functional twin of torch's ``PostLocalSGDOptimizer`` (plus the gradient
half that torch keeps in a DDP communication hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Protocol, Union

import attrs
import torch

from avgfn._core import tree as _tree
from avgfn._core.types import Averager, Params
from avgfn._core.checks import check_state, check_step
from avgfn._algorithms.post_local import GradientSchedule, PostLocalSGD, unpack
from avgfn._core.records import Record, record
from avgfn.optim._base import Optimizer

Skip = Union[bool, torch.Tensor, Callable[[Params], Union[bool, torch.Tensor]]]
"""``False``, ``True``, a bool tensor (one element), or ``grads -> bool | Tensor``."""


@record
class AveragingState(Record):
    """State of [`with_averaging()`][avgfn.with_averaging].

    Attributes:
      gradients: the gradient schedule's state, or ``None`` without one.
      optimizer: the inner optimizer's state.
      averager: the averager's state.
    """

    gradients: Any
    optimizer: Any
    averager: Any


class AveragingUpdateFn(Protocol):
    """``update(grads, state, params, step, *, skip=False) -> (params, state)``."""

    def __call__(
        self, grads: Params, state: AveragingState, params: Params, step: int, /, *, skip: Skip = False
    ) -> tuple[Params, AveragingState]:
        """One training step; see [`with_averaging()`][avgfn.with_averaging]."""
        ...


@attrs.frozen
class AveragingUpdate:
    """An inner optimizer chained with an averager (and a gradient schedule).

    Attributes:
      init: ``init(params) -> AveragingState``.
      update: ``update(grads, state, params, step, *, skip=False) -> (params, state)``.
    """

    init: Callable[[Params], AveragingState]
    update: AveragingUpdateFn


def _where_tree(flag: torch.Tensor, if_true: Any, if_false: Any) -> Any:
    a, spec = _tree.tree_flatten(if_true)
    b, _ = _tree.tree_flatten(if_false)
    out = [
        torch.where(flag, x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(a, b)
    ]
    return _tree.tree_unflatten(out, spec)


def _inner_step(optimizer: Optimizer, grads: Params, o_state: Any, params: Params, skip: Any) -> tuple[Params, Any]:
    """The optimizer's step, unless ``skip`` says to keep the params and its state."""
    if callable(skip) and not isinstance(skip, torch.Tensor):
        skip = skip(grads)
    if isinstance(skip, torch.Tensor):
        if skip.numel() != 1 or skip.dtype != torch.bool:
            raise TypeError(
                f"skip must be a bool or a one-element bool tensor, got a {skip.dtype} "
                f"tensor of shape {tuple(skip.shape)}"
            )
        stepped, new_state = optimizer.update(grads, o_state, params)
        flag = skip.reshape(())
        return _where_tree(flag, params, stepped), _where_tree(flag, o_state, new_state)
    if isinstance(skip, bool):
        return (params, o_state) if skip else optimizer.update(grads, o_state, params)
    raise TypeError(f"skip must be a bool, a bool tensor or a callable, got {type(skip).__name__} {skip!r}")


def with_averaging(
    optimizer: Optimizer,
    averager: Union[Averager, PostLocalSGD],
    *,
    gradients: Optional[GradientSchedule] = None,
) -> AveragingUpdate:
    """Chain a gradient schedule, an inner optimizer and an averager into one update.

    ``update(grads, state, params, step)`` does, in order:

    1. ``grads = gradients.update(grads, ..., step)``: the gradient averaging
       due at ``step`` (torch does this in DDP's communication hook);
    2. ``params = optimizer.update(grads, ..., params)``: the local step;
    3. ``params = averager.update(params, ..., step)``: the parameter
       averaging due at ``step`` (torch's ``PostLocalSGDOptimizer.step``).

    **Skipped steps.** ``skip`` (a bool, a one-element bool tensor, or a
    callable ``grads -> bool | Tensor`` that is handed the gradients *after*
    step 1, e.g. a non-finite check) skips step 2 only: the params and the
    inner optimizer's state stay as they were. Steps 1 and 3 run as scheduled,
    because they are collectives every replica must join in the same order,
    and the caller's ``step`` still advances by one. This keeps every replica
    on one schedule when only some of them see an overflow (in the local
    phase, an inf in one local group does not reach the others).

    torch behaves differently: ``GradScaler.step(opt)`` does not call
    ``PostLocalSGDOptimizer.step`` at all when it finds an inf, so that
    iteration's parameter averaging is skipped and the averager's counter
    does not advance, while the DDP hook's counter (advanced during backward)
    does: the two counters drift apart by one per skipped step
    (pytorch/pytorch#76282). A tensor ``skip`` is applied with
    ``torch.where``, so it needs no host synchronization and works under vmap.

    Args:
      optimizer: the inner [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer].
      averager: the params [`avgfn.Averager`][avgfn.Averager], or a
        [`avgfn.PostLocalSGD`][avgfn.PostLocalSGD] (then its averager and its gradient
        schedule are both used).
      gradients: a [`avgfn.GradientSchedule`][avgfn.GradientSchedule] to apply to the
        gradients first; ``None`` leaves them as given (for example when DDP
        already averaged them).

    Returns:
      An [`AveragingUpdate`][avgfn.AveragingUpdate] whose state is an `AveragingState`.

    Raises:
      TypeError: an argument of the wrong type, or ``gradients`` given twice
        (with a [`avgfn.PostLocalSGD`][avgfn.PostLocalSGD], which carries its own).

    Examples:
      >>> import torch, avgfn
      >>> algo = avgfn.post_local_sgd(2, global_reduce=lambda t: t, local_reduce=None, period=2)
      >>> train = avgfn.with_averaging(avgfn.optim.sgd(0.1), algo)
      >>> params = {"w": torch.tensor([1.0])}
      >>> state = train.init(params)
      >>> for step in range(4):
      ...     params, state = train.update({"w": torch.tensor([1.0])}, state, params, step,
      ...                                  skip=(step == 1))
      >>> params["w"], int(state.optimizer.step), int(state.averager.rounds)
      (tensor([0.7000]), 3, 1)
    """
    averager, gradients = unpack(averager, gradients, "with_averaging")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"with_averaging: optimizer must be an avgfn.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(averager, Averager):
        raise TypeError(
            "with_averaging: averager must be an avgfn.Averager or an avgfn.PostLocalSGD, "
            f"got {type(averager).__name__}"
        )
    if gradients is not None and not isinstance(gradients, GradientSchedule):
        raise TypeError(
            "with_averaging: gradients must be an avgfn.GradientSchedule or None, "
            f"got {type(gradients).__name__}"
        )

    def init(params: Params) -> AveragingState:
        return AveragingState(
            gradients.init(params) if gradients is not None else None,
            optimizer.init(params),
            averager.init(params),
        )

    def update(
        grads: Params, state: AveragingState, params: Params, step: int, *, skip: Skip = False
    ) -> tuple[Params, AveragingState]:
        check_state(state, AveragingState, "with_averaging")
        step = check_step(step)
        if (gradients is None) != (state.gradients is None):
            raise ValueError(
                "with_averaging: the state was made by a with_averaging "
                + ("without" if state.gradients is None else "with")
                + " a gradient schedule, this one "
                + ("has one" if gradients is not None else "has none")
            )
        g_state = state.gradients
        if gradients is not None:
            grads, g_state = gradients.update(grads, g_state, step)
        new_params, o_state = _inner_step(optimizer, grads, state.optimizer, params, skip)
        new_params, a_state = averager.update(new_params, state.averager, step)
        return new_params, AveragingState(g_state, o_state, a_state)

    return AveragingUpdate(init=init, update=update)
