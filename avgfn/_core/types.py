"""The core types: the Reduce a caller injects and the Averager record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import attrs
import torch

Params = Any
"""A pytree of tensors (``dict(model.named_parameters())``, nested containers...)."""

State = Any
"""An averager's state: an immutable record registered as a pytree."""


class Reduce(Protocol):
    """The collective an averager is given: the mean over the replicas of a group.

    It is handed a contiguous tensor that the caller owns and returns the
    elementwise mean of that tensor over the replicas of its group. It may write
    into its argument. ``lambda t: t`` is the Reduce of a group of one.
    """

    def __call__(self, tensor: torch.Tensor, /) -> torch.Tensor:
        """Return the mean of ``tensor`` over the group (may reuse its storage)."""
        ...


class InitFn(Protocol):
    """Builds an averager's initial state from the params it will average."""

    def __call__(self, params: Params, /) -> State:
        """Return the initial state for ``params``."""
        ...


class UpdateFn(Protocol):
    """One call per training step: averages when due, never mutates its inputs."""

    def __call__(self, params: Params, state: State, step: int, /) -> tuple[Params, State]:
        """Return ``(params, state)`` after the averaging due at ``step`` (if any)."""
        ...


@attrs.frozen
class Averager:
    """An immutable record of two pure functions, ``init`` and ``update``.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(params, state, step) -> (params, state)``. On a step where
        nothing is due it returns its inputs themselves, at the cost of a
        comparison or two.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.periodic(2, reduce=lambda t: t)
      >>> params = {"w": torch.ones(3)}
      >>> state = avg.init(params)
      >>> new, state = avg.update(params, state, 1)   # off-step
      >>> new is params
      True
    """

    init: InitFn
    update: UpdateFn


class Pending(Protocol):
    """A Reduce in flight: ``wait()`` returns its result (and raises its failure)."""

    def wait(self) -> torch.Tensor:
        """Block until the reduction is done; return the mean."""
        ...


@runtime_checkable
class AsyncReduce(Reduce, Protocol):
    """A Reduce that can also be started without waiting for it.

    ``start(tensor)`` begins the mean of ``tensor`` and returns a
    [`Pending`][avgfn.Pending]; the caller must not touch ``tensor`` until ``wait()``.
    Plain callables are Reduces too: they simply run to completion at start.
    """

    def start(self, tensor: torch.Tensor, /) -> Pending:
        """Begin the mean of ``tensor`` over the group."""
        ...


