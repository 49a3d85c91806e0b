"""Averaging over a torchft quorum: live replicas that come and go.

[torchft](https://github.com/meta-pytorch/torchft) forms a *quorum* of the
replicas that are alive at each round (a Lighthouse decides it), averages over
the participants of that quorum, lets them vote whether to keep the round
(``Manager.should_commit``), and heals a replica that joins or restarts with the
state of a peer that is up to date. avgfn's averagers are pure functions that
only ever call a Reduce; this module puts the two together:

* [`quorum_mean()`][avgfn.torchft.quorum_mean] wraps a ``torchft.Manager`` as a
  [`avgfn.GroupReduce`][avgfn.GroupReduce]: the mean over the current quorum's
  participants, with ``commit()`` returning the quorum's vote.
* [`skip_uncommitted()`][avgfn.torchft.skip_uncommitted] wraps any averager so
  that a round the quorum does not keep (a collective failed, a replica was
  lost, the vote said no) is a skipped round: params and the averager's state
  come back exactly as they were, and the wrapper's state counts it.
* [`Replica`][avgfn.torchft.Replica] holds one replica's params, averager state
  and step, starts a quorum at the start of each interval between rounds, and
  registers them with the Manager, so that a replica that joins receives them
  from a peer and continues in step.

The two step counters: avgfn's ``step`` is the training iteration, which
decides when a round is due (``Replica.step``, handed to ``update``). torchft's
``Manager.current_step()`` counts the rounds the quorum committed (it advances
at each ``should_commit`` that returns True). With one vote per averaging round,
as here, ``current_step()`` equals ``state.committed`` of
[`skip_uncommitted()`][avgfn.torchft.skip_uncommitted] on every replica, and a
healed replica receives both from its peer. torchft heals the replicas whose
``current_step()`` is behind the quorum's largest.

torchft is imported only when a Manager is wrapped: ``import avgfn.torchft``
works without it (install it with ``pip install 'avgfn[torchft]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist

from avgfn._checkpoint import load_state_dict, state_dict
from avgfn._core import types as _types
from avgfn._core.checks import check_step
from avgfn._core.errors import PeerError, ReplicaMismatchError, RoundNotCommitted
from avgfn._core.records import Record, record
from avgfn._core.types import Averager, Params, State

__all__ = ["QuorumMean", "QuorumState", "Replica", "quorum_mean", "skip_uncommitted"]


def _torchft() -> Any:
    try:
        import torchft
    except ImportError as error:
        raise ImportError(
            "avgfn.torchft needs torchft (pip install 'avgfn[torchft]'); "
            f"importing it failed: {error}"
        ) from error
    return torchft


class QuorumMean:
    """A [`avgfn.Reduce`][avgfn.Reduce] over a torchft quorum: the mean over its participants.

    Each call goes through ``manager.allreduce``: the replicas of the quorum
    that ``start_quorum()`` formed divide by the number of participants and
    sum. It implements [`avgfn.GroupReduce`][avgfn.GroupReduce]:

    * ``commit()`` is the quorum's vote, ``manager.should_commit()``. When it
      says no, the round engine raises [`avgfn.RoundNotCommitted`][avgfn.RoundNotCommitted] and
      the inputs of ``update`` are unchanged.
    * A collective that fails (a replica was lost mid-round) does not raise in
      torchft: the Manager records the error. The pending result notices it
      when it is read, votes (no), and raises
      [`avgfn.RoundNotCommitted`][avgfn.RoundNotCommitted], so the round's corrupt values are
      never used.
    * ``agree()`` (the check that the replicas average the same leaves at the
      same step) is one all-reduce of two int64 with ``MAX`` over the quorum.
      Before the first quorum it checks nothing: an averager's ``init`` runs
      before it (a replica that joins calls ``init`` alone), and torchft heals
      the replicas to a common state at the first quorum instead.

    Every quorum comes from `start_quorum()`, which
    [`Replica.begin()`][avgfn.torchft.Replica.begin] calls at the start of each interval
    between rounds; the Manager must be built with ``use_async_quorum=False``
    so that a replica heals there, before it trains. The Manager's own
    ``timeout`` bounds each collective and the vote, its ``quorum_timeout`` the
    wait for a quorum.

    Attributes:
      manager: the ``torchft.Manager``.
    """

    def __init__(self, manager: Any) -> None:
        torchft = _torchft()
        if not isinstance(manager, torchft.Manager):
            raise TypeError(
                f"quorum_mean: manager must be a torchft.Manager, got {type(manager).__name__}"
            )
        self.manager = manager
        self._started = False
        self._voted = False

    @property
    def size(self) -> int:
        """The number of participants of the current quorum (0 before the first one)."""
        return self.manager.num_participants() if self._started else 0

    @property
    def quorum_due(self) -> bool:
        """Whether the next round needs a new quorum (none yet, or the last one has voted)."""
        return not self._started or self._voted

    def start_quorum(self) -> None:
        """Form the quorum of the next round; a replica that is behind heals here.

        Blocks until the Lighthouse forms a quorum (at most the Manager's
        ``quorum_timeout``). When this replica's ``current_step()`` is behind the
        quorum's, torchft fetches a peer's state and calls the registered
        ``load_state_dict`` before this returns.

        Raises:
          PeerError: no quorum formed within the Manager's ``quorum_timeout``.
        """
        try:
            self.manager.start_quorum()
        except TimeoutError as error:
            raise PeerError(
                "quorum_mean: the torchft Lighthouse formed no quorum within the Manager's "
                "quorum_timeout (too few replicas alive for its min_replicas, or the peers are "
                f"further from their next round than the timeout). Cause: {error}",
                group="a torchft quorum",
            ) from error
        self._started, self._voted = True, False

    def _require_quorum(self, what: str) -> None:
        if not self._started:
            raise RuntimeError(
                f"quorum_mean: {what} before any quorum was formed; call Replica.begin() "
                "(or QuorumMean.start_quorum()) at the start of each interval between rounds"
            )

    def _vote(self) -> bool:
        self._voted = True
        return bool(self.manager.should_commit())

    def decline(self, error: BaseException) -> None:
        """Vote no on the current round, once: it failed with ``error`` on this replica.

        [`Replica.update()`][avgfn.torchft.Replica.update] calls this when ``update`` raises, so
        that torchft skips the round here and the next quorum can heal.
        """
        if self._started and not self._voted:
            if self.manager.errored() is None:
                cause = error if isinstance(error, Exception) else RuntimeError(repr(error))
                self.manager.report_error(cause)
            self._vote()

    def _failed(self) -> RoundNotCommitted:
        reason = str(self.manager.errored()).splitlines()[0]  # torchft's message, then a traceback
        self.decline(RuntimeError(reason))
        return RoundNotCommitted(
            "the torchft quorum did not commit this averaging round: its collectives failed "
            f"(a replica was lost or the group broke; the Manager recorded: {reason}); the "
            "inputs of update are unchanged"
        )

    def divisor(self) -> int:
        """What each replica divides its values by before `start_sum()`: the participants."""
        return max(self.size, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.start(tensor).wait()

    def start(self, tensor: torch.Tensor) -> "_QuorumPending":
        """Begin the mean of ``tensor`` over the quorum (it divides ``tensor`` in place)."""
        self._require_quorum("an all-reduce")
        tensor.div_(self.divisor())
        return self.start_sum(tensor)

    def start_sum(self, tensor: torch.Tensor) -> "_QuorumPending":
        """Begin the sum of ``tensor`` (already divided by `divisor()`) over the quorum."""
        self._require_quorum("an all-reduce")
        work = self.manager.allreduce(tensor, reduce_op=dist.ReduceOp.SUM)
        return _QuorumPending(self, work, tensor)

    def agree(self, digest: bytes, entries: Callable[[], list[tuple[str, str]]]) -> None:
        """Raise [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] on every participant unless all digests match.

        A no-op before the first quorum (see the class docstring).
        """
        if not self._started:
            return
        value = int.from_bytes(digest[:8], "little", signed=True) >> 1  # room for the negation
        probe = torch.tensor([value, -value], dtype=torch.int64)
        _QuorumPending(self, self.manager.allreduce(probe, reduce_op=dist.ReduceOp.MAX), probe).wait()
        if int(probe[0]) == value and int(probe[1]) == -value:
            return
        mine = dict(entries())
        who = self._refusing("<refused>" in mine)
        if who is not None:
            error = ReplicaMismatchError(
                f"participant {who} of the torchft quorum ({self.size}) refused the round (its own "
                "error says what it refused); nothing was averaged: fix that replica's inputs"
            )
            error.refused_by = (who,)
            error.differs = "refused"
        else:
            error = ReplicaMismatchError(
                f"the participants of the torchft quorum ({self.size}) do not average the same "
                f"leaves at the same step (this replica: step {mine.get('<step>', '?')}, "
                f"{len([k for k in mine if not k.startswith('<')])} leaves); nothing was averaged"
            )
        self.decline(error)
        raise error

    def _refusing(self, refused: bool) -> Optional[int]:
        """After a failed check, on every participant: the participating rank of one that refused the round.

        The quorum's collective is an all-reduce, not a gather: a second one
        (MAX of ``rank + 1`` where a replica refused its own inputs) tells
        every participant whether one did, and which.
        """
        rank = self.manager.participating_rank()
        mark = torch.tensor([(0 if rank is None else rank) + 1 if refused else 0], dtype=torch.int64)
        _QuorumPending(self, self.manager.allreduce(mark, reduce_op=dist.ReduceOp.MAX), mark).wait()
        found = int(mark[0])
        return None if found == 0 else found - 1

    def commit(self) -> bool:
        """The quorum's vote on the round that just completed: ``manager.should_commit()``."""
        self._require_quorum("a vote")
        return self._vote()

    def __repr__(self) -> str:
        return f"quorum_mean({type(self.manager).__name__})"


