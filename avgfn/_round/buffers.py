"""Pack, reduce, unpack: the only code that moves a round's values through buffers.

The plain round copies the selected leaves into one fresh buffer (the
division by the group size fused into that copy when the Reduce divides,
then sums; a product by the reciprocal when the divisor is a power of two,
which has the same bits), reduces it, and hands back views of the result
cast to each leaf's dtype: its inputs are never written. The options of a
[`avgfn.Round`][avgfn.Round] trade that purity or precision for speed and memory:

* ``donate=True``: the caller gives up the params it passes in (as JAX's
  ``donate_argnums``) and must use the returned ones. When the selected
  leaves tile one storage in order (as the outputs of any round without
  buckets do), the Reduce runs on that storage directly and the same
  tensors come back: no allocation, no copy. Otherwise, without buckets
  and on an exact wire, the round averages into one fresh buffer and
  returns views of it (so the next round is free); with buckets or a
  narrower wire dtype, it stages the values and writes the result back
  into the donated tensors. (The engine runs some donated rounds as plain
  ones: see `avgfn._round.engine`.)
* ``bucket_bytes=N``: at most ``N`` bytes are staged at a time, in two
  buffers of ``N / 2``, so that one is packed while the other is on the wire
  (through the Reduce's asynchronous ``start`` when it has one).
* ``comm_dtype``: the Reduce sees a buffer of that dtype; results are cast
  back to each leaf's dtype, optionally with error feedback (the rounding
  error of each round carried into the next).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

import torch

from avgfn._core import types as _types
from avgfn._core.checks import check_reduced
from avgfn._core.traced import traced
from avgfn._core.types import Pending, Reduce
from avgfn._round import facts as _facts
from avgfn._round import predicted as _predicted
from avgfn._round.options import Round
from avgfn._round.pool import POOL

_SMALL = 1 << 16
"""Below this many elements per leaf on average, a round packs with one cat."""

_CHUNK = 1 << 20
"""The most elements `Buffers.divide_into()` computes at a time."""

_PIECE = 1 << 21
"""The fewest elements of each piece when a round's one buffer is split over a group's lanes (`Buffers.start()`)."""

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_NBYTES = operator.attrgetter("nbytes")

_chunk_cat: Optional[Callable[..., Any]] = getattr(torch, "_chunk_cat", None)
"""Flattens and concatenates tensors into one buffer in one call (absent from older torch)."""

_check_and_scale: Optional[Callable[..., Any]] = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
"""Multiplies tensors in place by a scale and flags a non-finite value in the same pass."""

# A bucket is a list of pieces (leaf index, first element, end element).
Piece = tuple[int, int, int]


def _reciprocal(by: int) -> Optional[float]:
    """``1 / by`` when ``by`` is a power of two, else ``None``.

    For real floating-point values, multiplying by an exact power of two
    rounds the same exact quotient as dividing by its reciprocal does: the
    same bits, NaN, infinities and subnormals included (complex values are
    not: their product mixes the parts). A product is about twice as fast
    as a division on a CPU once the data is in cache.
    """
    if by < 2 or by & (by - 1):
        return None
    return 1.0 / by


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range of ``t``'s storage that ``t`` can reach."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_donatable(leaves: list[Any], selected: list[bool], path_of: Callable[[int], str]) -> None:
    """Refuse a donation that would change tensors the caller can still see.

    A selected leaf must not overlap itself (a stride-0 ``expand``) nor reach
    memory that any other leaf of the tree reaches: writing into it would
    change the other leaf too. Spans are compared against every earlier span
    that still reaches past them, not only the neighbouring one.
    """
    if _apart(leaves):
        return
    spans = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
            continue
        if selected[i] and not leaf.is_contiguous() and any(s == 0 and n > 1 for s, n in zip(leaf.stride(), leaf.shape)):
            raise ValueError(
                f"donate=True: the leaf at {path_of(i)} overlaps itself (a stride-0 view); "
                "writing the average into it is not possible"
            )
        lo, hi = _span(leaf)
        spans.append((lo, hi, i))
    spans.sort()
    open_spans: list[tuple[int, int]] = []  # (end, index) of spans that may still overlap
    for lo, hi, i in spans:
        open_spans = [(end, j) for end, j in open_spans if end > lo]
        for _, j in open_spans:
            if selected[i] or selected[j]:
                raise ValueError(
                    f"donate=True: the leaves at {path_of(j)} and {path_of(i)} share memory; "
                    "averaging in place would change both (pass distinct tensors, or donate=False)"
                )
        open_spans.append((hi, i))


def _apart(leaves: list[Any]) -> bool:
    """Whether ``leaves`` are contiguous tensors whose memory nowhere overlaps (a quick sufficient test).

    Sorted by address, each must start at or after the end of every one
    before it. Reads each leaf through C loops (``map``) instead of a Python
    call per leaf; any overlap, an empty or a strided leaf sends the caller
    to its exact test, which also names the leaves.
    """
    if torch.compiler.is_compiling() or not leaves:
        return False
    if not set(map(type, leaves)) <= _types.PLAIN_TENSORS or not all(map(torch.Tensor.is_contiguous, leaves)):
        return False
    starts = list(map(torch.Tensor.data_ptr, leaves))
    sizes = list(map(_NBYTES, leaves))
    if not all(sizes):
        return False
    end = 0
    for start, size in sorted(zip(starts, sizes)):
        if start < end:
            return False
        end = start + size
    return True


def plan_buckets(numels: list[int], capacity: Optional[int]) -> list[list[Piece]]:
    """Split the selected elements, in order, into buckets of ``capacity`` elements."""
    if capacity is None:
        return [[(i, 0, n) for i, n in enumerate(numels)]]
    buckets: list[list[Piece]] = [[]]
    room = capacity
    for i, n in enumerate(numels):
        if n == 0:
            buckets[-1].append((i, 0, 0))
            continue
        lo = 0
        while lo < n:
            if room == 0:
                buckets.append([])
                room = capacity
            take = min(room, n - lo)
            buckets[-1].append((i, lo, lo + take))
            lo += take
            room -= take
    return [b for b in buckets if b]


class _Spread:
    """One buffer's sum, in pieces on the group's lanes side by side (see `Buffers.start()`)."""

    __slots__ = ("buf", "pieces", "pending")

    def __init__(self, buf: torch.Tensor, pieces: list[torch.Tensor], pending: list[Pending]) -> None:
        self.buf, self.pieces, self.pending = buf, pieces, pending

    def wait(self) -> torch.Tensor:
        for piece, pending in zip(self.pieces, self.pending):
            result = check_reduced(_types.settle(pending.wait()), piece)
            if result is not piece:
                piece.copy_(result)
        return self.buf


def tiled(flats: list[torch.Tensor], bucket: list[Piece], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A 1-D view over the bucket's elements when they lie in order in one storage.

    Empty pieces hold no element: where their tensors live does not matter.
    """
    pieces = [(i, lo, hi) for i, lo, hi in bucket if hi > lo]
    if not pieces:
        return None
    first = flats[pieces[0][0]]
    if first.dtype != dtype:
        return None
    storage = first.untyped_storage().data_ptr()
    start = first.storage_offset() + pieces[0][1]
    expected = start
    for i, lo, hi in pieces:
        flat = flats[i]
        if (
            flat.dtype != dtype
            or not flat.is_contiguous()
            or flat.untyped_storage().data_ptr() != storage
            or flat.storage_offset() + lo != expected
        ):
            return None
        expected += hi - lo
    total = expected - start
    return first.new_empty(0).set_(first.untyped_storage(), start, (total,), (1,))


