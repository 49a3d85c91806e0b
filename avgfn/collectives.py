"""Reduces over real ``torch.distributed`` process groups.

This is the only module of avgfn that imports ``torch.distributed``: the
algorithms only ever see a [`avgfn.Reduce`][avgfn.Reduce].
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as _funcol
from avgfn._core import tree as _tree

from avgfn._core.errors import PeerError, ReplicaMismatchError
from avgfn._core.levels import group_sizes
from avgfn._core.types import Done, ReduceSchedule, overrides_start_sum_alone, settle

Timeout = Union[None, float, int, datetime.timedelta]


MAX_TIMEOUT_S = (2**31 - 1) / 1000
"""The longest timeout a round accepts: ``2**31 - 1`` milliseconds (about 24.8 days).

torch hands the timeout of ``Work.wait`` to C++ as milliseconds, and gloo
waits on a condition variable until ``now + timeout`` in nanoseconds. Past
about ``9.2e9`` seconds that sum overflows: measured on torch 2.13, a
pending all-reduce then either times out at once ("Operation timed out!",
``datetime.timedelta.max`` among them) or never returns. ``2**31 - 1``
milliseconds (the usual bound of an int32 millisecond timer) is far below
that and verified to wait as asked.
"""

MIN_TIMEOUT_S = 0.001
"""The shortest timeout a round can honour: one millisecond (the backend counts whole ones)."""


def _seconds(timeout: Timeout) -> Optional[float]:
    """``timeout`` in seconds, refusing what the backend cannot honour (``ValueError``)."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        value = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        try:
            value = float(timeout)
        except OverflowError:  # an int past the range of a float
            value = math.inf
    else:
        raise TypeError(f"timeout must be None, seconds or a timedelta, got {timeout!r}")
    if not math.isfinite(value):
        raise ValueError(f"timeout must be a finite number of seconds, got {timeout!r}")
    if not value > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if value < MIN_TIMEOUT_S:
        raise ValueError(
            f"timeout must be at least {MIN_TIMEOUT_S:g} seconds (the backend counts whole "
            f"milliseconds, and reads 0 as no timeout at all), got {timeout!r}"
        )
    if value > MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout must be at most {MAX_TIMEOUT_S:g} seconds (2**31 - 1 ms, about 24.8 days; "
            f"a longer wait overflows the backend's clock), got {timeout!r}; "
            "pass None to keep the group's own timeout"
        )
    return value


__all__ = [
    "CommHookState", "GroupMean", "MeanInFlight", "all_reduce_mean", "ddp_comm_hook", "hierarchy", "settled",
]


def settled(tree: Any) -> Any:
    """``tree`` with every result still in flight waited for and replaced by its plain tensor.

    A state (or params) that holds a [`MeanInFlight`][avgfn.collectives.MeanInFlight]
    (or torch's ``AsyncCollectiveTensor``) cannot be handed to a function
    compiled with ``torch.compile``, which does not trace them: pass
    ``settled(state)`` instead. Everything else comes back as the same object;
    a failure of a collective in flight raises here (a
    [`avgfn.PeerError`][avgfn.PeerError]).
    """
    return _tree.tree_map(settle, tree)


class MeanInFlight(torch.Tensor):
    """The result of [`all_reduce_mean(in_flight=True)`][avgfn.collectives.all_reduce_mean]: a mean still on the wire.

    A tensor with the shape, dtype and device of the mean, whose collective
    was started but not waited for. Its first read (any op that looks at its
    values: arithmetic, ``torch.isfinite``, ``.item()``, printing) waits for
    the collective, at most the Reduce's ``timeout`` from that moment, and
    raises [`avgfn.PeerError`][avgfn.PeerError] as a blocking round would; then it
    computes on the plain result. Views of it (slicing, ``view``, ``split``)
    are in flight too, with the same collective. Ops return plain tensors.
    An averager may keep one in its state across steps
    ([`avgfn.streaming_diloco()`][avgfn.streaming_diloco] with ``delay > 0``,
    [`avgfn.overlapped_diloco()`][avgfn.overlapped_diloco]): the all-reduce then runs
    while the replicas compute, and [`avgfn.state_dict()`][avgfn.state_dict] waits for it.

    Attributes:
      completed: whether the collective was waited for (by a read or `wait()`).
    """

    _elem: torch.Tensor
    _wait: "_Once"

    @staticmethod
    def __new__(cls, elem: torch.Tensor, wait: "_Once") -> "MeanInFlight":
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=elem.device, layout=elem.layout, requires_grad=False,
        )  # fmt: skip
        out._elem = elem
        out._wait = wait
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @property
    def completed(self) -> bool:
        return self._wait.done

    def wait(self) -> torch.Tensor:
        """Wait for the collective (once); return the plain tensor that holds the mean."""
        self._wait()
        if self.requires_grad and not self._elem.requires_grad:  # the flag an averager gave the result
            self._elem.requires_grad_(True)
        return self._elem

    def __repr__(self) -> str:  # type: ignore[override]
        return repr(self.wait())  # printing reads the values: it waits

    def tolist(self) -> Any:
        return self.wait().tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        return self.wait().numpy(*args, **kwargs)

    def __deepcopy__(self, memo: Any) -> torch.Tensor:
        return self.wait().clone()  # a copy of the mean, a plain tensor

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickling (torch.save) waits
        return self.wait().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, MeanInFlight) and not first.completed and getattr(func, "is_view", False):
            # a view reads nothing: it stays on the wire with the same collective
            out = func(first._elem, *args[1:], **kwargs)
            wait = first._wait
            return _tree.tree_map_only(torch.Tensor, lambda t: MeanInFlight(t, wait), out)
        args, kwargs = _tree.tree_map_only(MeanInFlight, lambda t: t.wait(), (args, kwargs))
        return func(*args, **kwargs)


