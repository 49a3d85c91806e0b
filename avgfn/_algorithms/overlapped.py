"""Overlapped DiLoCo: the outer step of a round applied one round late, plain or eager."""

from __future__ import annotations

from typing import Any, Optional

import torch

from avgfn._algorithms.outer import (
    NOTHING_IN_FLIGHT,
    at_step,
    check_global_device,
    check_match,
    counter,
    held_for,
    outer_apply,
    outer_options,
    plain_mean,
    pseudo_gradient,
    selected,
    snapshot,
    verify_first_round,
    verify_selected,
    write_back,
    with_settings,
)
from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core import types as _types
from avgfn._core.checks import check_int, check_reduce, check_step, check_update
from avgfn._core.records import Record, record
from avgfn._core.types import Averager, Params, Reduce, timeout_of
from avgfn._round.engine import refusing
from avgfn._round.options import Round
from avgfn.optim._base import Optimizer

__all__ = ["OverlappedDiLoCoState", "overlapped_diloco"]


@record
class OverlappedDiLoCoState(Record):
    """State of [`overlapped_diloco()`][avgfn.overlapped_diloco].

    Attributes:
      rounds: int64 count of the sync steps done (the first, which has
        nothing to apply, and skipped ones included).
      skipped: int64 count of the outer steps skipped (a non-finite
        pseudo-gradient, or nothing in flight to apply).
      global_params: this replica's global copy of the params, one tensor per
        selected leaf in tree order, in at least float32. With ``eager=True``
        each replica's copy holds its own pseudo-gradient one round before the
        others', so the copies differ between replicas after the first round.
      outer: the outer optimizer's state over ``global_params``.
      pending: the group mean of the pseudo-gradients started at the last sync
        step (one tensor per selected leaf, in the global copy's dtype), read
        at the next one. It may be a tensor still in flight (see
        ``docs/overlapped_diloco.md``).
      own: with ``eager=True``, this replica's pseudo-gradient of that round,
        whose share of ``pending`` it has applied already; ``None`` otherwise.
      in_flight: int64 1-element tensor, the sync step at which ``pending``
        was started, ``[-1]`` once it was applied (or before the first start).
    """

    rounds: torch.Tensor
    skipped: torch.Tensor
    global_params: tuple[torch.Tensor, ...]
    outer: Any
    pending: tuple[torch.Tensor, ...]
    own: Any
    in_flight: torch.Tensor


