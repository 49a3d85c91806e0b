"""Temporal averaging: an EMA or SWA of the params over steps, kept in the state.

These averagers never change the params they are given (the training
continues on the raw params); they keep a running average in
``state.average``, a tree shaped like the params, to evaluate or to save.
Chain them after a distributed averager with [`avgfn.chain()`][avgfn.chain].
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from avgfn._core.traced import traced, zeros_like_batch
from avgfn._round.health import finite
from avgfn._round import sharded as _sharded
from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core.types import Averager, Params
from avgfn._core.checks import check_has_tensor, check_int, check_params, check_state, check_step
from avgfn._core.errors import NonFiniteError
from avgfn._core.records import Record, record

__all__ = ["EMAState", "SWAState", "ema", "swa"]


@record
class EMAState(Record):
    """State of [`ema()`][avgfn.ema].

    Attributes:
      count: int64, how many times the average was updated (torch's
        ``AveragedModel.n_averaged``).
      average: a tree shaped like the params: the moving average of the
        selected leaves; the other tensor leaves hold a copy of their latest
        value (as ``AveragedModel`` keeps buffers in sync), other leaves are
        the params' own.
    """

    count: torch.Tensor
    average: Any


@record
class SWAState(Record):
    """State of [`swa()`][avgfn.swa]: the same fields as [`EMAState`][avgfn.EMAState].

    Attributes:
      count: int64, how many params were averaged (``n_averaged``).
      average: the equal-weight average of the selected leaves so far.
    """

    count: torch.Tensor
    average: Any


def _copy_tree(params: Params) -> Any:
    return _tree.tree_map(
        lambda leaf: leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf, params
    )


def _health_check(
    name: str, nonfinite: str, params: Params, leaves: list[Any], mask: list[bool], count: Any, step: int
) -> tuple[Any, Any]:
    """``(new_count, ok)``: ``new_count`` ``None`` skips the update; ``ok`` masks it when traced."""
    chosen_leaves = [leaf for leaf, chosen in zip(leaves, mask) if chosen]
    if nonfinite == "ignore" or not chosen_leaves:
        return count + 1, None
    ok = finite([leaf.detach() for leaf in chosen_leaves])
    if traced(chosen_leaves[0]):  # under vmap or compile: a replica that is not finite keeps its average
        return count + ok.to(count.dtype), ok
    # DTensor leaves: each rank sees its shards; the verdict is the replica's, the same on every shard
    ok = _sharded.everywhere(ok, chosen_leaves, step)
    if bool(ok):
        return count + 1, None
    if nonfinite == "skip":
        return None, None
    paths = [
        _tree.path_of(params, i)
        for i, (leaf, chosen) in enumerate(zip(leaves, mask))
        if chosen and not bool(finite([leaf.detach()]))
    ]
    at = f"at {', '.join(paths)}" if paths else "in a shard that another rank of this replica holds"
    raise NonFiniteError(
        f"{name}: the params hold non-finite values {at}; the "
        f"average was not updated (nonfinite={nonfinite!r})",
        paths=tuple(paths),
    ).at_step(step)


def _temporal(
    name: str,
    state_cls: type,
    fold: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    start: int,
    every: int,
    where: _select.Where,
    nonfinite: str,
) -> Averager:
    if nonfinite not in _POLICIES:
        raise ValueError(f"{name}: nonfinite must be one of {_POLICIES}, got {nonfinite!r}")

    def init(params: Params) -> Any:
        check_params(params, f"{name}(...).init")
        leaves = _tree.tree_leaves(params)
        check_has_tensor(leaves, f"{name}(...).init")
        # batched under vmap, so vmap(init) gives the strides update returns
        return state_cls(zeros_like_batch(leaves), _copy_tree(params))

    def update(params: Params, state: Any, step: int) -> tuple[Params, Any]:
        check_state(state, state_cls, name)
        check_params(params, f"{name}(...).update")
        step = check_step(step)
        if step < start or (step - start) % every:
            return params, state
        leaves, spec = _tree.tree_flatten(params)
        mask = _select.selection(where, params, leaves, spec)
        averages, a_spec = _tree.tree_flatten(state.average)
        if a_spec != spec:
            raise ValueError(
                f"{name}: state.average does not have the structure of params (was the state made "
                f"by init for these params?); it is {a_spec}, params are {spec}"
            )
        count, ok = _health_check(name, nonfinite, params, leaves, mask, state.count, step)
        if count is None:
            return params, state
        first = state.count == 0
        out = []
        for leaf, avg, chosen in zip(leaves, averages, mask):
            if chosen:
                if not (leaf.is_floating_point() or leaf.is_complex()):
                    raise TypeError(
                        f"{name}: where selects a {leaf.dtype} leaf; only floating-point and "
                        "complex leaves can be averaged over time"
                    )
                current = leaf.detach()
                if current.shape != avg.shape or current.dtype != avg.dtype:
                    raise ValueError(
                        f"{name}: a leaf of params is a {current.dtype} tensor of shape "
                        f"{tuple(current.shape)} but its average is a {avg.dtype} tensor of shape "
                        f"{tuple(avg.shape)}"
                    )
                # torch's AveragedModel copies the params at its first update.
                new = torch.where(first, current, fold(avg, current, state.count))
                out.append(new if ok is None else torch.where(ok, new, avg))
            elif isinstance(leaf, torch.Tensor):
                out.append(leaf.detach().clone())
            else:
                out.append(leaf)
        return params, state_cls(count, _tree.tree_unflatten(out, spec))

    return Averager(init=init, update=update)


_POLICIES = ("raise", "skip", "ignore")


def _check_schedule(start: Any, every: Any) -> tuple[int, int]:
    return check_int("start", start, minimum=0), check_int("every", every, minimum=1)


def ema(
    decay: float,
    *,
    start: int = 0,
    every: int = 1,
    where: _select.Where = None,
    nonfinite: str = "raise",
) -> Averager:
    """An exponential moving average of the params (torch's ``get_ema_multi_avg_fn``).

    At ``step >= start`` with ``(step - start) % every == 0`` the average is
    updated as ``torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=get_ema_multi_avg_fn(decay))`` updates it: the first update
    copies the params, later ones compute ``lerp(average, params, 1 - decay)``.
    The params are returned untouched; read ``state.average``.

    ``AveragedModel.update_parameters`` called at the iterations ``i > k``
    corresponds to ``start=k + 1``.

    Args:
      decay: in ``[0, 1]``.
      start: the first step that updates the average, ``>= 0``.
      every: update every ``every`` steps from ``start``, ``>= 1``.
      where: which leaves to average (see [`avgfn.average()`][avgfn.average]); the other
        tensor leaves are copied, as torch keeps buffers in sync.
      nonfinite: when a selected leaf holds NaN or infinity at an update:
        ``"raise"`` (default; [`avgfn.NonFiniteError`][avgfn.NonFiniteError], the state is
        kept), ``"skip"`` (the update is skipped) or ``"ignore"`` (torch's
        behaviour: the average takes the value in). Under ``vmap`` or
        ``torch.compile``, ``"raise"`` skips, replica by replica.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is an [`EMAState`][avgfn.EMAState].

    Raises:
      ValueError: ``decay`` outside ``[0, 1]``, ``start < 0``, ``every < 1``.
      TypeError: an argument of the wrong type.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.ema(0.5)
      >>> state = avg.init({"w": torch.zeros(1)})
      >>> for step, value in enumerate([4.0, 8.0, 0.0]):
      ...     params = {"w": torch.tensor([value])}
      ...     new, state = avg.update(params, state, step)
      >>> new is params, state.average["w"], int(state.count)    # 4, then 6, then 3
      (True, tensor([3.]), 3)
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a real number in [0, 1], got {type(decay).__name__} {decay!r}")
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    start, every = _check_schedule(start, every)
    _select.check_where(where)
    weight = 1 - decay

    def fold(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        del count
        return torch.lerp(average, current, weight)

    return _temporal("ema", EMAState, fold, start, every, where, nonfinite)


def swa(
    *, start: int = 0, every: int = 1, where: _select.Where = None, nonfinite: str = "raise"
) -> Averager:
    """Stochastic weight averaging: the equal-weight average of the params over steps.

    At ``step >= start`` with ``(step - start) % every == 0`` the average is
    updated as torch's default ``AveragedModel`` updates it (on CPU,
    ``get_swa_avg_fn``): the first update copies the params, later ones
    compute ``average + (params - average) / (count + 1)``. The params are
    returned untouched; read ``state.average``.

    Args:
      start: the first step that updates the average, ``>= 0`` (torch's
        examples start SWA at ``swa_start``: ``start=swa_start + 1`` for
        ``if i > swa_start``).
      every: update every ``every`` steps from ``start``, ``>= 1``.
      where: which leaves to average.
      nonfinite: as in [`ema()`][avgfn.ema].

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is an [`SWAState`][avgfn.SWAState].

    Raises:
      ValueError: ``start < 0``, ``every < 1``.
      TypeError: an argument of the wrong type.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.swa(start=1, every=2)
      >>> state = avg.init({"w": torch.zeros(1)})
      >>> for step in range(6):                       # averages the values at steps 1, 3, 5
      ...     _, state = avg.update({"w": torch.tensor([float(step)])}, state, step)
      >>> state.average["w"], int(state.count)
      (tensor([3.]), 3)
    """
    start, every = _check_schedule(start, every)
    _select.check_where(where)

    def fold(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return average + (current - average) / (count + 1)

    return _temporal("swa", SWAState, fold, start, every, where, nonfinite)
