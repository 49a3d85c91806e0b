"""Composition of averagers: one after the other on the same params."""

from __future__ import annotations

from typing import Any

from avgfn._core.types import Averager, Params
from avgfn._core.checks import Refused, check_params, check_state, check_step
from avgfn._core.records import Record, record

__all__ = ["ChainState", "chain"]


@record
class ChainState(Record):
    """State of [`chain()`][avgfn.chain].

    Attributes:
      states: a tuple with each averager's state, in order.
    """

    states: tuple[Any, ...]


def chain(*averagers: Averager) -> Averager:
    """Run averagers one after the other at every step, as one averager.

    ``update(params, state, step)`` hands the params to the first averager,
    its result to the second, and so on; each keeps its own state. The usual
    use is a distributed averager followed by a temporal one, whose average
    then follows the synchronized params:
    ``chain(avgfn.diloco(...), avgfn.ema(0.999))``.

    Off-step calls stay free: when no averager changes anything, the inputs
    come back as the same objects.

    Args:
      *averagers: at least one [`avgfn.Averager`][avgfn.Averager].

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a `ChainState`.

    Raises:
      ValueError: no averager.
      TypeError: an argument that is not an [`avgfn.Averager`][avgfn.Averager].

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.chain(avgfn.periodic(2, reduce=lambda t: t * 0), avgfn.swa())
      >>> params = {"w": torch.ones(1)}
      >>> state = avg.init(params)
      >>> for step in range(3):
      ...     params, state = avg.update({"w": params["w"] + 1}, state, step)
      >>> params["w"], state.states[1].average["w"]     # 0, 1, 0 seen by swa
      (tensor([0.]), tensor([0.3333]))
    """
    if not averagers:
        raise ValueError("chain needs at least one averager")
    for k, averager in enumerate(averagers):
        if not isinstance(averager, Averager):
            raise TypeError(
                f"chain: argument {k} must be an avgfn.Averager, got {type(averager).__name__}"
            )
    count = len(averagers)

    def init(params: Params) -> ChainState:
        return ChainState(tuple(a.init(params) for a in averagers))

    def update(params: Params, state: ChainState, step: int) -> tuple[Params, ChainState]:
        step = check_step(step)
        try:  # what the chain itself checks: a temporal average first would raise before any round
            check_state(state, ChainState, "chain")
            if not isinstance(state.states, tuple) or len(state.states) != count:
                raise ValueError(
                    f"chain: the state holds {len(state.states)} states, this chain has {count} averagers"
                )
            check_params(params, "chain(...).update")
        except (TypeError, ValueError) as error:
            _refuse(averagers, params, step, error)
            raise
        states: list[Any] = []
        changed = False
        for averager, sub in zip(averagers, state.states):
            params, new_sub = averager.update(params, sub, step)
            changed = changed or new_sub is not sub
            states.append(new_sub)
        if not changed:
            return params, state
        return params, ChainState(tuple(states))

    return Averager(init=init, update=update)


def _refuse(averagers: tuple[Averager, ...], params: Params, step: int, error: Exception) -> None:
    """Refuse, for ``error``, the round that the first of ``averagers`` due at ``step`` runs.

    Each averager is handed a `Refused` state in turn: one at an off-step
    raises ``error`` at once (its peers run no round either); the first one
    due refuses its round through its own check, which tells the peers
    (`avgfn._round.engine.refusing` marks ``error``), and no later averager
    is run, since its peers will not reach it.
    """
    for averager in averagers:
        try:
            averager.update(params, Refused(error), step)
        except Exception as raised:  # noqa: BLE001 - only ``error`` itself goes on to the next
            if raised is not error or getattr(error, "avgfn_refused_round", False):
                return