class _Once:
    """Wait for a pending collective once; every later call returns at once (or raises again)."""

    __slots__ = ("pending", "done", "error")

    def __init__(self, pending: "_PendingMean") -> None:
        self.pending = pending
        self.done = False
        self.error: Optional[BaseException] = None

    def __call__(self) -> None:
        if self.done:
            return
        if self.error is not None:
            raise self.error
        try:
            self.pending.wait()
        except BaseException as error:
            self.error = error
            raise
        self.done = True


class GroupMean:
    """A [`avgfn.Reduce`][avgfn.Reduce] over a process group: divide, then all-reduce a sum.

    The arithmetic is torch's own in ``average_parameters`` (each rank divides
    by the group size, then the group sums), so results match torch bit for
    bit. A rank outside the group gets its input back unchanged.

    While ``torch.compile`` traces, the sum is torch's functional all-reduce,
    so a step that ends in ``avg.update`` compiles with ``fullgraph=True``
    and gives the eager bits; there the per-round agreement is skipped and a
    failure surfaces as torch's error after the group's own timeout, not as
    [`avgfn.PeerError`][avgfn.PeerError] after ``timeout`` (see ``docs/collectives.md``).

    Attributes:
      group: the process group (``None``: the default group).
      timeout: seconds a round may wait for its peers before it raises
        [`avgfn.PeerError`][avgfn.PeerError] (``None``: the group's own timeout).
      in_flight: whether an eager call returns at once, its result a
        [`MeanInFlight`][avgfn.collectives.MeanInFlight] that waits when first read.
      spare_groups: more process groups over the same ranks, in the same
        order (a tuple, empty by default); a round's pieces run on them
        beside ``group`` (see `start_sum_on()`).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        timeout: Timeout = None,
        in_flight: bool = False,
        spare_groups: Optional[Sequence[dist.ProcessGroup]] = (),
    ) -> None:
        if not isinstance(in_flight, bool):
            raise TypeError(f"in_flight must be a bool, got {type(in_flight).__name__} {in_flight!r}")
        self.group = group
        self.timeout = _seconds(timeout)
        self.in_flight = in_flight
        self.spare_groups = _spare_groups(group, spare_groups)

    @property
    def lanes(self) -> int:
        """How many sums can run side by side: the group and its `spare_groups`.

        1 for a subclass that overrides `start_sum` but not `start_sum_on`
        (see [`ForwardingReduce.lanes`][avgfn.ForwardingReduce]).
        """
        return 1 if overrides_start_sum_alone(type(self), GroupMean) else 1 + len(self.spare_groups)

    @property
    def lane_names(self) -> tuple[str, ...]:
        """The names of the `spare_groups` (``ProcessGroup.group_name``), which every rank's copy shares."""
        return tuple(str(getattr(g, "group_name", g)) for g in self.spare_groups)

    def describe(self) -> str:
        """A short name of the group, for error messages."""
        try:
            group = self._group()
            if self.group is None:
                return f"the default group of {dist.get_world_size(group)} ranks"
            return f"the group of ranks {dist.get_process_group_ranks(group)}"
        except Exception:  # the group may already be broken
            return repr(self.group)

    def _group(self) -> Any:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "all_reduce_mean: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        return self.group if self.group is not None else dist.group.WORLD

    @property
    def size(self) -> int:
        """The number of ranks in the group (0 on a rank outside it)."""
        group = self._group()
        if dist.get_rank(group) < 0:
            return 0
        return dist.get_world_size(group)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.start(tensor).wait()

    def start(self, tensor: torch.Tensor) -> Union["_PendingMean", Done]:
        """Begin the mean of ``tensor`` without waiting (``async_op=True``).

        The buckets of a round (``bucket_bytes``) use this to pack the next
        bucket while the previous one is on the wire.
        """
        group = self._group()
        if dist.get_rank(group) < 0:
            return _PendingMean(self, None, tensor, 0.0)
        tensor.div_(dist.get_world_size(group))
        return self.start_sum(tensor)

    def divisor(self) -> int:
        """What each rank divides its values by before the sum (1 outside the group).

        With `start_sum()`, this lets a caller fuse the division into the
        copy that packs its buffer (``torch.div(leaf, divisor, out=...)``):
        the same bits as `start()`, one pass over the memory fewer.
        """
        return max(self.size, 1)

    def start_sum(self, tensor: torch.Tensor) -> Union["_PendingMean", Done]:
        """Begin the sum of ``tensor`` (already divided by `divisor()`) over the group.

        Eagerly this is a c10d ``all_reduce(async_op=True)`` whose ``wait``
        honours `timeout` and raises [`avgfn.PeerError`][avgfn.PeerError]. While
        ``torch.compile`` traces, it is torch's functional all-reduce instead
        (``torch.distributed._functional_collectives.all_reduce``, a sum, the
        same bits): an op of the graph, whose result waits where it is first
        read. Its wait is the group's own (see ``docs/collectives.md``).
        """
        return self._start_sum(self._group(), tensor)

    def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Union["_PendingMean", Done]:
        """`start_sum()` on one of the `lanes`: 0 is ``group``, ``k`` is ``spare_groups[k - 1]``.

        Sums on different lanes run side by side, each over a process group
        (and a connection) of its own: the round engine spreads the pieces of
        a large round over them (see ``docs/collectives.md``). Every rank must
        start the same pieces on the same lanes, in the same order; the
        agreement of each round compares `lanes`.
        """
        if isinstance(lane, bool) or not isinstance(lane, int):
            raise TypeError(f"lane must be an int, got {type(lane).__name__} {lane!r}")
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane must be in [0, {self.lanes}) (the group and its spare groups), got {lane}")
        group = self._group() if lane == 0 else self.spare_groups[lane - 1]
        return self._start_sum(group, tensor)

    def _start_sum(self, group: Any, tensor: torch.Tensor) -> Union["_PendingMean", Done]:
        if dist.get_rank(group) < 0:
            return _PendingMean(self, None, tensor, 0.0)
        if torch.compiler.is_compiling():
            return Done(_funcol.all_reduce(tensor, "sum", group))  # waits where first read
        started = time.monotonic()
        try:
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        except RuntimeError as error:
            raise self._failure(error, started) from error
        pending = _PendingMean(self, work, tensor, started)
        if self.in_flight:
            return Done(MeanInFlight(tensor, _Once(pending)))  # waited where first read
        return pending

    def commit(self) -> bool:
        """A process group keeps every round that completes: always True."""
        return True

    def check_replicas(self, digest: bytes, entries: list[tuple[str, str]]) -> None:
        """`agree()` with the entries given as a list."""
        self.agree(digest, lambda: entries)

    def agree(self, digest: bytes, entries: Any) -> None:
        """Raise [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] on every rank unless all digests agree.

        One all-reduce of four int64 values (the digest, its negation and two health flags, with
        MAX); only when they disagree, the ``(path, shape dtype)`` entries are
        gathered (as UTF-8 JSON in uint8 tensors: ``all_gather_object`` needs
        NumPy) to report the first difference. A collective: every rank of
        the group must call it; it waits at most ``timeout`` for its peers,
        then raises [`avgfn.PeerError`][avgfn.PeerError].
        """
        self.start_agree(digest, entries).wait()

    agree_in_data = True
    """A round the group's history predicts may carry its agreement's check in its data.

    Every rank runs the same rounds through this object in the same order,
    so the size of the next round can be predicted from the past ones (see
    ``docs/round.md``): in a group of two, such a round is one all-reduce of
    its data and the check, instead of the check's all-reduce, then the data's.
    A subclass whose ``start_sum`` does not sum exactly the tensor it is given
    (a compressing one) must set it to ``False``.
    """

    def history_token(self) -> Any:
        """The process group behind this Reduce: the history of its rounds restarts when it changes."""
        return self._group()

    agree_carries_flags = True
    """`start_agree()` takes ``flags``: the round's health flags travel with the check."""

    def start_agree(
        self, digest: bytes, entries: Any, flags: Sequence[int] = (0, 0)
    ) -> "_Agreement":
        """Begin `agree()` without waiting; its ``wait()`` raises as `agree()` does.

        The round engine packs its buffer while the check is on the wire. The
        caller must not start another collective on the group before ``wait()``.
        ``flags`` (two 0/1 ints) travel in the same all-reduce, with MAX: after
        ``wait()``, the agreement's ``flags`` says whether any rank set each
        one (a donated round's "not finite" and "no room on the wire"), which
        spares the round a collective of its own.
        """
        group = self._group()
        if dist.get_rank(group) < 0 or torch.compiler.is_compiling():
            # Under torch.compile the check (a host-side digest, then .item()) cannot be a
            # graph op: it is skipped, as under vmap (see docs/collectives.md).
            return _Agreement(self, None, 0, entries, [int(f) for f in flags])
        value = int.from_bytes(digest[:8], "little", signed=True) >> 1  # room for the negation
        # always four int64, whatever the flags: every rank's check has the same size
        probe = torch.tensor([value, -value, int(flags[0]), int(flags[1])], dtype=torch.int64)
        started = time.monotonic()
        try:
            work = dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group, async_op=True)
        except RuntimeError as error:
            raise self._failure(error, started) from error
        return _Agreement(self, _PendingMean(self, work, probe, started), value, entries, None)

    def _mismatch(self, entries: list[tuple[str, str]]) -> ReplicaMismatchError:
        group = self._group()
        gathered = self._gather_entries(entries, group)
        ranks = dist.get_process_group_ranks(group)
        refused_by = tuple(
            rank for rank, held in zip(ranks, gathered) if any(path == "<refused>" for path, _ in held)
        )
        advice = (
            f"nothing was averaged; fix the inputs of rank {refused_by[0]}: its own error says what it refused"
            if refused_by
            else "averaging them would fail or mix unrelated numbers, so nothing was averaged; "
            "Round(verify=None) skips this check at init, Round(agree=False) the one at each round"
        )
        differs, what = _difference(gathered, ranks)
        error = ReplicaMismatchError(f"the replicas of {self.describe()} hold params that differ: {what} ({advice})")
        error.refused_by = refused_by
        error.differs = differs
        return error

    def _collective(self, begin: Any) -> None:
        """Run ``begin()`` (an ``async_op=True`` collective) to completion within the timeout."""
        started = time.monotonic()
        try:
            work = begin()
        except RuntimeError as error:
            raise self._failure(error, started) from error
        _PendingMean(self, work, None, started).wait()  # type: ignore[arg-type]

    def _gather_entries(self, entries: list[tuple[str, str]], group: Any) -> list[Any]:
        payload = torch.tensor(list(json.dumps(entries).encode()), dtype=torch.uint8)
        size = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        mine = torch.tensor([payload.numel()], dtype=torch.int64)
        self._collective(lambda: dist.all_gather(sizes, mine, group=group, async_op=True))
        longest = max(int(n) for n in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
        self._collective(lambda: dist.all_gather(buffers, padded, group=group, async_op=True))
        return [
            [tuple(entry) for entry in json.loads(bytes(buf[: int(n)].tolist()).decode())]
            for buf, n in zip(buffers, sizes)
        ]

    def _failure(self, error: BaseException, started: float) -> PeerError:
        waited = time.monotonic() - started
        limit = "the group's timeout" if self.timeout is None else f"timeout {self.timeout:g}s"
        return PeerError(
            f"all_reduce_mean over {self.describe()} failed after {waited:.2f}s ({limit}): "
            f"a peer died, stalled or left the group, or is out of step (at this step its "
            f"schedule runs no round, or a round over another group). The params and state passed to update "
            f"are unchanged. Cause: {error}",
            group=self.describe(),
            timeout=self.timeout,
        )

    def __repr__(self) -> str:
        timeout = "" if self.timeout is None else f", timeout={self.timeout:g}"
        held = ", in_flight=True" if self.in_flight else ""
        spare = f", spare_groups={self.spare_groups!r}" if self.spare_groups else ""
        return f"all_reduce_mean(group={self.group!r}{timeout}{held}{spare})"


def _ranks(group: Any) -> Optional[list[int]]:
    """The global ranks of ``group`` in its order (``None``: this rank is outside it)."""
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return None
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _spare_groups(group: Optional[dist.ProcessGroup], spare: Optional[Sequence[Any]]) -> tuple[Any, ...]:
    """``spare`` as a tuple, each checked to hold the ranks of ``group``, in its order, on its backend."""
    if spare is None:
        return ()
    if isinstance(spare, (dist.ProcessGroup, str, bytes)) or not isinstance(spare, Sequence):
        raise TypeError(f"spare_groups must be a sequence of process groups, got {spare!r}")
    spare = tuple(spare)
    if not spare:
        return spare
    for k, extra in enumerate(spare):
        if not (isinstance(extra, dist.ProcessGroup) or extra is dist.GroupMember.NON_GROUP_MEMBER):
            raise TypeError(f"spare_groups[{k}] must be a ProcessGroup, got {extra!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "all_reduce_mean(spare_groups=...): torch.distributed is not initialized; "
            "create the process groups after torch.distributed.init_process_group"
        )
    main = dist.group.WORLD if group is None else group
    ranks = _ranks(group)
    backend = None if ranks is None else dist.get_backend(main)
    seen = [main]
    for k, extra in enumerate(spare):
        if any(extra is other for other in seen) and extra is not dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"spare_groups[{k}] is the group itself or another spare group: each lane needs a "
                "process group of its own (dist.new_group(ranks) makes one)"
            )
        seen.append(extra)
        try:
            held = _ranks(extra)
        except (KeyError, RuntimeError, ValueError) as error:  # destroyed, or never registered
            raise ValueError(f"spare_groups[{k}] is not a live process group of this world: {error!r}") from error
        if held is not None and backend is not None and dist.get_backend(extra) != backend:
            raise ValueError(
                f"spare_groups[{k}] runs on backend {dist.get_backend(extra)!r}, the group on {backend!r}: "
                "a lane must be another group of the same backend"
            )
        if held != ranks:
            raise ValueError(
                f"spare_groups[{k}] must hold the ranks of the group in the same order: the group has "
                f"{'no place for this rank' if ranks is None else ranks}, spare_groups[{k}] has "
                f"{'no place for this rank' if held is None else held}"
            )
    return spare


