"""Rounds a group's history predicts: the agreement travels inside the data collective.

The per-round agreement (`avgfn._round.agree`) is a small collective that
must finish before the data collective starts: a replica that averages
other leaves would otherwise hand the group a buffer of another size (which
gloo answers by aborting the process). On a small model its latency is a
large part of the round. When the size of the next round is known in
advance, the check can instead travel in the data collective itself.

A group that allows it (a true ``agree_in_data``, as ``all_reduce_mean``
has) keeps a [`History`][avgfn._round.predicted.History]: the sequence of
rounds it agreed on, updated only from outcomes every replica saw alike.
From the last round's layout (its element count and wire dtype) it predicts
the next one, once the same successor came twice in a row. At a predicted
round every replica starts one collective of the predicted size plus
`CHECK` elements:

* a replica whose round has that layout sends its data followed by the
  check: each of the 8 bytes of the round's digest (``0..255``) and its
  square, a marker 0 (also when its digest differs: another step, or
  another selection of the same size), and a vouch: 1 when it read its own
  shares as finite as it divided them (then neither replica reads the mean
  again, see `passed()`), else 0;
* a replica whose round has another layout (another size, a round of
  another kind, a local refusal, nothing to average) sends zeros with the
  marker 1, then runs its round with its agreement first.

The sums of the check are small integers, exact in float32, and the same on
every replica. They equal twice this replica's byte and twice its square
(in a group of two) only when both replicas sent the same byte (the spread
``2 * (a**2 + b**2) - (a + b)**2 = (a - b)**2`` is zero exactly then), and
the marker's sum is zero only when neither declined: every replica decides
alike. If the check passes, the round is done in one collective. Otherwise
nothing of the reduced buffer is used (it is a scratch buffer: nothing the
caller holds was written) and every replica runs the agreement, which
raises [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] naming
what differs, or passes when the digests agree after all (the same leaves
on another device); the round then runs with its agreement first.

A round that was predicted but not run as predicted, on either side, is
noted as a round of another kind by both replicas, so their histories stay
alike; the digest covers every option that decides whether a round can be
predicted (`avgfn._round.engine` puts donation and results in flight in
it), so replicas whose options differ refuse each round instead.

Only groups of two replicas take this path: the sum of two values does not
depend on the order gloo adds them in, so appending the check keeps the
bits of the round whose agreement comes first; in a larger group a longer
buffer changes how the collective splits it, and with it the rounding.
Rounds with buckets, a reduced-precision wire, error feedback, a health
exchange, DTensor shards, or results in flight keep the agreement first
(a donated round, which would write as it reduces, runs as a plain one
where this path is open to it: `avgfn._round.engine`); so do rounds of more than
`LIMIT` elements, where a wrong prediction would waste a large collective
and the agreement is a small part of the round.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional

import torch

from avgfn._core import types as _types
from avgfn._core.errors import ReplicaMismatchError
from avgfn._core.types import Reduce
from avgfn._round import facts as _facts

Layout = tuple[int, torch.dtype, torch.device]
"""A round whose agreement may travel in its data: its element count, wire dtype and device."""

LIMIT = 1 << 23
"""The largest round (elements) whose agreement travels in its data."""

CHECK = 18
"""Elements appended to the data: 8 digest bytes, their squares, the marker, the health vouch."""

MARKER = 16
"""The check's element that a replica which declines the predicted round sets to 1."""

VOUCH = 17
"""The check's last element: 1 from a replica that vouches its shares finite (see `passed()`)."""

_OTHER = "other"
"""The layout of a round whose agreement comes first."""

_REFUSED = "refused"
"""Where the history stands after a round every replica refused."""

Entries = Callable[[], list[tuple[str, str]]]


class History:
    """The rounds a group agreed on, as far as they predict the next one.

    ``last`` is the layout of the last agreed round; ``successors`` maps a
    layout to the one that followed it and how often in a row (at most 2).
    """

    __slots__ = ("last", "successors", "__weakref__")

    def __init__(self) -> None:
        self.last: Any = None
        self.successors: dict[Any, tuple[Any, int]] = {}

    def predicted(self) -> Optional[Layout]:
        """The layout the next round is expected to have, or ``None`` (no prediction)."""
        entry = self.successors.get(self.last)
        if entry is None or entry[1] < 2 or entry[0] == _OTHER:
            return None
        return entry[0]

    def record(self, layout: Optional[Layout]) -> None:
        """Note a round every replica agreed on (``None``: one whose agreement comes first)."""
        now = _OTHER if layout is None else layout
        entry = self.successors.get(self.last)
        count = entry[1] + 1 if entry is not None and entry[0] == now else 1
        if len(self.successors) >= 64 and self.last not in self.successors:
            self.successors.clear()
        self.successors[self.last] = (now, min(count, 2))
        self.last = now

    def refused(self) -> None:
        """Note a round every replica refused (a mismatch): the next one is not predicted."""
        self.last = _REFUSED

    def forget(self) -> None:
        """Drop everything (after a failure that not every replica may have seen alike)."""
        self.last = None
        self.successors.clear()

    def outcome(self, agreement: Any, layout: Optional[Layout]) -> None:
        """Wait for ``agreement`` and note how it ended (it raises as the agreement does)."""
        try:
            agreement.wait()
        except ReplicaMismatchError:
            self.refused()
            raise
        except BaseException:
            self.forget()
            raise
        self.record(layout)


_HISTORIES: "weakref.WeakKeyDictionary[Any, tuple[Any, History]]" = weakref.WeakKeyDictionary()
"""The history of each group-backed Reduce that cannot name its process group."""

