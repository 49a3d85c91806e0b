"""How an averaging round moves its bytes: the fast paths of issue #6.

The default round (:func:`avgfn.average` with no options) copies the selected
leaves into one fresh buffer and never touches its inputs. The options here
trade that purity or precision for speed and memory, each one explicitly:

* ``donate=True``: the caller gives up the params it passes in (as JAX's
  ``donate_argnums``) and must use the returned ones. When the selected
  leaves tile one storage in order (as the outputs of any round without
  buckets do, and as torch's own ``average_parameters`` leaves a module's
  parameters), the Reduce runs on that storage directly and the same tensors
  come back: no allocation and no copy at all. Otherwise, without buckets,
  the round averages into one fresh buffer and returns views of it (so the
  next round is free); with buckets, it stages each bucket and writes the
  result back into the donated tensors.
* ``bucket_bytes=N``: the round stages at most ``N`` bytes at a time, in two
  buffers of ``N / 2`` so that one is packed while the other is on the wire
  (with a Reduce that has an asynchronous ``start``, as
  :class:`avgfn.collectives.GroupMean` has). With ``donate=True`` the peak
  extra memory is the ``N`` bytes of staging.
* ``comm_dtype=torch.bfloat16`` (or ``float16``): the Reduce sees a buffer of
  that dtype; results are cast back to each leaf's dtype. Averagers can carry
  the rounding error of each round into the next (``error_feedback=True``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Optional, Protocol

import attrs
import torch

from avgfn._base import Reduce, check_int


class Pending(Protocol):
    """A Reduce in flight: ``wait()`` returns its result."""

    def wait(self) -> torch.Tensor:
        """Block until the reduction is done; return the mean."""
        ...


class AsyncReduce(Reduce, Protocol):
    """A Reduce that can also be started without waiting for it.

    ``start(tensor)`` begins the mean of ``tensor`` and returns a
    :class:`Pending`; the caller must not touch ``tensor`` until ``wait()``.
    Plain callables are Reduces too: they simply run to completion at start.
    """

    def start(self, tensor: torch.Tensor, /) -> Pending:
        """Begin the mean of ``tensor`` over the group."""
        ...


class _Done:
    __slots__ = ("result",)

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


def start(reduce: Reduce, tensor: torch.Tensor) -> Pending:
    """Start ``reduce`` on ``tensor``: asynchronously when it can, else at once."""
    begin = getattr(reduce, "start", None)
    if begin is not None:
        return begin(tensor)
    return _Done(reduce(tensor))


_WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@attrs.frozen
class Wire:
    """The options of one averaging round (see the module docstring)."""

    donate: bool = False
    bucket_bytes: Optional[int] = None
    comm_dtype: Optional[torch.dtype] = None

    @property
    def is_default(self) -> bool:
        return not self.donate and self.bucket_bytes is None and self.comm_dtype is None


DEFAULT = Wire()


def make_wire(donate: Any = False, bucket_bytes: Any = None, comm_dtype: Any = None) -> Wire:
    """Validate the fast-path options, naming the bad argument."""
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {type(donate).__name__} {donate!r}")
    if bucket_bytes is not None:
        bucket_bytes = check_int("bucket_bytes", bucket_bytes, minimum=16)
    if comm_dtype is not None and comm_dtype not in _WIRE_DTYPES:
        raise TypeError(
            f"comm_dtype must be None or one of {[str(d) for d in _WIRE_DTYPES]}, got {comm_dtype!r}"
        )
    if not donate and bucket_bytes is None and comm_dtype is None:
        return DEFAULT
    return Wire(donate, bucket_bytes, comm_dtype)


def batched(t: torch.Tensor) -> bool:
    """True for a tensor seen inside a torch.func transform (vmap, grad)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range of ``t``'s storage that ``t`` can reach."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_donatable(leaves: list[Any], selected: list[bool], path_of: Callable[[int], str]) -> None:
    """Refuse a donation that would change tensors the caller can still see.

    A selected leaf must not overlap itself (a stride-0 ``expand``) or any
    other leaf of the tree: writing into it would change the other leaf too.
    """
    spans = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
            continue
        if selected[i] and any(s == 0 and n > 1 for s, n in zip(leaf.stride(), leaf.shape)):
            raise ValueError(
                f"donate=True: the leaf at {path_of(i)} overlaps itself (a stride-0 view); "
                "writing the average into it is not possible"
            )
        lo, hi = _span(leaf)
        spans.append((lo, hi, i))
    spans.sort()
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(spans, spans[1:]):
        if lo_b < hi_a and (selected[a] or selected[b]):
            raise ValueError(
                f"donate=True: the leaves at {path_of(a)} and {path_of(b)} share memory; "
                "averaging in place would change both (pass distinct tensors, or donate=False)"
            )


# A bucket is a list of pieces (leaf index, first element, end element).
Piece = tuple[int, int, int]


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


