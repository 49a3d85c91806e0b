"""Periodic model averaging: torch's ``PeriodicModelAverager``, made pure."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from avgfn import _select
from avgfn._average import Averaging
from avgfn._base import Averager, Params, Reduce, check_int, check_reduce, check_state, check_step
from avgfn._records import record
from avgfn._verify import check_mode, verify as verify_replicas

_PERIOD_ONE = (
    "{what} is 1: averaging parameters every step costs as much communication as "
    "all-reducing gradients every step (plain data parallel) and gains nothing over it"
)


@record
class PeriodicState:
    """State of :func:`periodic`.

    Attributes:
      rounds: int64 count of the averaging rounds done so far.
      residual: with ``error_feedback=True``, the rounding error of this
        replica's last reduced-precision round: a tuple with one tensor per
        floating-point leaf of the params, in tree order; else ``None``.
    """

    rounds: torch.Tensor
    residual: Any = None


def periodic(
    period: int,
    *,
    reduce: Reduce,
    warmup_steps: int = 0,
    where: _select.Where = None,
    donate: bool = False,
    bucket_bytes: Optional[int] = None,
    comm_dtype: Optional[torch.dtype] = None,
    error_feedback: bool = False,
    nonfinite: str = "raise",
    verify: Optional[str] = "structure",
) -> Averager:
    """Average the params every ``period`` steps after a warm-up.

    Reproduces torch's
    ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``:
    averaging happens at ``step >= warmup_steps`` with
    ``(step - warmup_steps) % period == 0``. Passing the 0-based iteration index
    as ``step`` matches torch's internal counter exactly.

    Args:
      period: steps between two averagings, ``>= 1`` (``1`` warns, as torch does).
      reduce: the mean over the group (see :class:`avgfn.Reduce`).
      warmup_steps: steps before the first averaging, ``>= 0``.
      where: which leaves to average (see :func:`avgfn.average`).
      donate: ``update`` consumes the params it is given and writes the
        average into them (see ``docs/performance.md``).
      bucket_bytes: stage at most this many bytes per round (see
        :func:`avgfn.average`).
      comm_dtype: the dtype on the wire, e.g. ``torch.bfloat16``.
      error_feedback: with ``comm_dtype``, carry each round's rounding error
        into the next round (kept in ``state.residual``).
      nonfinite: ``"raise"`` (default), ``"exclude"`` or ``"ignore"``: see
        :func:`avgfn.average`.
      verify: what ``init`` checks the replicas agree on, through a Reduce
        that can compare them (``collectives.all_reduce_mean`` can; then
        ``init`` is a collective): ``"structure"`` (paths, shapes, dtypes;
        default), ``"values"`` (also identical starting values) or ``None``.

    Returns:
      An :class:`avgfn.Averager` whose state is a :class:`PeriodicState`.

    Raises:
      ValueError: ``period < 1`` or ``warmup_steps < 0``.
      TypeError: a non-int ``period``/``warmup_steps``, or a non-callable ``reduce``.

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
    averaging = Averaging(where, donate, bucket_bytes, comm_dtype, error_feedback, nonfinite)
    verify = check_mode(verify)
    if period == 1:
        warnings.warn(_PERIOD_ONE.format(what="period"), UserWarning, stacklevel=2)

    def init(params: Params) -> PeriodicState:
        verify_replicas(params, reduce, verify)
        return PeriodicState(torch.zeros((), dtype=torch.int64), averaging.init_residual(params))

    def update(params: Params, state: PeriodicState, step: int) -> tuple[Params, PeriodicState]:
        check_state(state, PeriodicState, "periodic")
        step = check_step(step)
        if step < warmup_steps or (step - warmup_steps) % period:
            return params, state
        new_params, residual = averaging(params, reduce, state.residual, step)
        return new_params, PeriodicState(state.rounds + 1, residual)

    return Averager(init=init, update=update)