@runtime_checkable
class GroupReduce(Protocol):
    """What a Reduce backed by a real group can do beyond ``reduce(tensor)``.

    A plain callable is a Reduce; a group-backed one
    ([`avgfn.collectives.all_reduce_mean()`][avgfn.collectives.all_reduce_mean]) also offers the methods
    below, and the round engine uses them when they are there. A wrapper that
    keeps them (a Reduce that counts bytes, records calls...) subclasses
    [`ForwardingReduce`][avgfn.ForwardingReduce], which forwards each one to its inner Reduce.

    * ``size``: the number of replicas in the group (0 on a rank outside it).
    * ``divisor()`` and ``start_sum(tensor)``: the mean is the sum of values
      each replica divided by ``divisor()``; the engine fuses that division
      into the copy that packs its buffer, then starts the sum.
    * ``start(tensor)``: the mean, asynchronously (a [`Pending`][avgfn.Pending]); the
      buckets of a round use it to pack one while another is on the wire.
    * ``agree(digest, entries)``: a collective that raises
      [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] on every replica unless all hand in
      the same ``digest``; ``entries()`` names what the digest was made of
      (``(name, description)`` pairs), for the message.
    * optionally, ``start_agree(digest, entries)``: `agree()` begun without
      waiting, returning an object whose ``wait()`` returns or raises as
      `agree()` would; the engine then packs its buffer while the check is
      on the wire. A group without it is checked with `agree()`.
    * optionally, a true ``agree_in_data``: every replica runs the engine's
      rounds through this object in the same order, and ``start_sum()``
      sums exactly the tensor it is given, so that once its past rounds
      predict the next one's size, the engine may append the agreement's
      check to the data and reduce both in one collective, refusing the
      result unless the check passes (`avgfn._round.predicted`). A
      `ForwardingReduce` does not forward it; a subclass that passes every
      tensor on unchanged may set it.
    * optionally, ``lanes`` (an int, at least 1) and ``start_sum_on(lane,
      tensor)``: `start_sum()` on one of ``lanes`` sums that can run side by
      side (each over a process group of its own, lane 0 being the group's
      own `start_sum()`); the engine spreads the pieces of a large round
      over them, the same pieces on the same lanes on every replica (a
      predicted round, and a round without an agreement of its own, stay on
      lane 0), and each round's agreement compares ``lanes`` and, when the
      group gives them, its ``lane_names`` (a tuple of strings naming the
      lanes past the first).
    * ``commit()``: whether the group keeps the round that just completed;
      a group that votes on its rounds (a torchft quorum) may answer False,
      and the round is then refused with [`avgfn.RoundNotCommitted`][avgfn.RoundNotCommitted].

    The tensors a group-backed Reduce returns may be in flight (a tensor that
    waits when first read, with a ``wait()`` that returns the plain tensor, as
    torch's functional collectives and ``all_reduce_mean(in_flight=True)``
    return); a Reduce whose results always are may say so with a true
    ``in_flight`` attribute (any Reduce may: Streaming DiLoCo then pads a
    smaller fragment on the wire, to keep it in flight). With ``DTensor``
    params it is handed the local shards.
    """

    @property
    def size(self) -> int:
        """The number of replicas of the group (0 on a rank outside it)."""
        ...

    def __call__(self, tensor: torch.Tensor, /) -> torch.Tensor:
        """Return the mean of ``tensor`` over the group."""
        ...

    def divisor(self) -> int:
        """What each replica divides its values by before `start_sum()`."""
        ...

    def start(self, tensor: torch.Tensor, /) -> Pending:
        """Begin the mean of ``tensor``."""
        ...

    def start_sum(self, tensor: torch.Tensor, /) -> Pending:
        """Begin the sum of ``tensor``, already divided by `divisor()`."""
        ...

    def agree(self, digest: bytes, entries: Callable[[], list[tuple[str, str]]], /) -> None:
        """Raise [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] everywhere unless all digests match."""
        ...

    def commit(self) -> bool:
        """Whether the group keeps the round that just completed."""
        ...


class Done:
    """A [`Pending`][avgfn.Pending] whose result is already there (or waits where it is first read)."""

    __slots__ = ("result",)

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


def settle(tensor: Any) -> Any:
    """The value of a Reduce result that may still be in flight, waited for; anything else as is.

    A result in flight is a tensor subclass with a ``wait()`` that returns
    the plain tensor (torch's ``AsyncCollectiveTensor``,
    ``avgfn.collectives.MeanInFlight``); it raises what the collective raised.
    """
    if isinstance(tensor, torch.Tensor) and type(tensor) is not torch.Tensor:
        wait = getattr(tensor, "wait", None)
        if callable(wait):
            return wait()
    return tensor


PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
"""Tensor types with nothing of their own: never a result in flight, nor a DTensor."""


def settle_all(tensors: list[Any]) -> list[Any]:
    """`settle()` of each of ``tensors``; ``tensors`` itself when none is a result in flight.

    Eagerly, plain tensors are told apart by the set of their types (a C
    loop) instead of a Python call per tensor.
    """
    if not torch.compiler.is_compiling() and set(map(type, tensors)) <= PLAIN_TENSORS:
        return tensors
    settled = [settle(t) for t in tensors]
    return tensors if all(a is b for a, b in zip(settled, tensors)) else settled


_GROUP_TYPES: dict[type, bool] = {}


def group_of(reduce: Any) -> Optional[GroupReduce]:
    """``reduce`` as a [`GroupReduce`][avgfn.GroupReduce] when it is one, else ``None``.

    The answer is kept per class: checking a runtime protocol reads every
    member, which would cost more than a small round itself.
    """
    kind = type(reduce)
    known = _GROUP_TYPES.get(kind)
    if known is None:
        known = _GROUP_TYPES[kind] = isinstance(reduce, GroupReduce)
    return reduce if known else None