def _tiled(flats: list[torch.Tensor], bucket: list[Piece], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A 1-D view over the bucket's elements when they lie in order in one storage."""
    first = flats[bucket[0][0]]
    if first.dtype != dtype:
        return None
    storage = first.untyped_storage().data_ptr()
    start = first.storage_offset() + bucket[0][1]
    expected = start
    for i, lo, hi in bucket:
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


def reduce_leaves(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    wire: Wire,
    dtype: torch.dtype,
    residuals: Optional[list[Optional[torch.Tensor]]] = None,
    watch: Any = None,
) -> tuple[list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
    """Average ``leaves`` (all on one device) the way ``wire`` says.

    Returns the averaged leaves (the inputs themselves, written in place, when
    donating) and, when ``residuals`` is given, the new rounding residuals.
    ``watch`` (an ``avgfn._health.Watch``) notes each reduced buffer.
    """
    wire_dtype = wire.comm_dtype or dtype
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    capacity = None if wire.bucket_bytes is None else max(1, wire.bucket_bytes // 2 // itemsize)
    flats = [leaf.detach().reshape(-1) for leaf in leaves]
    device = leaves[0].device
    feedback = residuals is not None and wire.comm_dtype is not None
    if wire.donate and capacity is None and not feedback:
        whole = plan_buckets([f.numel() for f in flats], None)[0]
        if _tiled(flats, whole, wire_dtype) is None:
            # Not one storage yet: average into one fresh buffer and hand back
            # views of it, so that the next donated round is free of copies.
            wire = attrs.evolve(wire, donate=False)
    new_res: Optional[list[Optional[torch.Tensor]]] = None
    if feedback:
        assert residuals is not None
        # Residuals are kept in their leaf's shape; the round works on flat views.
        residuals = [None if r is None else r.reshape(-1) for r in residuals]
        new_res = [None if r is None else torch.empty_like(r) for r in residuals]

    if wire.donate:
        outs: list[Any] = flats
    else:
        outs = [None] * len(leaves)
    pool: list[torch.Tensor] = []  # staging buffers reused by a donating round

    def staging(n: int, slot: int) -> torch.Tensor:
        if not wire.donate:
            return torch.empty(n, dtype=wire_dtype, device=device)
        while len(pool) <= slot:
            pool.append(torch.empty(0, dtype=wire_dtype, device=device))
        if pool[slot].numel() < n:
            pool[slot] = torch.empty(n, dtype=wire_dtype, device=device)
        return pool[slot][:n]

    # A Reduce that divides, then sums (GroupMean) lets the packing copy do the
    # division: torch.div(src, divisor, out=dst). On the exact paths that is
    # only done where src already has the buffer's dtype (the bits of copy,
    # then divide); on a reduced-precision wire the quotient is rounded once.
    divisor = getattr(reduce, "divisor", None)
    start_sum = getattr(reduce, "start_sum", None)
    fused = divisor is not None and start_sum is not None and not feedback
    by = divisor() if fused else 1

    def pack(bucket: list[Piece], slot: int) -> tuple[torch.Tensor, bool, bool]:
        if wire.donate and not feedback:
            view = _tiled(flats, bucket, wire_dtype)
            if view is not None:
                return view, True, False
        n = sum(hi - lo for _, lo, hi in bucket)
        buf = staging(n, slot)
        o = 0
        divided = fused
        for i, lo, hi in bucket:
            src = flats[i][lo:hi]
            dst = buf[o : o + hi - lo]
            if feedback and residuals[i] is not None:  # type: ignore[index]
                value = src.to(dtype) + residuals[i][lo:hi]  # type: ignore[index]
                dst.copy_(value)
                new_res[i][lo:hi] = value - dst.to(value.dtype)  # type: ignore[index]
            elif fused and (src.dtype == wire_dtype or wire.comm_dtype is not None):
                torch.div(src, by, out=dst)
            elif fused:
                dst.copy_(src)
                dst.div_(by)
            else:
                dst.copy_(src)
            o += hi - lo
        return buf, False, divided

    def finish(bucket: list[Piece], buf: torch.Tensor, in_place: bool, pending: Pending) -> None:
        result = pending.wait()
        if not isinstance(result, torch.Tensor) or result.shape != buf.shape:
            raise ValueError(
                f"reduce must return a tensor shaped like its input {tuple(buf.shape)}, "
                f"got {getattr(result, 'shape', type(result).__name__)}"
            )
        if watch is not None:
            watch.add(result)
        if in_place:
            if result is not buf:
                buf.copy_(result)
            return
        o = 0
        for i, lo, hi in bucket:
            piece = result[o : o + hi - lo]
            o += hi - lo
            if wire.donate:
                flats[i][lo:hi].copy_(piece)
            elif lo == 0 and hi == flats[i].numel():
                outs[i] = piece.to(leaves[i].dtype)
            else:
                if outs[i] is None:
                    outs[i] = torch.empty(flats[i].numel(), dtype=leaves[i].dtype, device=device)
                outs[i][lo:hi].copy_(piece)

    with torch.no_grad():
        in_flight: deque = deque()
        for k, bucket in enumerate(plan_buckets([f.numel() for f in flats], capacity)):
            if len(in_flight) == 2:
                finish(*in_flight.popleft())
            buf, in_place, divided = pack(bucket, k % 2)
            pending = start_sum(buf) if divided else start(reduce, buf)  # type: ignore[misc]
            in_flight.append((bucket, buf, in_place, pending))
        while in_flight:
            finish(*in_flight.popleft())

        results = []
        for i, leaf in enumerate(leaves):
            if wire.donate:
                if flats[i].data_ptr() != leaf.data_ptr() or not leaf.is_contiguous():
                    leaf.copy_(flats[i].view(leaf.shape))  # reshape had to copy
                results.append(leaf)
            else:
                out = outs[i].view(leaf.shape)
                if leaf.requires_grad:
                    out.requires_grad_(True)
                results.append(out)
    if new_res is not None:
        new_res = [None if r is None else r.view(leaf.shape) for r, leaf in zip(new_res, leaves)]
    return results, new_res