def overlapped_diloco(
    period: int,
    *,
    reduce: Reduce,
    eager: bool = True,
    num_replicas: Optional[int] = None,
    outer_optimizer: Optional[Optimizer] = None,
    where: _select.Where = None,
    round: Optional[Round] = None,
    global_device: Any = None,
) -> Averager:
    """DiLoCo whose outer step is applied one round late (Kale et al., 2025).

    As in [`avgfn.diloco()`][avgfn.diloco], the sync steps are those with
    ``(step + 1) % period == 0``, and at a sync step ``t`` each replica ``m``
    forms its pseudo-gradient ``delta_m(t) = global(t-1) - local_m``. Here its
    group mean ``delta(t)`` is only *started* at step ``t``: it stays in the
    state (``state.pending``) while the next ``period`` local steps run, and
    is applied at the next sync step. So a sync step does two things: it
    starts the mean of this round and applies an outer step with what the
    previous round started (arXiv 2502.12996, section 2):

    * ``eager=False``, the one-step delayed outer step (the paper's "delayed
      outer gradients"): ``global(t) = OuterOpt(global(t-1), delta(t-1))``;
      at the first sync step there is nothing to apply yet, and the outer
      step is skipped.
    * ``eager=True`` ("eager updates", the paper's proposal): the replica's
      own pseudo-gradient of this round stands in for its share of the
      missing mean, and the others' shares come from the previous round:
      ``global_m(t) = OuterOpt(global_m(t-1), d_m(t))`` with
      ``d_m(t) = delta_m(t) / M + sum_{j != m} delta_j(t-1) / M``, computed as
      ``(delta(t-1) - delta_m(t-1) / M) + delta_m(t) / M`` (``M`` replicas;
      ``delta(0) = delta_m(0) = 0``). Every pseudo-gradient is applied once:
      a replica's own at once, the others' one round late. The global copies
      then differ between replicas by their last own shares.

    In both, the local params restart from the new global copy. With one
    replica the eager variant is [`avgfn.diloco()`][avgfn.diloco] (bit for bit: the
    delayed term is exactly zero).

    The average applied is tagged with its start step (``state.in_flight``)
    and consumed once: if the previous sync step was not run with this state
    (a skipped step after a failure), the older average it holds is stale and
    dropped, and nothing delayed is applied (eager: only the own share); a
    state whose average was started at this step or later (its average was
    applied already) is refused with ``ValueError``.

    Args:
      period: the local steps between two sync steps (``H``), ``>= 1``.
      reduce: the mean over the group (see [`avgfn.Reduce`][avgfn.Reduce]).
      eager: ``True`` for eager updates, ``False`` for the plain one-round delay.
      num_replicas: ``M`` for ``eager=True``; default: the size of the group
        of ``reduce`` (a [`avgfn.GroupReduce`][avgfn.GroupReduce] such as
        [`avgfn.collectives.all_reduce_mean()`][avgfn.collectives.all_reduce_mean]). A plain
        Reduce cannot tell it: pass it. Ignored with ``eager=False``.
      outer_optimizer: any [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer]; default
        ``avgfn.optim.sgd(0.7, momentum=0.9, nesterov=True)``.
      where: which leaves are synchronized (see [`avgfn.average()`][avgfn.average]).
      round: the [`avgfn.Round`][avgfn.Round] options of the round that averages the
        pseudo-gradients, as in [`avgfn.diloco()`][avgfn.diloco]. With
        ``nonfinite="raise"`` the mean is checked where it is read, at the
        next sync step (with ``eager=True`` the own share at once).
      global_device: where the global copy and the outer state live, as in
        [`avgfn.diloco()`][avgfn.diloco] (``None``: the params' device); the
        pseudo-gradients and the mean in flight (``state.pending``,
        ``state.own``) stay on the params' device.

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is an [`OverlappedDiLoCoState`][avgfn.OverlappedDiLoCoState].

    Raises:
      ValueError: ``period < 1``; ``num_replicas < 1``; ``eager=True`` with a
        plain Reduce and no ``num_replicas``; from ``update``, a state whose
        average was started at this sync step or a later one.
      TypeError: a non-integer ``period`` or ``num_replicas``, a non-bool
        ``eager``, a non-callable ``reduce``, a ``global_device`` that names
        no device.
      NonFiniteError: from ``update``, with ``nonfinite="raise"``.

    Examples:
      >>> import torch, avgfn
      >>> peer = lambda t: torch.zeros_like(t)          # the other replica's pseudo-gradient
      >>> avg = avgfn.overlapped_diloco(2, reduce=avgfn.testing.peers_mean(peer), num_replicas=2,
      ...                               outer_optimizer=avgfn.optim.sgd(1.0))
      >>> params = {"w": torch.tensor([1.0])}
      >>> state = avg.init(params)
      >>> for step in range(2):
      ...     params = {"w": params["w"] - 0.5}            # a local step
      ...     params, state = avg.update(params, state, step)
      >>> params["w"], state.pending[0], state.in_flight   # 1 - 1.0 / 2: its own share
      (tensor([0.5000]), tensor([0.5000]), tensor([1]))
    """
    period = check_int("period", period, minimum=1)
    check_reduce("reduce", reduce)
    if not isinstance(eager, bool):
        raise TypeError(f"eager must be a bool, got {type(eager).__name__} {eager!r}")
    replicas = 1
    if eager:
        if num_replicas is None:
            group = _types.group_of(reduce)
            if group is None:
                raise ValueError(
                    "overlapped_diloco(eager=True) needs the number of replicas M: pass "
                    "num_replicas=M (a plain Reduce cannot tell its group size), or a group-backed "
                    "Reduce such as avgfn.collectives.all_reduce_mean()"
                )
            num_replicas = group.size
        replicas = check_int("num_replicas", num_replicas, minimum=1)
    device = check_global_device(global_device)
    outer, rnd = outer_options("overlapped_diloco", outer_optimizer, where, round, {})
    return _Overlapped(period, reduce, eager, replicas, outer, rnd, where, device).averager()


