"""Hierarchical model averaging: torch's ``HierarchicalModelAverager``, made pure."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from avgfn import _select
from avgfn._average import Averaging
from avgfn._base import Averager, Params, Reduce, check_int, check_reduce, check_state, check_step
from avgfn._periodic import _PERIOD_ONE
from avgfn._records import record
from avgfn._verify import check_mode, verify as verify_replicas

Levels = Union[Mapping[int, Any], Sequence[tuple[int, Any]]]
"""``(period, value)`` pairs in strictly increasing period, or a mapping period -> value."""


def level_pairs(levels: Levels, name: str = "levels") -> list[tuple[int, Any]]:
    """Validate ``levels`` and return them as a list of ``(period, value)`` pairs.

    Checks what both :func:`hierarchical` and the ``hierarchy`` builders need:
    non-empty, periods ints with the first ``> 0``, strictly increasing.
    Warns, as torch does, when the largest period is 1.
    """
    if isinstance(levels, Mapping):
        pairs = list(levels.items())
    elif isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(
            f"{name} must be a sequence of (period, value) pairs or a mapping period -> value, "
            f"got {type(levels).__name__}"
        )
    else:
        pairs = []
        for item in levels:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(f"{name} must hold (period, value) pairs, got {item!r}")
            pairs.append((item[0], item[1]))
    if not pairs:
        raise ValueError(f"{name} must not be empty, got {levels!r}")
    periods = []
    for period, _ in pairs:
        if isinstance(period, bool) or not isinstance(period, int):
            raise TypeError(f"the periods of {name} must be ints, got {period!r}")
        periods.append(period)
    if periods[0] <= 0:
        raise ValueError(f"the first period of {name} must be > 0, got {periods[0]} in {periods}")
    for a, b in zip(periods, periods[1:]):
        if b <= a:
            raise ValueError(
                f"the periods of {name} must be strictly increasing, got {periods}"
            )
    if periods[-1] == 1:
        warnings.warn(_PERIOD_ONE.format(what=f"the largest period of {name}"), UserWarning, stacklevel=3)
    return pairs


def group_sizes(
    period_group_sizes: Levels, total: int, total_name: str
) -> list[tuple[int, int]]:
    """Validate ``period -> group size`` levels against a group of ``total`` replicas.

    The shared checks of ``collectives.hierarchy`` and ``simulate.hierarchy``:
    the periods as :func:`level_pairs` checks them, every size an int ``>= 1``
    dividing ``total``, and the last size equal to ``total`` (``total_name``
    says what ``total`` is in the messages).
    """
    pairs = level_pairs(period_group_sizes, "period_group_sizes")
    for period, size in pairs:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"period_group_sizes: the group size of period {period} must be an int >= 1, "
                f"got {size!r}"
            )
        if total % size:
            raise ValueError(
                f"period_group_sizes: the group size {size} of period {period} does not divide "
                f"{total_name}, {total}"
            )
    if pairs[-1][1] != total:
        raise ValueError(
            f"period_group_sizes: the last group size must equal {total_name}, {total}; "
            f"got {pairs[-1][1]}"
        )
    return pairs


@record
class HierarchicalState:
    """State of :func:`hierarchical`.

    Attributes:
      rounds: int64 vector, the averaging rounds done so far at each level.
      residual: the error-feedback residual (see :class:`PeriodicState`).
    """

    rounds: torch.Tensor
    residual: Any = None


def hierarchical(
    levels: Levels,
    *,
    warmup_steps: int = 0,
    where: _select.Where = None,
    donate: bool = False,
    bucket_bytes: Optional[int] = None,
    comm_dtype: Optional[torch.dtype] = None,
    error_feedback: bool = False,
    nonfinite: str = "raise",
    verify: Optional[str] = "structure",
) -> Averager:
    """Average at several levels of a hierarchy of groups, each with its own period.

    Reproduces torch's ``torch.distributed.algorithms.model_averaging.
    hierarchical_model_averager.HierarchicalModelAverager``: at
    ``step >= warmup_steps`` it averages with the level of the largest period
    that divides ``step`` (``step % period == 0``, not offset by the warm-up,
    exactly as torch), and does nothing when no period divides ``step``.

    Args:
      levels: ``(period, reduce)`` pairs in strictly increasing period, or a
        mapping ``period -> reduce``. ``avgfn.collectives.hierarchy`` and
        ``avgfn.simulate.hierarchy`` build them from group sizes.
      warmup_steps: steps before the first averaging, ``>= 0``.
      where: which leaves to average (see :func:`avgfn.average`).
      donate: as in :func:`avgfn.periodic`.
      bucket_bytes: as in :func:`avgfn.periodic`.
      comm_dtype: as in :func:`avgfn.periodic`.
      error_feedback: as in :func:`avgfn.periodic`.
      nonfinite: as in :func:`avgfn.periodic`.
      verify: as in :func:`avgfn.periodic`, through the largest level's group.

    Returns:
      An :class:`avgfn.Averager` whose state is a :class:`HierarchicalState`.

    Raises:
      ValueError: empty or non-increasing ``levels``, a first period ``<= 0``,
        ``warmup_steps < 0``.
      TypeError: a non-int period, a non-callable reduce.

    Examples:
      >>> import torch, avgfn
      >>> local, world = avgfn.testing.RecordingReduce(), avgfn.testing.RecordingReduce()
      >>> avg = avgfn.hierarchical([(2, local), (6, world)], warmup_steps=3)
      >>> params = {"w": torch.zeros(2)}
      >>> state = avg.init(params)
      >>> for step in range(13):
      ...     params, state = avg.update(params, state, step)
      >>> local.calls, world.calls          # local at 4, 8, 10; world at 6, 12
      (3, 2)
      >>> state.rounds.tolist()
      [3, 2]
    """
    pairs = level_pairs(levels)
    for period, reduce in pairs:
        check_reduce(f"the reduce of the level with period {period}", reduce)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    averaging = Averaging(where, donate, bucket_bytes, comm_dtype, error_feedback, nonfinite)
    verify = check_mode(verify)
    top_reduce = pairs[-1][1]
    # Largest period first: the first that divides ``step`` is the one to use.
    by_largest = [(i, period, reduce) for i, (period, reduce) in reversed(list(enumerate(pairs)))]
    num_levels = len(pairs)

    def init(params: Params) -> HierarchicalState:
        verify_replicas(params, top_reduce, verify)
        return HierarchicalState(
            torch.zeros(num_levels, dtype=torch.int64), averaging.init_residual(params)
        )

    def update(
        params: Params, state: HierarchicalState, step: int
    ) -> tuple[Params, HierarchicalState]:
        check_state(state, HierarchicalState, "hierarchical")
        step = check_step(step)
        if step < warmup_steps:
            return params, state
        for level, period, reduce in by_largest:
            if step % period == 0:
                break
        else:
            return params, state
        new_params, residual = averaging(params, reduce, state.residual, step)
        rounds = state.rounds
        bump = torch.arange(num_levels, device=rounds.device) == level
        return new_params, HierarchicalState(rounds + bump, residual)

    return Averager(init=init, update=update)