_BY_PROCESS_GROUP: "weakref.WeakKeyDictionary[Any, History]" = weakref.WeakKeyDictionary()
"""The history of each process group, shared by every Reduce over it."""


def history(reduce: Reduce) -> Optional[History]:
    """The history of ``reduce``'s group, when its rounds may be predicted (else ``None``).

    A group that can tell which process group is behind it (``history_token()``,
    as ``all_reduce_mean`` can) shares one history with every other Reduce
    over that process group: two averagers, each with its own
    ``all_reduce_mean()`` over one group, run their rounds on one sequence of
    collectives, which both replicas must predict alike. A new process group
    (a default group destroyed and created again holds new peers) starts a
    new history.
    """
    group = _types.group_of(reduce)
    if group is None or getattr(group, "agree_in_data", False) is not True:
        return None
    token = group.history_token() if hasattr(group, "history_token") else None
    if token is not None:
        try:
            shared = _BY_PROCESS_GROUP.get(token)
            if shared is None:
                shared = _BY_PROCESS_GROUP[token] = History()
            return shared
        except TypeError:  # a token that cannot be weakly referenced: keyed by the Reduce below
            pass
    found = _HISTORIES.get(group)
    if found is None or found[0] is not token:
        found = _HISTORIES[group] = (token, History())
    return found[1]


def layout(facts: _facts.Facts, reduce: Reduce) -> Optional[Layout]:
    """The layout of a round whose options let its agreement travel in its data (else ``None``)."""
    group = _types.group_of(reduce)
    if group is None or facts.device is None or facts.dtype not in (torch.float32, torch.float64):
        return None
    if getattr(group, "in_flight", False) is True or group.size != 2 or group.divisor() != 2:
        return None
    return (facts.count, facts.dtype, facts.device) if 0 < facts.count <= LIMIT else None


def block(digest: bytes, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This replica's check elements (written after the data's division: they are summed as they are).

    The vouch (the last element) is 0 here; a replica that read its shares
    as finite while it divided them writes 1 there (`avgfn._round.buffers`).
    """
    values = list(digest[:8])
    return torch.tensor(values + [v * v for v in values] + [0, 0], dtype=dtype, device=device)


def passed(summed: torch.Tensor, digest: bytes) -> tuple[bool, bool]:
    """Whether both replicas sent ``digest`` and neither the marker; and whether both vouched.

    ``summed``: the check's sums. Both replicas vouch (the vouch's sum is 2)
    only when each read its own shares as finite: the sum of two halves of
    finite values cannot overflow (its exact value is at most the dtype's
    largest), so the mean is finite without a read of its own. A replica
    that vouches nothing (non-finite values, or a round that does not read
    them) sends 0, and the mean is then read as before.
    """
    sums = summed.tolist()
    values = list(digest[:8])
    ok = sums[MARKER] == 0 and sums[:8] == [2 * v for v in values] and sums[8:16] == [2 * v * v for v in values]
    return ok, sums[VOUCH] == 2


class Predicted:
    """A round the group's history predicted: its check travels with its data.

    The engine packs the data with `block()` appended and reduces it; if
    `passed()`, it calls `done()` and uses the result. Otherwise it runs
    `fallback()`, the agreement of the round whose agreement comes first.
    """

    __slots__ = ("history", "layout", "digest", "entries")

    def __init__(self, history: History, layout: Layout, digest: bytes, entries: Entries) -> None:
        self.history = history
        self.layout = layout
        self.digest = digest
        self.entries = entries

    def done(self) -> None:
        """The check passed on every replica: note the round."""
        self.history.record(self.layout)

    def fallback(self, reduce: Reduce) -> "Recorded":
        """The agreement, begun after a check that did not pass (every replica runs it).

        If it passes (a peer's round had the same digest but another layout),
        the round is noted as one of another kind, as the peer that declined
        notes it: both histories stay alike.
        """
        return Recorded(self.history, None, _types.start_agree(reduce, self.digest, self.entries))


def decline(reduce: Reduce, history: History, predicted: Layout) -> None:
    """This replica's part in a predicted round it cannot send: zeros of its size, and the marker.

    They go on the predicted round's device, where the peers' data goes (a
    group with a backend per device takes each tensor on its own).
    """
    count, dtype, device = predicted
    zeros = torch.zeros(count + CHECK, dtype=dtype, device=device)
    zeros[count + MARKER] = 1
    try:
        _types.settle(_types.start_sum(reduce, zeros).wait())
    except BaseException:
        history.forget()
        raise


class Recorded:
    """The agreement of a round that was not predicted; its outcome is noted once waited for."""

    __slots__ = ("history", "layout", "agreement", "flags")

    def __init__(self, history: History, layout: Optional[Layout], agreement: Any) -> None:
        self.history = history
        self.layout = layout
        self.agreement = agreement
        self.flags: Any = None

    def wait(self) -> None:
        self.history.outcome(self.agreement, self.layout)
        self.flags = getattr(self.agreement, "flags", None)


def start(
    reduce: Reduce,
    layout: Optional[Layout],
    digest: bytes,
    entries: Entries,
    flags: Any,
) -> Any:
    """The round's agreement on a group with a `History` (``None``: the group has none)."""
    history_ = history(reduce)
    if history_ is None:
        return None
    predicted = history_.predicted()
    if predicted is not None and predicted == layout:
        return Predicted(history_, layout, digest, entries)
    if predicted is not None:  # the peer may send its data now: take part, then agree first
        decline(reduce, history_, predicted)
        layout = None  # noted as a round of another kind, as the peer notes it
    return Recorded(history_, layout, _types.start_agree(reduce, digest, entries, flags))
