"""SlowMo: slow momentum over a local SGD base, as fairscale defines it."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._round.engine import average_tree, reduce_round, refusing
from avgfn._core.types import Averager, Params, Reduce, timeout_of
from avgfn._core.checks import check_int, check_reduce, check_step, check_update
from avgfn._algorithms.outer import (
    all_finite,
    at_step,
    check_global_device,
    verify_first_round,
    verify_selected,
    check_match,
    OUTER_NONFINITE,
    OUTER_ROUND,
    counter,
    eager_check,
    mean_policy,
    selected,
    snapshot,
    with_settings,
    write_back,
)
from avgfn._core.errors import NonFiniteError
from avgfn._core.records import Record, record
from avgfn._round.options import Round, round_options
from avgfn.optim._base import check_float

__all__ = ["SlowMoState", "slowmo"]

LearningRate = Union[float, Callable[[int], float]]
_BASE_BUMP = torch.tensor([1, 0], dtype=torch.int64)  # added to SlowMoState.rounds by a base averaging
_SLOW_BUMP = torch.tensor([0, 1], dtype=torch.int64)  # and by a slow momentum step


@record
class SlowMoState(Record):
    """State of [`slowmo()`][avgfn.slowmo].

    Attributes:
      rounds: int64 vector ``[base, slow]``: the base averagings and the slow
        momentum steps done so far (skipped slow steps included).
      skipped: int64 count of slow steps skipped for non-finite values.
      global_params: the params at the last slow step (fairscale's
        ``old_params``), one tensor per selected leaf, in at least float32.
      momentum: the slow momentum buffers (fairscale's
        ``global_momentum_buffer``), shaped like ``global_params``.
    """

    rounds: torch.Tensor
    skipped: torch.Tensor
    global_params: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]


def _lr_value(lr: LearningRate, step: int) -> float:
    value = lr(step) if callable(lr) else lr
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"slowmo: lr(step) must return a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"slowmo: the base learning rate must be finite and > 0, got {value} at step {step}")
    return value


def _slow_step(
    state: SlowMoState, averaged: Any, lr_t: float, beta: float, slow_lr: float,
    nonfinite: str, names: Any, local: list[Any], step: int, reduce: Reduce,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:  # fmt: skip
    """fairscale's slow momentum step on the averaged params: ``(globals, momentum, ok)``.

    ``ok`` is False when the step is not finite; then the globals and the
    momentum returned are the state's own.
    """
    new_globals, new_momentum = [], []
    for x0, u, x in zip(state.global_params, state.momentum, averaged):
        x = x.to(device=x0.device, dtype=x0.dtype)
        # fairscale: gmb.mul_(beta).sub_(p, alpha=1/lr).add_(old, alpha=1/lr)
        u = torch.add(torch.sub(torch.mul(u, beta), x, alpha=1 / lr_t), x0, alpha=1 / lr_t)
        # fairscale: old.add_(gmb, alpha=-lr * slowmo_lr)
        new_globals.append(torch.add(x0, u, alpha=-lr_t * slow_lr))
        new_momentum.append(u)
    ok = all_finite(new_globals + new_momentum, step, timeout_of(reduce))  # over the shards too
    if nonfinite == "raise":
        eager_check(
            ok,
            lambda: NonFiniteError(
                "slowmo: the averaged params or the slow momentum step are not finite (inf "
                "or NaN); the slow params and momentum are unchanged (nonfinite='raise')",
                paths=tuple(n for n, x in zip(names(), local) if not bool(torch.isfinite(x).all())),
            ).at_step(step),
        )
    globals_ = tuple(torch.where(ok, n, o) for n, o in zip(new_globals, state.global_params))
    momentum_ = tuple(torch.where(ok, n, o) for n, o in zip(new_momentum, state.momentum))
    return globals_, momentum_, ok


_UPDATE = "slowmo(...).update"
"""The name of slowmo's update in the errors of its inputs."""