def _first_difference(entries: list[list[tuple[str, str]]], ranks: list[int]) -> str:
    """What differs between the first two replicas whose entries differ, in words."""
    return _difference(entries, ranks)[1]


def _difference(entries: list[list[tuple[str, str]]], ranks: list[int]) -> tuple[str, str]:
    """What differs first between the first rank's entries and another's: its kind and its words.

    The kind is one of `avgfn.ReplicaMismatchError.differs`'s.
    """
    first = entries[0]
    for rank, other in zip(ranks[1:], entries[1:]):
        if other == first:
            continue
        mine, theirs = dict(first), dict(other)
        for who, held, peer, peers in ((ranks[0], mine, rank, theirs), (rank, theirs, ranks[0], mine)):
            if "<refused>" in held:  # first: it says why, whatever else differs
                return "refused", f"rank {who} refused the round ({held['<refused>']})" + _steps_apart(held, peer, peers)
        if mine.get("<step>") != theirs.get("<step>"):
            return "step", (
                f"rank {ranks[0]} averages {_at(mine.get('<step>'))}, rank {rank} {_at(theirs.get('<step>'))} "
                "(their schedules are out of step)"
            )
        leaves = _leaf_difference(first, other, ranks[0], rank)
        if leaves is not None:  # before the options: a replica's leaves also decide its devices
            return "leaves", leaves
        if mine.get("<round>") != theirs.get("<round>"):
            return "round", (
                f"rank {ranks[0]} runs its rounds as {mine.get('<round>')}, rank {rank} as "
                f"{theirs.get('<round>')} (build every replica with the same averager and the same Round, and "
                "pass each the state its last update returned)"
            )
        if mine.get("<values>") != theirs.get("<values>"):
            return "values", f"rank {ranks[0]} and rank {rank} start from different values"
        return "order", f"rank {ranks[0]} and rank {rank} hold the same leaves in a different order"
    return "", "their signatures differ"