class _QuorumPending:
    __slots__ = ("owner", "work", "tensor")

    def __init__(self, owner: QuorumMean, work: Any, tensor: torch.Tensor) -> None:
        self.owner = owner
        self.work = work
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        self.work.wait()  # torchft records a failure in the Manager instead of raising
        if self.owner.manager.errored() is not None:
            raise self.owner._failed()
        return self.tensor


def quorum_mean(manager: Any) -> QuorumMean:
    """The Reduce of a torchft quorum: the mean over the participants of the current quorum.

    Args:
      manager: a ``torchft.Manager`` built with ``use_async_quorum=False``
        (healing then happens in `QuorumMean.start_quorum()`, before the replica
        trains), one per replica.

    Returns:
      A [`QuorumMean`][avgfn.torchft.QuorumMean]. Give it to any averager, wrap that averager in
      [`skip_uncommitted()`][avgfn.torchft.skip_uncommitted], and drive the loop with
      [`Replica`][avgfn.torchft.Replica].

    Raises:
      ImportError: torchft is not installed.
      TypeError: ``manager`` is not a ``torchft.Manager``.

    Examples:
      >>> import avgfn, avgfn.torchft
      >>> reduce = avgfn.torchft.quorum_mean(manager)  # doctest: +SKIP
      >>> avg = avgfn.torchft.skip_uncommitted(avgfn.diloco(8, reduce=reduce))  # doctest: +SKIP

      ``docs/torchft.md`` runs a whole replica in one process.
    """
    return QuorumMean(manager)


