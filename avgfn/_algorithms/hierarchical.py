"""Hierarchical model averaging: torch's ``HierarchicalModelAverager``, made pure."""

from __future__ import annotations

from typing import Any, Optional

import torch

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core.traced import zeros_like_batch
from avgfn._round.engine import Averaging, refusing
from avgfn._core.types import Averager, Params
from avgfn._core.checks import (
    check_has_tensor,
    check_int,
    check_params,
    check_reduce,
    check_step,
    check_update,
)
from avgfn._core.levels import Levels, level_pairs
from avgfn._core.records import Record, record
from avgfn._round.agree import verify as verify_replicas
from avgfn._round.options import NONFINITE, Round, round_options

@record
class HierarchicalState(Record):
    """State of [`hierarchical()`][avgfn.hierarchical].

    Attributes:
      rounds: int64 vector, the averaging rounds done so far at each level.
      residual: the error-feedback residual (see [`PeriodicState`][avgfn.PeriodicState]).
    """

    rounds: torch.Tensor
    residual: Any


def hierarchical(
    levels: Levels,
    *,
    warmup_steps: int = 0,
    where: _select.Where = None,
    round: Optional[Round] = None,
    **deprecated: Any,
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
      where: which leaves to average (see [`avgfn.average()`][avgfn.average]).
      round: the [`avgfn.Round`][avgfn.Round] options of each round (donation,
        buckets, wire dtype, error feedback, ``nonfinite`` policy, the
        ``verify`` check at ``init``, through the largest level's group, the per-round agreement). Accepts every
        ``nonfinite`` policy: ``"raise"``, ``"skip"``, ``"exclude"``, ``"ignore"``.
      **deprecated: the round options as keywords (``donate=True``...), their
        spelling before [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`HierarchicalState`][avgfn.HierarchicalState].

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
    rnd = round_options("hierarchical", round, deprecated, nonfinite=NONFINITE)
    averaging = Averaging(where, rnd, "hierarchical")
    top_reduce = pairs[-1][1]
    # Largest period first: the first that divides ``step`` is the one to use.
    by_largest = [(i, period, reduce) for i, (period, reduce) in reversed(list(enumerate(pairs)))]
    num_levels = len(pairs)

    def init(params: Params) -> HierarchicalState:
        check_params(params, "hierarchical(...).init")
        check_has_tensor(_tree.tree_leaves(params), "hierarchical(...).init")
        verify_replicas(params, top_reduce, rnd.verify)
        return HierarchicalState(
            # batched under vmap, so vmap(init) gives the strides update returns
            zeros_like_batch(_tree.tree_leaves(params), (num_levels,), device="cpu"),
            averaging.init_residual(params),
        )

    def update(
        params: Params, state: HierarchicalState, step: int
    ) -> tuple[Params, HierarchicalState]:
        step = check_step(step)
        due = None
        if step >= warmup_steps:
            for level, period, reduce in by_largest:
                if step % period == 0:
                    due = (level, reduce)
                    break
        if due is None:
            check_update(params, state, HierarchicalState, "hierarchical")
            return params, state
        level, reduce = due
        with refusing(reduce, rnd.agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, HierarchicalState, "hierarchical")
            rounds = state.rounds
            if rounds.shape != (num_levels,):
                raise ValueError(
                    f"hierarchical: the state counts rounds for {rounds.numel()} levels but this averager "
                    f"has {num_levels} (was the state made by this averager's init?)"
                )
        new_params, residual = averaging(params, reduce, state.residual, step)
        bump = torch.arange(num_levels, device=rounds.device) == level
        return new_params, HierarchicalState(rounds + bump, residual)

    return Averager(init=init, update=update)