def _at(step: Optional[str]) -> str:
    """Where a check stands in its replica's schedule, from its ``<step>`` entry."""
    if step is None:  # a check of the structure or values, outside any round
        return "in a check of its params outside any round (at init, or before an outer step's first round)"
    if step == "none":
        return "in a round without a step (avgfn.average, or a check at init)"
    return f"at step {step}"


def _steps_apart(held: dict[str, str], peer: int, peers: dict[str, str]) -> str:
    """``, at step a ... where rank p averages at step b`` when both checks have a step and they differ."""
    mine, theirs = held.get("<step>"), peers.get("<step>")
    if mine == theirs or None in (mine, theirs) or "none" in (mine, theirs):  # (a check at init has none)
        return ""
    return (
        f", at step {mine} of its schedule, where rank {peer} averages at step {theirs} "
        "(their schedules may be out of step)"
    )


_SPECIAL = ("<values>", "<step>", "<round>", "<refused>")


def _leaf_difference(
    first: list[tuple[str, str]], other: list[tuple[str, str]], rank_a: int, rank_b: int
) -> Optional[str]:
    """Name the first leaf that one rank averages and the other does not, or holds otherwise."""
    mine = [(path, what) for path, what in first if path not in _SPECIAL]
    theirs = [(path, what) for path, what in other if path not in _SPECIAL]
    for empty, full, who, peer in ((mine, theirs, rank_a, rank_b), (theirs, mine, rank_b, rank_a)):
        if not empty and full:
            path, what = full[0]
            return (
                f"rank {who} averages no leaf in this round (its selection is empty), rank {peer} "
                f"averages {len(full)} (the first: {path}: {what})"
            )
    held, held_by_other = dict(mine), dict(theirs)
    for path, what in mine:
        if path not in held_by_other:
            return f"rank {rank_a} has {path}: {what}, rank {rank_b} has no leaf {path}"
        if held_by_other[path] != what:
            return f"rank {rank_a} has {path}: {what}, rank {rank_b} has {path}: {held_by_other[path]}"
    for path, what in theirs:
        if path not in held:
            return f"rank {rank_a} has no leaf {path}, rank {rank_b} has {path}: {what}"
    return None