class _Overlapped:
    """The validated options of one [`overlapped_diloco()`][avgfn.overlapped_diloco] and its two pure functions."""

    who = "overlapped_diloco"

    def __init__(
        self, period: int, reduce: Reduce, eager: bool, replicas: int, outer: Optimizer, rnd: Round, where: Any,
        device: Optional[torch.device] = None,
    ) -> None:  # fmt: skip
        self.period, self.reduce, self.eager, self.replicas = period, reduce, eager, replicas
        self.outer, self.rnd, self.where, self.device = outer, rnd, where, device
        self.mean = plain_mean(reduce, rnd, with_settings(self.who, outer, eager=eager))

    def averager(self) -> Averager:
        return Averager(init=self.init, update=self.update)

    def init(self, params: Params) -> OverlappedDiLoCoState:
        verify_selected(params, self.where, self.reduce, self.rnd.verify, self.who)
        leaves, _, chosen = selected(params, self.where)
        local = [leaves[i] for i in chosen]
        globals_ = snapshot(local, self.device)
        zero = counter(local)

        def zeros() -> tuple[torch.Tensor, ...]:  # in the global dtype, on the params' device
            if self.device is None:
                return tuple(torch.zeros_like(g) for g in globals_)
            return tuple(torch.zeros_like(g, device=x.device) for g, x in zip(globals_, local))

        pending = zeros()
        own = zeros() if self.eager else None
        in_flight = torch.full((1,), NOTHING_IN_FLIGHT, dtype=torch.int64, device=zero.device)
        return OverlappedDiLoCoState(
            zero, zero.clone(), globals_, self.outer.init(globals_), pending, own, in_flight
        )

    def update(
        self, params: Params, state: OverlappedDiLoCoState, step: int
    ) -> tuple[Params, OverlappedDiLoCoState]:
        who = self.who
        step = check_step(step)
        if (step + 1) % self.period:
            check_update(params, state, OverlappedDiLoCoState, who)
            return params, state
        with refusing(self.reduce, self.rnd.agree, step):  # the peers are in the round: they learn of it at once
            check_update(params, state, OverlappedDiLoCoState, who)
            if self.eager != (state.own is not None):
                raise ValueError(f"{who}: the state was made by an overlapped_diloco with eager={not self.eager}")
            leaves, spec, chosen = selected(params, self.where, f"{who}(...).update")
            local = [leaves[i] for i in chosen]
            check_match(state.global_params, local, who)
            started = step - self.period
            valid = torch.zeros((), dtype=torch.bool, device=state.in_flight.device) if started < 0 else held_for(
                state.in_flight, (started,),
                lambda held: (
                    f"{who}: at step {step} the average started at step {started} is due (period="
                    f"{self.period}); the state holds one started at step {held[0]} (was it applied "
                    "already?). Pass the state the previous sync step returned: nothing was applied"
                ),
                older=0,
            )  # fmt: skip
        names = _tree.lazy_paths(params, chosen)
        with at_step(step):
            verify_first_round(state.rounds, state.global_params, params, self.where, self.reduce, self.rnd.verify, who)
        own = pseudo_gradient(state.global_params, local)
        with at_step(step):  # started here, read at the next sync step
            started_mean, _ = self.mean(own, params, step, names)
        if self.eager:
            applied = self.eager_gradient(state, own, valid)
            valid = None  # the own share is applied even with nothing in flight
        else:
            applied = state.pending
        new_globals, new_outer, ok = outer_apply(
            state.global_params, state.outer, applied, valid, outer=self.outer, nonfinite=self.rnd.nonfinite,
            who=who, step=step, names=names, local=local, timeout=timeout_of(self.reduce),
        )  # fmt: skip
        new_state = OverlappedDiLoCoState(
            state.rounds + 1,
            state.skipped + (~ok).to(state.skipped.device, state.skipped.dtype),
            new_globals,
            new_outer,
            tuple(a.to(g.dtype) for a, g in zip(started_mean, new_globals)),
            own if self.eager else None,
            torch.full_like(state.in_flight, step),
        )
        return write_back(leaves, spec, chosen, new_globals), new_state

    def eager_gradient(
        self, state: OverlappedDiLoCoState, own: tuple[torch.Tensor, ...], valid: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """``d_m(t) = (delta(t-1) - delta_m(t-1) / M) + delta_m(t) / M``; the delayed term is 0 when nothing is in flight."""
        m = self.replicas
        out = []
        for pending, previous, current in zip(state.pending, state.own, own):
            others = pending - previous / m  # sum_{j != m} delta_j(t-1) / M
            if valid is not None:
                others = torch.where(valid, others, torch.zeros((), dtype=others.dtype, device=others.device))
            out.append(others + current / m)
        return tuple(out)