@record
class QuorumState(Record):
    """State of [`skip_uncommitted()`][avgfn.torchft.skip_uncommitted].

    Attributes:
      inner: the wrapped averager's state.
      committed: int64 count of the rounds the group committed.
      skipped: int64 count of the rounds it did not commit: for each, params
        and ``inner`` were left exactly as they were.
    """

    inner: Any
    committed: torch.Tensor
    skipped: torch.Tensor


def skip_uncommitted(averager: Averager) -> Averager:
    """Make a round the group does not commit a skipped round, counted in the state.

    Wraps ``averager``: when its ``update`` raises
    [`avgfn.RoundNotCommitted`][avgfn.RoundNotCommitted] (a torchft quorum lost a replica in
    the round, a collective failed, or the vote said no), the wrapper returns
    the params and the inner state it was given, the same objects, and adds one
    to ``skipped``. A call whose round the group kept adds one to
    ``committed`` (a step that only applies a round kept at an earlier step,
    as Streaming DiLoCo's with ``delay`` does, adds nothing); a step where no
    round is due costs a comparison.
    Pure, like the averager it wraps: it runs under ``torch.func.vmap`` with
    simulated replicas as well, where no round is ever declined.

    Args:
      averager: any [`avgfn.Averager`][avgfn.Averager].

    Returns:
      An [`avgfn.Averager`][avgfn.Averager] whose state is a [`QuorumState`][avgfn.torchft.QuorumState].

    Raises:
      TypeError: ``averager`` is not an [`avgfn.Averager`][avgfn.Averager].

    Examples:
      A group that declines every round (a fake: torchft's vote said no):

      >>> import torch, avgfn
      >>> from avgfn.torchft import skip_uncommitted
      >>> class Declines(avgfn.ForwardingReduce):
      ...     def commit(self):
      ...         return False
      >>> avg = skip_uncommitted(avgfn.periodic(2, reduce=Declines(lambda t: t)))
      >>> params = {"w": torch.ones(2)}
      >>> state = avg.init(params)
      >>> new, state = avg.update(params, state, 0)
      >>> new is params, int(state.committed), int(state.skipped), int(state.inner.rounds)
      (True, 0, 1, 0)
    """
    if not isinstance(averager, Averager):
        raise TypeError(
            f"skip_uncommitted: averager must be an avgfn.Averager, got {type(averager).__name__}"
        )

    def init(params: Params) -> QuorumState:
        zero = torch.zeros((), dtype=torch.int64)
        return QuorumState(averager.init(params), zero, zero.clone())

    def update(params: Params, state: QuorumState, step: int) -> tuple[Params, QuorumState]:
        if not isinstance(state, QuorumState):
            raise TypeError(
                "state must be a QuorumState made by skip_uncommitted(...).init, "
                f"got {type(state).__name__}"
            )
        kept = _types.rounds_kept()
        try:
            new_params, inner = averager.update(params, state.inner, step)
        except RoundNotCommitted:
            return params, state.replace(skipped=state.skipped + 1)
        if inner is state.inner:  # no round was due
            return new_params, state
        if _types.rounds_kept() == kept:  # no vote: e.g. applying a round kept at an earlier step
            return new_params, state.replace(inner=inner)
        return new_params, QuorumState(inner, state.committed + 1, state.skipped)

    return Averager(init=init, update=update)