class _PendingMean:
    __slots__ = ("owner", "work", "tensor", "started")

    def __init__(self, owner: GroupMean, work: Any, tensor: torch.Tensor, started: float) -> None:
        self.owner = owner
        self.work = work
        self.tensor = tensor
        self.started = started

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                if self.owner.timeout is None:
                    self.work.wait()
                else:
                    self.work.wait(datetime.timedelta(seconds=self.owner.timeout))
            except RuntimeError as error:
                raise self.owner._failure(error, self.started) from error
        return self.tensor


class _Agreement:
    """An agreement check on the wire (`GroupMean.start_agree()`)."""

    __slots__ = ("owner", "pending", "value", "entries", "flags")

    def __init__(
        self, owner: GroupMean, pending: Optional[_PendingMean], value: int, entries: Any, flags: Any
    ) -> None:
        self.owner = owner
        self.pending = pending
        self.value = value
        self.entries = entries
        self.flags: Optional[list[int]] = flags  # after wait(): each flag's MAX over the ranks

    def wait(self) -> None:
        """Return when every rank handed in the same digest; raise on every rank otherwise."""
        if self.pending is None:
            return
        probe = self.pending.wait().tolist()
        self.pending = None
        if probe[0] == self.value and probe[1] == -self.value:
            self.flags = probe[2:]
            return
        raise self.owner._mismatch(self.entries())