def slowmo(
    period: int,
    *,
    reduce: Reduce,
    lr: LearningRate,
    momentum: float = 0.5,
    slow_lr: float = 1.0,
    base_period: Optional[int] = None,
    where: _select.Where = None,
    round: Optional[Round] = None,
    global_device: Any = None,
    **deprecated: Any,
) -> Averager:
    """SlowMo (Wang et al., 2020), with local SGD as the base algorithm.

    fairscale's ``SlowMoDistributedDataParallel`` with
    ``slowmo_base_algorithm=LOCALSGD``. The replicas train locally; every
    ``base_period`` steps (at ``(step + 1) % base_period == 0``) the base
    algorithm averages their params, as local SGD does. Every ``period``
    steps (at ``(step + 1) % period == 0``) the params are averaged exactly
    and the slow momentum step is taken from the params ``x0`` of the
    previous slow step (kept in the state)::

        u  = momentum * u + (x0 - mean(x)) / lr
        x0 = x0 - lr * slow_lr * u
        x  = x0

    with ``lr`` the base optimizer's learning rate at this step. The
    arithmetic is fairscale's, operation for operation (in at least float32).
    A step where both are due averages once (as fairscale's
    memory-efficient mode does).

    With a constant ``lr`` this is [`avgfn.diloco()`][avgfn.diloco] with
    ``outer_optimizer=avgfn.optim.sgd(slow_lr, momentum=momentum)`` (up to
    rounding, plus the base averagings); with ``momentum=0`` and
    ``slow_lr=1`` it is local SGD.

    Args:
      period: steps between two slow momentum steps (fairscale's
        ``slowmo_frequency``), ``>= 1``.
      reduce: the mean over the group.
      lr: the base (inner) optimizer's learning rate, ``> 0``: a number, or a
        callable ``step -> lr`` for a schedule (fairscale reads the optimizer's
        ``param_groups[...]["lr"]`` at the slow step).
      momentum: the slow momentum ``beta`` (``slowmo_momentum``), ``>= 0``.
      slow_lr: the slow learning rate ``alpha`` (``slowmo_lr``), ``>= 0``.
      base_period: the base local SGD's averaging period
        (``localsgd_frequency``), or ``None`` for no averaging between slow
        steps.
      where: which leaves are synchronized.
      round: the [`avgfn.Round`][avgfn.Round] options, as in [`avgfn.diloco()`][avgfn.diloco]
        (``nonfinite`` is ``"raise"``, ``"skip"`` or ``"exclude"``, for the
        base rounds and the slow step; ``verify`` defaults to ``"values"``:
        the global copies, the slow params ``x0``, are compared before the
        first round of either kind, the structure at ``init``).
      global_device: where the slow params ``x0`` and the slow momentum live,
        as in [`avgfn.diloco()`][avgfn.diloco] (``None``: the params' device): the
        params are averaged on their device, the slow step runs where ``x0`` is.
      **deprecated: the round options as keywords, their spelling before
        [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`SlowMoState`][avgfn.SlowMoState].

    Raises:
      ValueError: ``period < 1``, ``base_period < 1``, a negative
        ``momentum``/``slow_lr``, an ``lr <= 0``, an unknown ``nonfinite``.
      TypeError: an argument of the wrong type, a ``global_device`` that
        names no device.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.slowmo(2, reduce=lambda t: t, lr=0.5, momentum=0.5, slow_lr=1.0)
      >>> params = {"w": torch.tensor([4.0])}
      >>> state = avg.init(params)
      >>> for step in range(4):
      ...     params, state = avg.update({"w": params["w"] - 1.0}, state, step)
      >>> params["w"], state.momentum[0]      # u = 4, then 0.5 * 4 + 4 = 6: x = 4 - 2 - 3
      (tensor([-1.]), tensor([6.]))
    """
    period = check_int("period", period, minimum=1)
    check_reduce("reduce", reduce)
    lr_spec: LearningRate = lr if callable(lr) else _lr_value(lr, 0)
    beta = check_float("momentum", momentum)
    slow_lr = check_float("slow_lr", slow_lr)
    if base_period is not None:
        base_period = check_int("base_period", base_period, minimum=1)
    _select.check_where(where)
    device = check_global_device(global_device)
    rnd = round_options(
        "slowmo", round, deprecated, nonfinite=OUTER_NONFINITE, verify="values", allowed=OUTER_ROUND
    )
    nonfinite, verify = rnd.nonfinite, rnd.verify
    slow_policy = mean_policy(nonfinite)
    rate = {} if callable(lr_spec) else {"lr": lr_spec}  # a schedule is not compared
    slow_what = with_settings("params of slowmo's slow step", None, **rate, momentum=beta, slow_lr=slow_lr)

    def init(params: Params) -> SlowMoState:
        verify_selected(params, where, reduce, verify, "slowmo")
        leaves, _, chosen = selected(params, where)
        local = [leaves[i] for i in chosen]
        globals_ = snapshot(local, device)
        return SlowMoState(
            counter(local, (2,)),
            counter(local),
            globals_,
            tuple(torch.zeros_like(g) for g in globals_),
        )

    def update(params: Params, state: SlowMoState, step: int) -> tuple[Params, SlowMoState]:
        step = check_step(step)
        slow = (step + 1) % period == 0
        base = base_period is not None and (step + 1) % base_period == 0
        if not (slow or base):
            check_update(params, state, SlowMoState, "slowmo")
            return params, state
        with refusing(reduce, rnd.agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, SlowMoState, "slowmo")
            if slow:  # (a base round averages the params, whatever the selection holds now)
                leaves, spec, chosen = selected(params, where, _UPDATE)
                local = [leaves[i] for i in chosen]
                check_match(state.global_params, local, "slowmo")
                lr_t = _lr_value(lr_spec, step)
        with at_step(step):  # before the first round of either kind mixes anything
            verify_first_round(state.rounds, state.global_params, params, where, reduce, verify, "slowmo")
        rounds = state.rounds
        if not slow:
            with at_step(step):
                new_params, _ = average_tree(params, reduce, where, rnd, None, step, "params of slowmo", _UPDATE)
            return new_params, state.replace(rounds=rounds + _BASE_BUMP.to(rounds.device))
        names = _tree.lazy_paths(params, chosen)
        with at_step(step):
            averaged, _ = reduce_round(local, reduce, rnd, step=step, names=names, policy=slow_policy, what=slow_what)
        kept, momentum_, ok = _slow_step(state, averaged, lr_t, beta, slow_lr, nonfinite, names, local, step, reduce)
        new_params = write_back(leaves, spec, chosen, kept)
        skipped = state.skipped + (~ok).to(state.skipped.device, state.skipped.dtype)
        return new_params, SlowMoState(rounds + _SLOW_BUMP.to(rounds.device), skipped, kept, momentum_)

    return Averager(init=init, update=update)