class Buffers:
    """One device's share of a round: its leaves, their flat views, and the staging."""

    def __init__(
        self,
        leaves: list[torch.Tensor],
        reduce: Reduce,
        rnd: Round,
        dtype: torch.dtype,
        residuals: Optional[list[Optional[torch.Tensor]]],
        watch: Any,
        facts: Optional[_facts.Facts] = None,
    ) -> None:
        self.leaves = leaves
        self.facts = _facts.facts(leaves) if facts is None else facts
        self.reduce = reduce
        self.watch = watch
        self.dtype = dtype
        self.wire_dtype = rnd.comm_dtype or dtype
        self._flats: Optional[list[torch.Tensor]] = None
        self.device = leaves[0].device
        self.feedback = residuals is not None and rnd.comm_dtype is not None
        itemsize = self.wire_dtype.itemsize
        self.capacity = None if rnd.bucket_bytes is None else max(1, rnd.bucket_bytes // 2 // itemsize)
        self.donate = rnd.donate
        self.tiled: Optional[torch.Tensor] = None
        if self.donate and self.capacity is None and not self.feedback and self.wire_dtype == dtype:
            whole = plan_buckets(self.facts.numels, None)[0]
            # Not one storage yet: average into one fresh buffer and hand back
            # views of it, so that the next donated round is free of copies.
            # (On a narrower wire the leaves can never be that buffer: the
            # round stages it and writes the result back into them instead.)
            self.tiled = tiled(self.flats, whole, self.wire_dtype)
            self.donate = self.tiled is not None
        group = _types.group_of(reduce)
        self.by = 1 if group is None else group.divisor()
        self.fused = self.by != 1 and not self.feedback
        # lanes only where this round's own agreement compared them (not under Round(agree=False),
        # nor in a round whose check was another's: weighted's data round, an inner-state round)
        self.lanes = _types.lanes(reduce) if self.fused and rnd.agree else 1
        # one buffer is split over the lanes only in a group of two whose results are not in flight (`start()`)
        held = getattr(group, "in_flight", False) is True
        self.split = self.lanes > 1 and group is not None and group.size == 2 and not held
        self.residuals = None
        self.new_res: Optional[list[Optional[torch.Tensor]]] = None
        if self.feedback:
            assert residuals is not None
            self.residuals = [None if r is None else r.reshape(-1) for r in residuals]
            self.new_res = [None if r is None else torch.empty_like(r) for r in self.residuals]
        self.outs: list[Any] = self.flats if self.donate else [None] * len(leaves)
        self.shaped = False  # outs are views shaped as the leaves, of their dtypes
        self.pool: list[torch.Tensor] = []
        # A Reduce that divides, then sums lets the packing copy do the division:
        # torch.div(src, divisor, out=dst). On the exact paths that is only done
        # where src already has the buffer's dtype (the bits of copy, then
        # divide); on a reduced-precision wire the quotient is rounded once.
        self.scale = _reciprocal(self.by)
        self.read = False  # the packing read every value as it divided them (see `pack()`'s ``found``)
        # The plain round packs with torch.cat: functional, so it runs under vmap too.
        self.plain = rnd.plain_wire and not self.fused and not self.feedback

    @property
    def flats(self) -> list[torch.Tensor]:
        """Each leaf as a 1-D tensor (a view where its layout allows), made when first asked for."""
        if self._flats is None:
            with torch.no_grad():  # views that autograd does not track (the round runs without it)
                self._flats = [leaf.reshape(-1) for leaf in self.leaves]
        return self._flats

    def staging(self, n: int, slot: int) -> torch.Tensor:
        """A buffer of ``n`` wire elements (reused across buckets when donating).

        It comes from `avgfn._round.pool`: memory of an earlier round that
        nothing else holds any more, when there is some.
        """
        if not self.donate:
            return POOL.take(n, self.wire_dtype, self.device)
        while len(self.pool) <= slot:
            self.pool.append(torch.empty(0, dtype=self.wire_dtype, device=self.device))
        if self.pool[slot].numel() < n:
            self.pool[slot] = POOL.take(n, self.wire_dtype, self.device)
        return self.pool[slot][:n]

    def pack(
        self, bucket: list[Piece], slot: int, extra: int = 0, found: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, bool]:
        """The bucket's buffer, and whether it is the donated storage itself.

        ``extra``: elements left free after the data (a staged buffer only;
        the buffer returned holds them). ``found``: a one-element float32
        tensor of 0; where the packing divides one whole buffer, it reads the
        values as it divides them, ``found`` becomes 1 if one is not finite,
        and ``self.read`` becomes true. Otherwise neither changes.
        """
        if self.donate and not self.feedback:
            whole = self.tiled is not None and len(bucket) == len(self.flats)
            view = self.tiled if whole else tiled(self.flats, bucket, self.wire_dtype)
            if view is not None:
                if self.fused and self.by != 1:
                    self.divide_(view)
                return view, True
        if self.plain:
            buf = torch.cat(self.sources(bucket))
            return (buf if buf.dtype == self.wire_dtype else buf.to(self.wire_dtype)), False
        n = self.facts.count if self.capacity is None else sum(hi - lo for _, lo, hi in bucket)
        full = self.staging(n + extra, slot)
        buf = full[:n] if extra else full
        if self.fused and self.residuals is None and self.wire_dtype == self.dtype and n < _SMALL * len(bucket):
            # Many small leaves: one cat and one division cost fewer calls than
            # a division per leaf (the same bits: cat, then divide, is torch's).
            self.concatenate(bucket, buf)
            self.divide_(buf, found)
            return full, False
        o = 0
        for i, lo, hi in bucket:
            src, dst = self.flats[i][lo:hi], buf[o : o + hi - lo]
            residual = None if self.residuals is None else self.residuals[i]
            if residual is not None:
                value = src.to(self.dtype) + residual[lo:hi]
                dst.copy_(value)
                self.new_res[i][lo:hi] = value - dst.to(value.dtype)  # type: ignore[index]
            elif self.fused and src.dtype == self.wire_dtype:
                self.divide(src, dst)
            elif self.fused and self.wire_dtype != self.dtype:
                self.divide_into(src, dst)
            else:
                dst.copy_(src)
                if self.fused:
                    self.divide_(dst)
            o += hi - lo
        return full, False

    def concatenate(self, bucket: list[Piece], buf: torch.Tensor) -> None:
        """Copy the bucket's elements, in order, into ``buf`` (of their dtype).

        A bucket of every leaf whole, each with a dimension and an element
        (`avgfn._round.facts.Facts.solid`), is copied by one C++ call that
        flattens as it copies (FSDP2 packs its shards with it), without a
        Python view per leaf.
        """
        whole = self.capacity is None and self.facts.solid and self.facts.uniform
        if _chunk_cat is not None and whole and not traced(self.leaves[0]):
            _chunk_cat(self.leaves, 0, 1, out=buf.view(1, -1))
        else:
            torch.cat(self.sources(bucket), out=buf)

    def divide_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst = src / divisor``, computed in ``src``'s dtype and rounded once to ``dst``'s.

        ``torch.div(src, divisor, out=dst)`` for a narrower ``dst`` computes
        into a temporary as large as ``src``: for a large leaf, fresh memory
        the kernel must map at every call. Here it runs on pieces of at most
        `_CHUNK` elements, whose temporaries the allocator reuses (the same
        bits).
        """
        n = src.numel()
        if n <= _CHUNK:
            self.divide(src, dst)
            return
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            self.divide(src[lo:hi], dst[lo:hi])

    def divide(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst = src / divisor`` (a product by the reciprocal when that has the same bits)."""
        if self.scale is not None and src.is_floating_point():
            torch.mul(src, self.scale, out=dst)
        else:
            torch.div(src, self.by, out=dst)

    def divide_(self, buf: torch.Tensor, found: Optional[torch.Tensor] = None) -> None:
        """``buf /= divisor``, in place (see `divide()`).

        With ``found`` (and a power-of-two divisor on a real dtype), the one
        pass that divides also reads: torch's fused unscale of gradient
        scaling multiplies by the reciprocal and sets ``found`` to 1 where a
        value is not finite (the product's bits are those of ``mul_``).
        """
        if self.scale is not None and buf.is_floating_point():
            if found is not None and _check_and_scale is not None and not traced(buf):
                _check_and_scale([buf], found, torch.full((1,), self.scale, device=buf.device))
                self.read = True
            else:
                buf.mul_(self.scale)
        else:
            buf.div_(self.by)

    def sources(self, bucket: list[Piece]) -> list[torch.Tensor]:
        """The flat pieces a bucket packs (whole leaves are not sliced)."""
        flats = self.flats
        if self.capacity is None:  # the one bucket holds every leaf whole
            return flats
        return [flats[i] if lo == 0 and hi == flats[i].numel() else flats[i][lo:hi] for i, lo, hi in bucket]

    def whole(self, bucket: list[Piece], result: torch.Tensor) -> bool:
        """Whether the bucket holds every leaf whole, all of one dtype: its result is unflattened at once."""
        if self.donate or len(bucket) != len(self.leaves) or traced(result):
            return False
        if not self.facts.uniform:
            return False
        return self.capacity is None or all(lo == 0 and hi == self.flats[i].numel() for i, lo, hi in bucket)

    def start(self, buf: torch.Tensor, k: int = 0, split: bool = True) -> Pending:
        """Start bucket ``k``'s collective (a sum when the division was fused).

        On a group with several lanes (``all_reduce_mean(...,
        spare_groups=...)``), bucket ``k`` goes to lane ``k`` modulo their
        number; a round without buckets, in a group of two, sends its buffer
        in one piece per lane (each of at least `_PIECE` elements) side by
        side. A pair's sum is ``a + b`` wherever a value lies, so the pieces
        give the bits of one all-reduce; with more replicas, the order in
        which a collective adds them depends on where a value lies in its
        buffer, so there only buckets, which fix the pieces already, are spread.
        ``split=False`` keeps the buffer whole: a predicted round, whose peer
        may decline it with one collective of its size on the group itself
        (`avgfn._round.predicted.decline`), before any check compared lanes.
        """
        if not self.fused:
            return _types.start(self.reduce, buf)
        lanes = self.lanes
        if split and self.split and self.capacity is None and buf.numel() >= lanes * _PIECE and not traced(buf):
            pieces = list(buf.tensor_split(lanes))
            return _Spread(buf, pieces, [_types.start_sum_on(self.reduce, j, p) for j, p in enumerate(pieces)])
        return _types.start_sum_on(self.reduce, k % lanes, buf)

    def finish(
        self, bucket: list[Piece], buf: torch.Tensor, in_place: bool, pending: Pending, watched: bool = True
    ) -> None:
        """Wait for a bucket and move its result where the leaves take it from (``watched``: checked by the watch)."""
        result = check_reduced(pending.wait(), buf)
        if in_place or self.donate or self.watch is not None:
            result = check_reduced(_types.settle(result), buf)  # read here: wait for it now
        if result.requires_grad:  # a Reduce's autograd flag is not the leaves' (see `result()`)
            result = result.detach()
        if self.watch is not None and watched:
            self.watch.add(result)
        if in_place:
            if result is not buf:
                buf.copy_(result)
            return
        if self.whole(bucket, result):
            # Each leaf's view of the result, shaped as the leaf (after one
            # cast into one buffer when the leaves' dtype is another): one C++
            # call splits it, and only the leaves that are not 1-D take a
            # view of their own.
            if result.dtype != self.facts.dtype:
                cast = POOL.take(result.numel(), self.facts.dtype, self.device)
                result = cast.copy_(result)
            outs = list(result.split_with_sizes(self.facts.numels))
            for i, shape in self.facts.shaped:
                outs[i] = outs[i].view(shape)
            self.outs = outs
            self.shaped = True
            return
        pieces = result.split([hi - lo for _, lo, hi in bucket])
        for (i, lo, hi), piece in zip(bucket, pieces):
            if self.donate:
                self.flats[i][lo:hi].copy_(piece)
            elif lo == 0 and hi == self.flats[i].numel():
                dtype = self.leaves[i].dtype
                self.outs[i] = piece if piece.dtype == dtype else piece.to(dtype)
            else:
                if self.outs[i] is None:
                    self.outs[i] = torch.empty(self.flats[i].numel(), dtype=self.leaves[i].dtype, device=self.device)
                self.outs[i][lo:hi].copy_(piece)

    def run(self, gate: Any = _types.AGREED) -> tuple[list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
        """The whole round on this device: the averaged leaves and the new residuals.

        ``gate.wait()`` (the replicas' agreement) runs after the first buffer
        is packed and before its collective starts.
        """
        with torch.no_grad():
            in_flight: deque[tuple[list[Piece], torch.Tensor, bool, Pending]] = deque()
            for k, bucket in enumerate(plan_buckets(self.facts.numels, self.capacity)):
                if len(in_flight) == 2:
                    self.finish(*in_flight.popleft())
                buf, in_place = self.pack(bucket, k % 2)
                if k == 0:
                    gate.wait()
                in_flight.append((bucket, buf, in_place, self.start(buf, k)))
            while in_flight:
                self.finish(*in_flight.popleft())
            results = self.results()
        new_res = self.new_res
        if new_res is not None:
            new_res = [None if r is None else r.view(leaf.shape) for r, leaf in zip(new_res, self.leaves)]
        return results, new_res

    def run_predicted(self, predicted: Any) -> Optional[list[torch.Tensor]]:
        """The round in one collective, its agreement's check appended (`avgfn._round.predicted`).

        Returns the averaged leaves, or ``None`` when the check did not pass
        on every replica: then nothing of the reduced buffer is used.
        """
        assert self.fused and not self.donate and self.capacity is None and self.residuals is None
        bucket = plan_buckets(self.facts.numels, None)[0]
        n = self.facts.count
        with torch.no_grad():
            found = None if self.watch is None else torch.zeros(1, dtype=torch.float32, device=self.device)
            full, _ = self.pack(bucket, 0, _predicted.CHECK, found)
            full[n:] = _predicted.block(predicted.digest, full.dtype, full.device)
            if found is not None and self.read:  # 1 when every share read finite
                full[n + _predicted.VOUCH :] = 1 - found
            try:
                summed = check_reduced(_types.settle(self.start(full, split=False).wait()), full)
            except BaseException:
                predicted.history.forget()
                raise
            ok, vouched = _predicted.passed(summed[n:], predicted.digest)
            if not ok:
                return None
            predicted.done()
            # when both replicas' shares read finite, so is their sum (see `passed()`)
            self.finish(bucket, full[:n], False, _types.Done(summed[:n]), watched=not vouched)
            return self.results()

    def results(self) -> list[torch.Tensor]:
        """Every leaf averaged (see `result()`)."""
        if self.shaped and not any(map(_REQUIRES_GRAD, self.leaves)):
            return self.outs
        return [self.result(i, leaf) for i, leaf in enumerate(self.leaves)]

    def result(self, i: int, leaf: torch.Tensor) -> torch.Tensor:
        """Leaf ``i`` averaged: the donated tensor itself, or a view of the result."""
        if self.donate:
            if self.flats[i].data_ptr() != leaf.data_ptr() or not leaf.is_contiguous():
                leaf.copy_(self.flats[i].view(leaf.shape))  # reshape had to copy
            return leaf
        out = self.outs[i]
        if out.shape != leaf.shape:
            out = out.view(leaf.shape)
        if leaf.requires_grad:
            out.requires_grad_(True)
        return out