def timeout_of(reduce: Any) -> Optional[float]:
    """The seconds a group-backed Reduce waits for its peers, if it says (``None``: it does not).

    ``all_reduce_mean(timeout=...)`` says; the small collectives a round runs
    beside the Reduce (the shard-wide verdicts of sharded params) wait as long.
    """
    value = getattr(group_of(reduce), "timeout", None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def divisor(reduce: Reduce) -> int:
    """What a replica divides by before `start_sum()` (1 for a plain Reduce)."""
    group = group_of(reduce)
    return 1 if group is None else group.divisor()


def start_sum(reduce: Reduce, tensor: torch.Tensor) -> Pending:
    """Begin the sum of ``tensor`` pre-divided by `divisor()` (a plain Reduce: its mean)."""
    group = group_of(reduce)
    return Done(reduce(tensor)) if group is None else group.start_sum(tensor)


def overrides_start_sum_alone(kind: type, base: type) -> bool:
    """Whether ``kind`` overrides ``base``'s ``start_sum`` but not its ``start_sum_on``.

    Such a subclass (a wrapper that compresses or counts in ``start_sum``)
    has one lane: its override sees every sum only if every sum goes through it.
    """
    own_sum = getattr(kind, "start_sum") is not getattr(base, "start_sum")
    return own_sum and getattr(kind, "start_sum_on") is getattr(base, "start_sum_on")


def lanes(reduce: Reduce) -> int:
    """How many sums the group can run side by side (`start_sum_on()`); 1 when it does not say."""
    group = group_of(reduce)
    value = getattr(group, "lanes", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or not hasattr(group, "start_sum_on"):
        return 1
    return value


def lane_names(reduce: Reduce) -> tuple[str, ...]:
    """Names of the lanes past the first, when the group gives them (``lane_names``), else ``()``.

    Replicas whose spare groups are the same groups in another order would
    sum one piece of one with another piece of the other: the round's
    agreement compares the names too.
    """
    names = getattr(group_of(reduce), "lane_names", ())
    return tuple(str(name) for name in names) if isinstance(names, (tuple, list)) else ()


def start_sum_on(reduce: Reduce, lane: int, tensor: torch.Tensor) -> Pending:
    """`start_sum()` on ``lane`` of the group's `lanes()`.

    With one lane, `start_sum()` itself; with more, every lane (0 too) goes
    through the group's ``start_sum_on``, so that a wrapper that overrides
    it sees every piece.
    """
    if lane == 0 and lanes(reduce) == 1:
        return start_sum(reduce, tensor)
    return group_of(reduce).start_sum_on(lane, tensor)  # type: ignore[union-attr]


def start(reduce: Reduce, tensor: torch.Tensor) -> Pending:
    """Start ``reduce`` on ``tensor``: asynchronously when it can, else at once."""
    group = group_of(reduce)
    if group is not None:
        return group.start(tensor)
    if isinstance(reduce, AsyncReduce):  # asynchronous without the rest of a group's capabilities
        return reduce.start(tensor)
    return Done(reduce(tensor))


def agree(reduce: Reduce, digest: bytes, entries: Callable[[], list[tuple[str, str]]]) -> None:
    """Run the group's agreement check; a plain Reduce has no peers to compare with."""
    group = group_of(reduce)
    if group is not None:
        group.agree(digest, entries)


class Agreement(Protocol):
    """An agreement check begun by ``start_agree``: ``wait()`` returns or raises."""

    def wait(self) -> None:
        """Return once the replicas agreed; raise as ``agree`` would otherwise."""
        ...


class _Agreed:
    __slots__ = ()

    def wait(self) -> None:
        return None


AGREED: "Agreement" = _Agreed()
"""An agreement that has already passed (no peers to compare with)."""


def carries_flags(reduce: Reduce) -> bool:
    """Whether the group's agreement can carry a round's health flags (``start_agree(..., flags=)``)."""
    group = group_of(reduce)
    return group is not None and getattr(group, "agree_carries_flags", False) is True


def start_agree(
    reduce: Reduce,
    digest: bytes,
    entries: Callable[[], list[tuple[str, str]]],
    flags: Optional[Sequence[int]] = None,
) -> Agreement:
    """Begin the group's agreement check (at once when the group cannot start it).

    ``flags`` go with it only to a group that `carries_flags()`; the
    agreement's ``flags`` attribute then holds their MAX after ``wait()``.
    """
    group = group_of(reduce)
    if group is None:
        return AGREED
    begin = getattr(group, "start_agree", None)
    if flags is not None and carries_flags(reduce):
        return begin(digest, entries, flags=flags)  # type: ignore[misc]
    if begin is not None:
        return begin(digest, entries)
    group.agree(digest, entries)
    return AGREED


_KEPT = [0]


def commit(reduce: Reduce) -> bool:
    """Whether the group keeps the round that just completed (a plain Reduce: always).

    Each round kept is counted (`rounds_kept()`), so that a wrapper can tell a
    step that ran a round from one that only applied a round kept earlier.
    """
    group = group_of(reduce)
    kept = True if group is None else group.commit()
    if kept and not torch.compiler.is_compiling():  # a compiled graph must not guard on it
        _KEPT[0] += 1
    return kept


def rounds_kept() -> int:
    """How many rounds this process has kept so far (a counter that only grows)."""
    return _KEPT[0]


class ForwardingReduce:
    """A Reduce that wraps another and forwards every [`GroupReduce`][avgfn.GroupReduce] capability.

    Subclass it to observe what the inner Reduce is handed: override
    `observe()`, which sees each buffer (and whether it is pre-divided)
    before it goes to ``inner``. Fused division, asynchronous starts, the
    replica agreement and the commit vote then keep working through the
    wrapper; over a plain callable they behave as a plain Reduce does.

    Examples:
      >>> import torch, avgfn
      >>> class Count(avgfn.ForwardingReduce):
      ...     calls = 0
      ...     def observe(self, tensor, divided):
      ...         self.calls += 1
      >>> reduce = Count(lambda t: t)
      >>> _ = avgfn.average({"w": torch.ones(2)}, reduce)
      >>> reduce.calls
      1
    """

    def __init__(self, inner: Reduce) -> None:
        if not callable(inner):
            raise TypeError(f"ForwardingReduce: inner must be a Reduce (a callable), got {inner!r}")
        self.inner = inner

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        """Called with each buffer before it is handed on (``divided``: for `start_sum()`)."""
        del tensor, divided

    @property
    def size(self) -> int:
        group = group_of(self.inner)
        return 1 if group is None else group.size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.observe(tensor, False)
        return self.inner(tensor)

    def divisor(self) -> int:
        return divisor(self.inner)

    @property
    def in_flight(self) -> bool:
        """Whether the inner Reduce says its results are in flight (see [`GroupReduce`][avgfn.GroupReduce])."""
        return getattr(self.inner, "in_flight", False) is True

    def history_token(self) -> Any:
        """The process group behind the inner Reduce (``None`` when it does not say)."""
        group = group_of(self.inner)
        return group.history_token() if group is not None and hasattr(group, "history_token") else None

    def start(self, tensor: torch.Tensor) -> Pending:
        self.observe(tensor, False)
        return start(self.inner, tensor)

    def start_sum(self, tensor: torch.Tensor) -> Pending:
        self.observe(tensor, True)
        return start_sum(self.inner, tensor)

    @property
    def lanes(self) -> int:
        """The inner Reduce's `lanes()` (1 over a plain callable; see `overrides_start_sum_alone()`)."""
        return 1 if overrides_start_sum_alone(type(self), ForwardingReduce) else lanes(self.inner)

    @property
    def lane_names(self) -> tuple[str, ...]:
        """The inner Reduce's `lane_names()` (what tells its lanes apart)."""
        return lane_names(self.inner) if self.lanes > 1 else ()

    def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Pending:
        self.observe(tensor, True)
        return start_sum_on(self.inner, lane, tensor)

    def agree(self, digest: bytes, entries: Callable[[], list[tuple[str, str]]]) -> None:
        agree(self.inner, digest, entries)

    def start_agree(self, digest: bytes, entries: Callable[[], list[tuple[str, str]]]) -> Agreement:
        if type(self).agree is not ForwardingReduce.agree:  # a subclass that watches agree() sees each one
            self.agree(digest, entries)
            return AGREED
        return start_agree(self.inner, digest, entries)

    def commit(self) -> bool:
        return commit(self.inner)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


@runtime_checkable
class ReduceSchedule(Protocol):
    """Which Reduce averages the gradients at a step (a DDP hook reads it).

    [`avgfn.GradientSchedule`][avgfn.GradientSchedule] is one: ``reduce_at(step)`` is the global
    Reduce before its switch step, then the local one (or ``None``).
    """

    where: Any
    start_step: int

    def reduce_at(self, step: int) -> Optional[Reduce]:
        """The Reduce for the gradients of ``step``, or ``None`` for none."""
        ...