def all_reduce_mean(
    group: Optional[dist.ProcessGroup] = None,
    *,
    timeout: Timeout = None,
    in_flight: bool = False,
    spare_groups: Optional[Sequence[dist.ProcessGroup]] = (),
) -> GroupMean:
    """The Reduce of a real process group: the mean over its ranks.

    Args:
      group: a process group; ``None`` means the default group, looked up at
        each call (so the Reduce may be built before ``init_process_group``).
        On a rank that is not in ``group`` (``dist.new_group`` hands such a
        rank a placeholder), the Reduce returns its input unchanged.
      timeout: how long a round may wait for its peers (seconds or a
        ``timedelta``); past it, or as soon as the backend reports a dead
        peer, the round raises [`avgfn.PeerError`][avgfn.PeerError] naming the group and
        the timeout (the averagers add the step). ``None`` keeps the group's
        own timeout (gloo's default is 30 minutes). At most
        `MAX_TIMEOUT_S` seconds (``2**31 - 1`` ms).
      in_flight: ``False`` (default): each call waits for its all-reduce and
        returns a plain tensor. ``True``: a call returns as soon as the
        all-reduce is started, with a [`MeanInFlight`][avgfn.collectives.MeanInFlight]
        that waits when first read (at most ``timeout`` from then, raising
        [`avgfn.PeerError`][avgfn.PeerError] as a blocking call would). The bits are
        the same. The argument is written while the call is in flight: read
        the result, not the argument. This is what lets [`avgfn.streaming_diloco()`][avgfn.streaming_diloco]
        (``delay > 0``) and [`avgfn.overlapped_diloco()`][avgfn.overlapped_diloco] keep the
        all-reduce on the wire while the replicas compute. Under
        ``torch.compile`` every call is in flight (torch's functional all-reduce).
      spare_groups: more process groups over the ranks of ``group``, in the
        same order and on the same backend (each made by
        ``dist.new_group(ranks)`` on every rank of the world, before this
        call; they are fixed here, also when ``group`` is ``None``). The
        round engine then sends a large round over them side by side: in a
        group of two, its one buffer in one piece per group; in any group,
        its buckets in turn. Each group has a connection and a thread of its
        own, which on gloo moves a large round faster than one all-reduce
        does (measured in ``docs/performance.md``). The bits are those of the
        round on ``group`` alone (see ``docs/collectives.md``). Every replica
        must pass the same groups in the same order; each round's agreement
        compares them.

    Returns:
      A [`GroupMean`][avgfn.collectives.GroupMean], callable as ``reduce(tensor) -> tensor``. It writes
      into its argument (the averagers hand it a buffer of their own).

    Raises:
      TypeError: ``group`` is not a process group, ``timeout`` is neither
        seconds nor a ``timedelta``, or ``spare_groups`` is not a sequence of
        process groups.
      ValueError: a ``timeout`` that is not finite, not positive, or longer
        than `MAX_TIMEOUT_S` (the backend could not honour it); a spare group
        over other ranks (or in another order), on another backend, destroyed,
        or given twice or equal to ``group``.
      RuntimeError: ``spare_groups`` given before ``init_process_group``.

    Examples:
      >>> import tempfile, torch, torch.distributed as dist, avgfn
      >>> store = tempfile.NamedTemporaryFile(delete=False).name
      >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
      >>> reduce = avgfn.collectives.all_reduce_mean()
      >>> avgfn.average({"w": torch.tensor([1.0, 2.0])}, reduce)
      {'w': tensor([1., 2.])}
      >>> dist.destroy_process_group()
    """
    if not (
        group is None
        or isinstance(group, dist.ProcessGroup)
        or group is dist.GroupMember.NON_GROUP_MEMBER  # what new_group gives a non-member
    ):
        raise TypeError(f"group must be a ProcessGroup or None, got {group!r}")
    return GroupMean(group, _seconds(timeout), in_flight, spare_groups)