_KEYS = ("params", "state", "step")


def _copies(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}


class Replica:
    """One torchft replica's params, averager state and step, kept in step with its quorum.

    The training loop reads the params from `begin()`, trains on them,
    and hands the result to `update()`:

    ```py
    replica = avgfn.torchft.Replica(reduce, avg, params)
    while replica.step < steps:
        params = replica.begin()            # may heal: then params, state, step are a peer's
        params = train_step(params, batch(replica.step))
        replica.update(params)              # avg.update at replica.step; a round votes
    ```

    `begin()` starts a quorum at the start of each interval between rounds (the
    first step, and the step after each round that voted); with the Manager's
    ``use_async_quorum=False`` torchft heals a replica that is behind right
    there. For that the replica registers `state_dict()` and
    `load_state_dict()` with the Manager under ``key``: a peer that is up to
    date sends its params, the averager's state (the DiLoCo global copy and
    outer optimizer state, the counts of
    [`skip_uncommitted()`][avgfn.torchft.skip_uncommitted]) and its step. Anything else the
    loop keeps (an inner optimizer's state, a data loader's position) can be
    registered with the Manager under another key.

    Args:
      reduce: the [`QuorumMean`][avgfn.torchft.QuorumMean] the averager averages with.
      averager: the averager, usually wrapped in
        [`skip_uncommitted()`][avgfn.torchft.skip_uncommitted] (without it, a round the quorum
        does not commit raises [`avgfn.RoundNotCommitted`][avgfn.RoundNotCommitted] from
        `update()`, and the replica keeps its values).
      params: the params to start from (a joining replica's are replaced when
        it heals).
      state: the averager's state; ``None`` builds it with ``averager.init``
        (before the first quorum, so its check of the replicas is skipped; see
        [`QuorumMean`][avgfn.torchft.QuorumMean]).
      step: the step to start at.
      key: the name of the registration with the Manager.

    Attributes:
      params: the params at `step` (what `begin()` returns).
      state: the averager's state.
      step: the next step to train (avgfn's step, not torchft's ``current_step()``).
      healed_at: the steps at which this replica received a peer's state.

    Raises:
      TypeError: ``reduce`` is not a [`QuorumMean`][avgfn.torchft.QuorumMean] or ``averager`` not
        an [`avgfn.Averager`][avgfn.Averager].
    """

    def __init__(
        self,
        reduce: QuorumMean,
        averager: Averager,
        params: Params,
        *,
        state: Optional[State] = None,
        step: int = 0,
        key: str = "avgfn",
    ) -> None:
        if not isinstance(reduce, QuorumMean):
            raise TypeError(
                f"Replica: reduce must be the QuorumMean of avgfn.torchft.quorum_mean(manager), "
                f"got {type(reduce).__name__}"
            )
        if not isinstance(averager, Averager):
            raise TypeError(f"Replica: averager must be an avgfn.Averager, got {type(averager).__name__}")
        self.reduce = reduce
        self.averager = averager
        self.params = params
        self.state = averager.init(params) if state is None else state
        self.step = check_step(step)
        self.healed_at: list[int] = []
        self._in_begin = False
        self._in_update = False
        reduce.manager.register_state_dict_fn(key, self.load_state_dict, self.state_dict)

    def begin(self) -> Params:
        """Start this step: form a quorum when one is due (and heal); return the params.

        Raises:
          PeerError: no quorum formed within the Manager's ``quorum_timeout``.
        """
        if self.reduce.quorum_due:
            self._in_begin = True
            try:
                self.reduce.start_quorum()
            finally:
                self._in_begin = False
        return self.params

    def update(self, params: Params) -> Params:
        """Run ``averager.update(params, state, step)``, keep the result, advance the step.

        When ``update`` raises, this replica votes no on the round (so that the
        quorum is not kept waiting), keeps its params, state and step, and
        the exception propagates.

        Returns:
          The params after the step (averaged when a round was due and committed).
        """
        self._in_update = True
        try:
            new_params, new_state = self.averager.update(params, self.state, self.step)
        except BaseException as error:
            self.reduce.decline(error)
            raise
        finally:
            self._in_update = False
        self.params, self.state, self.step = new_params, new_state, self.step + 1
        return new_params

    def state_dict(self) -> dict[str, Any]:
        """What a healing peer receives: ``{"params", "state", "step"}``.

        ``params`` and ``state`` are flat dicts keyed by pytree paths
        ([`avgfn.state_dict()`][avgfn.state_dict]) of copies of the tensors, so the loop
        may go on, even in place, while the peer downloads them.
        """
        return {
            "params": _copies(state_dict(self.params)),
            "state": _copies(state_dict(self.state)),
            "step": self.step,
        }

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Take a peer's params, state and step (strictly: same keys, shapes, dtypes).

        torchft calls it when this replica heals (in `begin()`); a loop may
        call it too, with a `state_dict()` it saved to disk.

        Raises:
          RuntimeError: called while `update()` runs: torchft healed during a
            round, which it does with ``use_async_quorum=True``.
          ValueError: the checkpoint does not match this replica's params or
            state (another model or averager); nothing is changed.
          TypeError: a value of the wrong type.
        """
        if self._in_update:
            raise RuntimeError(
                "Replica: torchft handed this replica a peer's state while a round was running; "
                "build the Manager with use_async_quorum=False, so that a replica heals in "
                "Replica.begin(), before it trains"
            )
        if not isinstance(checkpoint, Mapping) or sorted(checkpoint) != sorted(_KEYS):
            found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ValueError(f"Replica.load_state_dict: expected the keys {list(_KEYS)}, got {found}")
        params = load_state_dict(self.params, checkpoint["params"])
        state = load_state_dict(self.state, checkpoint["state"])
        step = checkpoint["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"Replica.load_state_dict: 'step' must be an int, got {step!r}")
        self.params, self.state, self.step = params, state, check_step(step)
        if self._in_begin:
            self.healed_at.append(self.step)

    def __repr__(self) -> str:
        return f"Replica(step={self.step}, healed_at={self.healed_at})"
