"""Periodic model averaging: torch's ``PeriodicModelAverager``, made pure."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core.traced import zeros_like_batch
from avgfn._round.engine import Averaging, refusing
from avgfn._core.types import Averager, Params, Reduce
from avgfn._core.checks import (
    check_has_tensor,
    check_int,
    check_params,
    check_reduce,
    check_step,
    check_update,
)
from avgfn._core.levels import PERIOD_ONE
from avgfn._core.records import Record, record
from avgfn._round.agree import verify as verify_replicas
from avgfn._round.options import NONFINITE, Round, round_options



@record
class PeriodicState(Record):
    """State of [`periodic()`][avgfn.periodic].

    Attributes:
      rounds: int64 count of the averaging rounds done so far.
      residual: with ``error_feedback=True``, the rounding error of this
        replica's last reduced-precision round: a tuple with one tensor per
        floating-point leaf of the params, in tree order; else ``None``.
    """

    rounds: torch.Tensor
    residual: Any


def periodic(
    period: int,
    *,
    reduce: Reduce,
    warmup_steps: int = 0,
    where: _select.Where = None,
    round: Optional[Round] = None,
    **deprecated: Any,
) -> Averager:
    """Average the params every ``period`` steps after a warm-up.

    Reproduces torch's
    ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``:
    averaging happens at ``step >= warmup_steps`` with
    ``(step - warmup_steps) % period == 0``. Passing the 0-based iteration index
    as ``step`` matches torch's internal counter exactly.

    Args:
      period: steps between two averagings, ``>= 1`` (``1`` warns, as torch does).
      reduce: the mean over the group (see [`avgfn.Reduce`][avgfn.Reduce]).
      warmup_steps: steps before the first averaging, ``>= 0``.
      where: which leaves to average (see [`avgfn.average()`][avgfn.average]).
      round: the [`avgfn.Round`][avgfn.Round] options of each round (donation,
        buckets, wire dtype, error feedback, ``nonfinite`` policy, the
        ``verify`` check at ``init``, the per-round agreement). Accepts every
        ``nonfinite`` policy: ``"raise"``, ``"skip"``, ``"exclude"``, ``"ignore"``.
      **deprecated: the round options as keywords (``donate=True``...), their
        spelling before [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`PeriodicState`][avgfn.PeriodicState].

    Raises:
      ValueError: ``period < 1`` or ``warmup_steps < 0``.
      TypeError: a non-integer ``period``/``warmup_steps`` (a float, a bool...),
        or a non-callable ``reduce``.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.periodic(4, reduce=lambda t: t, warmup_steps=2)
      >>> params = {"w": torch.zeros(2)}
      >>> state = avg.init(params)
      >>> due = []
      >>> for step in range(12):
      ...     new, state = avg.update(params, state, step)
      ...     due.append(new is not params)
      >>> [s for s, d in enumerate(due) if d]
      [2, 6, 10]
      >>> int(state.rounds)
      3
    """
    period = check_int("period", period, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    check_reduce("reduce", reduce)
    rnd = round_options("periodic", round, deprecated, nonfinite=NONFINITE)
    averaging = Averaging(where, rnd, "periodic")
    if period == 1:
        warnings.warn(PERIOD_ONE.format(what="period"), UserWarning, stacklevel=2)

    def init(params: Params) -> PeriodicState:
        check_params(params, "periodic(...).init")
        check_has_tensor(_tree.tree_leaves(params), "periodic(...).init")
        verify_replicas(params, reduce, rnd.verify)
        rounds = zeros_like_batch(_tree.tree_leaves(params), device="cpu")  # vmap: update's strides
        return PeriodicState(rounds, averaging.init_residual(params))

    def update(params: Params, state: PeriodicState, step: int) -> tuple[Params, PeriodicState]:
        step = check_step(step)
        due = step >= warmup_steps and (step - warmup_steps) % period == 0
        if not due:
            check_update(params, state, PeriodicState, "periodic")
            return params, state
        with refusing(reduce, rnd.agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, PeriodicState, "periodic")
        new_params, residual = averaging(params, reduce, state.residual, step)
        return new_params, PeriodicState(state.rounds + 1, residual)

    return Averager(init=init, update=update)
