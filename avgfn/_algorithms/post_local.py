"""Post-local SGD: one description, one switch step, for gradients and params.

torch splits post-local SGD across a DDP communication hook
(``PostLocalSGDState(start_localSGD_iter=...)``) and a model averager
(``PeriodicModelAverager(warmup_steps=...)``), two objects whose counters the
user keeps equal by hand. Here [`post_local_sgd()`][avgfn.post_local_sgd] builds both halves from
one ``start_step``, and both read the same ``step`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Protocol

import attrs
import torch

from avgfn._core import select as _select
from avgfn._round.engine import average_tree, refusing
from avgfn._round.options import Round
from avgfn._core.types import Averager, Params, Reduce
from avgfn._core.checks import check_int, check_reduce, check_state, check_step, check_update
from avgfn._core.levels import Levels
from avgfn._algorithms.hierarchical import hierarchical
from avgfn._algorithms.periodic import periodic
from avgfn._core.records import Record, record


_GRADIENT_ROUND = Round(nonfinite="ignore")
"""Gradients are averaged as torch averages them: no non-finite check (a GradScaler checks)."""


@record
class GradientScheduleState(Record):
    """State of a [`GradientSchedule`][avgfn.GradientSchedule].

    Attributes:
      rounds: int64 vector ``[global, local]``: how many times the gradients
        were averaged over the global and over the local Reduce.
    """

    rounds: torch.Tensor


class GradUpdateFn(Protocol):
    """``(grads, state, step) -> (grads, state)``: the gradient averaging due at ``step``."""

    def __call__(self, grads: Params, state: Any, step: int, /) -> tuple[Params, Any]:
        """Return the gradients averaged as the schedule says for ``step``."""
        ...


@attrs.frozen
class GradientSchedule:
    """Which Reduce averages the gradients at each step.

    Attributes:
      init: ``init(grads_or_params) -> GradientScheduleState``.
      update: ``update(grads, state, step) -> (grads, state)``: before
        ``start_step`` the selected gradients are averaged over
        ``global_reduce``, from ``start_step`` on over ``local_reduce``, or
        returned as they are when ``local_reduce`` is ``None``. Pure, like an
        averager's update.
      reduce_at: ``reduce_at(step) -> Reduce | None``: the Reduce ``update``
        uses at ``step`` (what a DDP communication hook needs).
      start_step: the first step of the local phase.
      where: the gradient selection (see [`avgfn.average()`][avgfn.average]).
    """

    init: Callable[[Params], GradientScheduleState]
    update: GradUpdateFn
    reduce_at: Callable[[int], Optional[Reduce]]
    start_step: int
    where: Any


def post_local_gradients(
    start_step: int,
    *,
    global_reduce: Reduce,
    local_reduce: Optional[Reduce],
    where: _select.Where = None,
) -> GradientSchedule:
    """The gradient half of post-local SGD, as a pure schedule.

    Reproduces what torch's ``post_localSGD_hook`` does to the gradients: at
    the 0-based iteration ``step``, gradients are averaged over
    ``global_reduce`` while ``step < start_step`` and over ``local_reduce``
    from then on; ``local_reduce=None`` is torch's
    ``post_local_gradient_allreduce=False`` (no gradient averaging at all in
    the local phase).

    Most users want [`post_local_sgd()`][avgfn.post_local_sgd], which also builds the matching
    parameter averager.

    Args:
      start_step: the first step of the local phase, ``>= 0`` (torch's
        ``start_localSGD_iter``).
      global_reduce: the mean over all replicas (torch's ``process_group``).
      local_reduce: the mean over the local group, e.g. the ranks of one node
        (torch's ``subgroup``), or ``None`` for no gradient averaging after
        ``start_step``. There is no default: torch's ``subgroup=None`` means
        "one group per node", avgfn's ``None`` means "no group", so the choice
        is spelled out.
      where: which gradient leaves to average (see [`avgfn.average()`][avgfn.average]).

    Returns:
      A [`GradientSchedule`][avgfn.GradientSchedule].

    Raises:
      ValueError: ``start_step < 0``.
      TypeError: a non-integer ``start_step``, a non-callable Reduce.

    Examples:
      >>> import torch, avgfn
      >>> world, node = avgfn.testing.RecordingReduce(), avgfn.testing.RecordingReduce()
      >>> sched = avgfn.post_local_gradients(2, global_reduce=world, local_reduce=node)
      >>> grads = {"w": torch.ones(3)}
      >>> state = sched.init(grads)
      >>> for step in range(5):
      ...     _, state = sched.update(grads, state, step)
      >>> world.calls, node.calls, state.rounds.tolist()
      (2, 3, [2, 3])
    """
    start_step = check_int("start_step", start_step, minimum=0)
    check_reduce("global_reduce", global_reduce)
    if local_reduce is not None:
        check_reduce("local_reduce", local_reduce)
    _select.check_where(where)
    global_bump = torch.tensor([1, 0], dtype=torch.int64)
    local_bump = torch.tensor([0, 1], dtype=torch.int64)

    def reduce_at(step: int) -> Optional[Reduce]:
        step = check_step(step)
        return global_reduce if step < start_step else local_reduce

    def init(grads: Params) -> GradientScheduleState:
        del grads
        return GradientScheduleState(torch.zeros(2, dtype=torch.int64))

    def update(
        grads: Params, state: GradientScheduleState, step: int
    ) -> tuple[Params, GradientScheduleState]:
        step = check_step(step)
        reduce = global_reduce if step < start_step else local_reduce
        if reduce is None:
            check_state(state, GradientScheduleState, "post_local_gradients")
            return grads, state
        with refusing(reduce, _GRADIENT_ROUND.agree, step):  # the peers are in the round: they learn of it at once
            check_update(grads, state, GradientScheduleState, "post_local_gradients")
        # No non-finite check: like DDP's all-reduce, the schedule hands an inf
        # on, so that a GradScaler-style check after it sees it on every replica.
        new_grads, _ = average_tree(
            grads, reduce, where, _GRADIENT_ROUND, None, step, what="gradients of post_local_gradients"
        )
        bump = global_bump if step < start_step else local_bump
        return new_grads, GradientScheduleState(state.rounds + bump.to(state.rounds.device))

    return GradientSchedule(
        init=init, update=update, reduce_at=reduce_at, start_step=start_step, where=where
    )


@attrs.frozen
class PostLocalSGD:
    """Post-local SGD as one description: both halves and their one switch step.

    Attributes:
      start_step: the first step of the local phase.
      gradients: the [`GradientSchedule`][avgfn.GradientSchedule] (global, then local averaging
        of the gradients).
      averager: the [`avgfn.Averager`][avgfn.Averager] of the params, whose warm-up is
        ``start_step``.
    """

    start_step: int
    gradients: GradientSchedule
    averager: Averager


def post_local_sgd(
    start_step: int,
    *,
    global_reduce: Reduce,
    local_reduce: Optional[Reduce],
    period: Optional[int] = None,
    levels: Optional[Levels] = None,
    where: _select.Where = None,
    **averager_options: Any,
) -> PostLocalSGD:
    """Post-local SGD (Lin et al., "Don't use large mini-batches, use local SGD").

    Until ``start_step`` the replicas train as plain data parallel (gradients
    averaged over ``global_reduce`` at every step, no parameter averaging).
    From ``start_step`` on, gradients are averaged only over ``local_reduce``
    (or not at all), and the parameters are averaged every ``period`` steps over
    ``global_reduce`` (or hierarchically, over ``levels``).

    The torch equivalent is three objects that must agree:
    ``PostLocalSGDState(process_group, subgroup, start_localSGD_iter)`` with
    ``post_localSGD_hook``, and ``PeriodicModelAverager(period, warmup_steps)``
    (or ``HierarchicalModelAverager``) inside a ``PostLocalSGDOptimizer``. Here
    the switch step is given once, so the two halves cannot disagree, and both
    are driven by the same ``step`` argument.

    Args:
      start_step: the first step of the local phase, ``>= 0``: torch's
        ``start_localSGD_iter`` and the averager's ``warmup_steps`` at once.
      global_reduce: the mean over all replicas.
      local_reduce: the mean over a local group (e.g. one node), or ``None``
        for no gradient averaging in the local phase (torch's
        ``post_local_gradient_allreduce=False``). Required, see
        [`post_local_gradients()`][avgfn.post_local_gradients].
      period: average the params over ``global_reduce`` every ``period``
        steps from ``start_step`` ([`avgfn.periodic()`][avgfn.periodic]).
      levels: instead of ``period``: ``(period, reduce)`` levels for
        [`avgfn.hierarchical()`][avgfn.hierarchical] (``avgfn.collectives.hierarchy`` builds
        them), with ``start_step`` as the warm-up.
      where: which leaves (gradients and params alike) are replicated and
        averaged (see [`avgfn.average()`][avgfn.average]).
      **averager_options: passed on to [`avgfn.periodic()`][avgfn.periodic] or
        [`avgfn.hierarchical()`][avgfn.hierarchical] (their options for the parameter rounds).

    Returns:
      A [`PostLocalSGD`][avgfn.PostLocalSGD] with ``.gradients`` and ``.averager``.

    Raises:
      ValueError: ``start_step < 0``, both or neither of ``period`` and
        ``levels``, or what [`avgfn.periodic()`][avgfn.periodic] / [`avgfn.hierarchical()`][avgfn.hierarchical]
        refuse.
      TypeError: a non-callable Reduce, or a non-integer ``start_step`` or ``period``.

    Examples:
      >>> import torch, avgfn
      >>> world, node = avgfn.testing.RecordingReduce(), avgfn.testing.RecordingReduce()
      >>> algo = avgfn.post_local_sgd(4, global_reduce=world, local_reduce=node, period=3)
      >>> params = {"w": torch.zeros(2)}
      >>> g_state, a_state = algo.gradients.init(params), algo.averager.init(params)
      >>> for step in range(10):
      ...     grads, g_state = algo.gradients.update({"w": torch.ones(2)}, g_state, step)
      ...     params, a_state = algo.averager.update(params, a_state, step)
      >>> g_state.rounds.tolist(), int(a_state.rounds)   # params averaged at 4 and 7
      ([4, 6], 2)
    """
    start_step = check_int("start_step", start_step, minimum=0)
    if (period is None) == (levels is None):
        raise ValueError(
            "post_local_sgd: give exactly one of period (periodic averaging) and levels "
            f"(hierarchical averaging), got period={period!r}, levels={levels!r}"
        )
    gradients = post_local_gradients(
        start_step, global_reduce=global_reduce, local_reduce=local_reduce, where=where
    )
    if period is not None:
        averager = periodic(
            period, reduce=global_reduce, warmup_steps=start_step, where=where, **averager_options
        )
    else:
        averager = hierarchical(
            levels, warmup_steps=start_step, where=where, **averager_options  # type: ignore[arg-type]
        )
    return PostLocalSGD(start_step=start_step, gradients=gradients, averager=averager)


def unpack(averager: Any, gradients: Any, who: str) -> tuple[Any, Any]:
    """``(averager, gradients)`` from either an averager or a [`PostLocalSGD`][avgfn.PostLocalSGD].

    A PostLocalSGD carries its own gradient schedule, so passing ``gradients``
    as well is refused (``who`` names the caller in the message).
    """
    if isinstance(averager, PostLocalSGD):
        if gradients is not None:
            raise TypeError(
                f"{who}: averager is a PostLocalSGD, which carries its own gradient "
                "schedule; do not pass gradients= as well"
            )
        return averager.averager, averager.gradients
    return averager, gradients