PeriodGroupSizes = Union[Mapping[int, int], Sequence[tuple[int, int]]]


def hierarchy(
    period_group_sizes: PeriodGroupSizes,
    group: Optional[dist.ProcessGroup] = None,
    *,
    timeout: Timeout = None,
) -> list[tuple[int, GroupMean]]:
    """Build the levels of [`avgfn.hierarchical()`][avgfn.hierarchical] on real process groups.

    The groups are made exactly as torch's ``HierarchicalModelAverager`` makes
    them: a level whose size is that of ``group`` uses ``group`` itself; any
    other size uses ``dist.new_subgroups(group_size=size, group=group)``, i.e.
    consecutive ranks. Every rank must call this, in the same order (it creates
    process groups).

    Args:
      period_group_sizes: ``period -> group size`` (a mapping, as torch's
        ``period_group_size_dict``, or ``(period, size)`` pairs), in strictly
        increasing period. The last size must be the size of ``group``.
      group: the overall group; ``None`` means the default group.
      timeout: as in [`all_reduce_mean()`][avgfn.collectives.all_reduce_mean], for every level.

    Returns:
      ``[(period, reduce), ...]``, ready for [`avgfn.hierarchical()`][avgfn.hierarchical].

    Raises:
      ValueError: empty or non-increasing periods, a first period ``<= 0``, a
        size that does not divide the size of ``group``, or a last size that
        differs from it.
    """
    seconds = _seconds(timeout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "hierarchy: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    overall = dist.get_world_size(group)
    pairs = group_sizes(period_group_sizes, overall, "the size of group")
    levels = []
    for period, size in pairs:
        if size == overall:
            sub = group
        else:
            sub, _ = dist.new_subgroups(group_size=size, group=group)
        levels.append((period, GroupMean(sub, seconds)))
    return levels


# --- DDP communication hook (post-local SGD's gradient half) -------------------------


class CommHookState:
    """State of [`ddp_comm_hook()`][avgfn.collectives.ddp_comm_hook]: the schedule and where the step comes from.

    Attributes:
      gradients: the [`avgfn.GradientSchedule`][avgfn.GradientSchedule].
      step: a callable returning the current 0-based iteration, or ``None``.
      iteration: the hook's own iteration counter, used when ``step`` is
        ``None``. Exactly as torch's ``PostLocalSGDState.iter``: advanced
        after the last bucket of each backward pass until it reaches
        ``gradients.start_step``, where it stops (every later iteration is in
        the local phase, so there is nothing more to count). Save it with your
        checkpoint; with ``step`` given, it stays at its initial value.
    """

    __slots__ = ("gradients", "step", "iteration")

    def __init__(self, gradients: Any, step: Optional[Any] = None, iteration: int = 0) -> None:
        self.gradients = gradients
        self.step = step
        self.iteration = iteration

    def current_step(self) -> int:
        """The iteration the hook is averaging gradients for."""
        return self.iteration if self.step is None else self.step()

    def __repr__(self) -> str:
        source = "own counter" if self.step is None else "external step"
        return f"CommHookState(start_step={self.gradients.start_step}, {source}, iteration={self.iteration})"


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(tensor)
    return future


def _post_local_hook(state, bucket):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    # No annotations on purpose: DDP compares them with dist.GradBucket and
    # Future[Tensor] at registration, and this module's annotations are strings
    # (so mypy is told above not to ask for them; it still checks the body).
    step = state.current_step()
    if state.step is None and bucket.is_last() and step < state.gradients.start_step:
        state.iteration += 1  # torch's counter stops at start_localSGD_iter, and so does this one
    reduce = state.gradients.reduce_at(step)
    buffer = bucket.buffer()
    if reduce is None:
        return _completed(buffer)
    if isinstance(reduce, GroupMean):
        # Asynchronous, overlapping the rest of the backward pass: GroupMean's
        # own arithmetic (divide, then sum), which is torch's _allreduce_fut's.
        pending = reduce.start(buffer)
        if not isinstance(pending, _PendingMean):  # traced: the functional collective's result
            return _completed(pending.wait())
        if pending.work is None:  # a rank outside the group
            return _completed(pending.tensor)
        return pending.work.get_future().then(lambda fut: fut.value()[0])
    result = reduce(buffer)
    if not isinstance(result, torch.Tensor) or result.shape != buffer.shape:
        raise TypeError(
            "ddp_comm_hook: the Reduce must return a tensor shaped like the bucket "
            f"{tuple(buffer.shape)}, got {result!r}"
        )
    return _completed(result)


def ddp_comm_hook(gradients: Any, *, step: Optional[Any] = None) -> tuple[CommHookState, Any]:
    """A DDP communication hook that averages gradients as a gradient schedule says.

    The DDP twin of [`avgfn.GradientSchedule.update()`][avgfn.GradientSchedule.update], and the equivalent
    of torch's ``PostLocalSGDState`` + ``post_localSGD_hook``: at iteration
    ``step``, each gradient bucket is averaged over
    ``gradients.reduce_at(step)`` (the global Reduce before the switch step,
    then the local one, or none). A Reduce from [`all_reduce_mean()`][avgfn.collectives.all_reduce_mean] runs
    asynchronously, as DDP's own all-reduce does; any other Reduce is called
    synchronously on the bucket.

    One counter: pass ``step=lambda: opt.iteration`` with an
    [`avgfn.AveragingOptimizer`][avgfn.AveragingOptimizer] ``opt``, and the hook and the parameter
    averaging read the same counter (which ``opt.state_dict()`` saves). Without
    ``step``, the hook counts backward passes itself, as torch's does, up to
    the switch step (see [`CommHookState`][avgfn.collectives.CommHookState]).

    Args:
      gradients: an [`avgfn.GradientSchedule`][avgfn.GradientSchedule] (``post_local_sgd(...).gradients``)
        with ``where=None`` (DDP averages every gradient).
      step: a callable returning the current 0-based iteration, or ``None``.

    Returns:
      ``(state, hook)``, for ``ddp_model.register_comm_hook(state, hook)``.

    Raises:
      TypeError: ``gradients`` is not a GradientSchedule, or ``step`` is not callable.
      ValueError: the schedule has a ``where`` selection, which a bucket cannot honour.

    Examples:
      >>> import tempfile, torch, torch.distributed as dist, avgfn
      >>> store = tempfile.NamedTemporaryFile(delete=False).name
      >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
      >>> mean = avgfn.collectives.all_reduce_mean()
      >>> algo = avgfn.post_local_sgd(2, global_reduce=mean, local_reduce=None, period=2)
      >>> model = torch.nn.Linear(2, 1)
      >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
      >>> opt = avgfn.AveragingOptimizer(
      ...     torch.optim.SGD(model.parameters(), lr=0.1), avgfn.ModuleAverager(model, algo.averager))
      >>> state, hook = avgfn.collectives.ddp_comm_hook(algo.gradients, step=lambda: opt.iteration)
      >>> ddp.register_comm_hook(state, hook)
      >>> for _ in range(3):
      ...     opt.zero_grad(); ddp(torch.ones(1, 2)).sum().backward(); opt.step()
      >>> opt.iteration, int(opt.averager.state.rounds)
      (3, 1)
      >>> dist.destroy_process_group()
    """
    if not isinstance(gradients, ReduceSchedule):
        raise TypeError(
            f"ddp_comm_hook: gradients must be an avgfn.GradientSchedule, got {type(gradients).__name__}"
        )
    if gradients.where is not None:
        raise ValueError(
            "ddp_comm_hook: the gradient schedule selects leaves with where=..., but DDP hands the "
            "hook flat buckets of every gradient; build the schedule with where=None"
        )
    if step is not None and not callable(step):
        raise TypeError(f"ddp_comm_hook: step must be a callable returning an int or None, got {step!r}")
    return CommHookState(gradients, step), _post_local_hook
