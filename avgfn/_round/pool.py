"""Host buffers a round may use again once nothing else holds them.

A pure round hands back views of a buffer it allocated, and the caller
usually drops the round before last's params at the next round. On a CPU
host, memory the process has not touched yet costs a page fault per 4 KiB
at its first write: a fresh buffer of 100 MB costs more than the round's
arithmetic (``benchmarks/averaging.py`` prints the faults of each round).
torch's own ``average_parameters`` pays it too, and glibc hands buffers of
more than 32 MiB back to the system when they are freed.

`take()` returns a buffer that nothing outside this module refers to: one
kept from an earlier round whose storage only the pool still holds (no
other tensor on it, no reference, strong or weak, to its Python storage
object, not moved to shared memory, where another process may still read
or write it: such a buffer is dropped), or a fresh one, which is then
kept. Nothing is kept while a compiler, fake-tensor or tracing mode is
active. A C++ weak reference to a storage (``StorageWeakRef``, which
torch's multiprocessing and tracing use on shared or traced memory) is not
visible to these counts. Only CPU buffers of
at least `SMALLEST` bytes are kept (a device's caching allocator already
reuses its memory), at most `PER_LAYOUT` per size and dtype, for the
`LAYOUTS` most recent sizes. What is kept counts in the process's memory
between rounds; [`avgfn.release_buffers()`][avgfn.release_buffers] drops it.

The pool never hands out a tensor it keeps, only a new tensor on the same
storage (not an autograd view: nothing leads from it back to the kept one):
a tensor the caller holds always adds to the storage's use count. A torch
that does not expose that count keeps nothing.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch.utils import _python_dispatch

SMALLEST = 1 << 20
"""The smallest buffer (bytes) worth keeping."""

PER_LAYOUT = 2
"""Buffers kept per size and dtype: the caller's current params, and one free."""

LAYOUTS = 4
"""Sizes and dtypes kept, the most recently used."""

_use_count: Optional[Callable[[Any], int]] = getattr(torch._C, "_storage_Use_Count", None)


def _holders(t: torch.Tensor) -> tuple[int, int, int]:
    """What holds ``t``'s storage: the tensors on it, and the strong and weak references to its Python object.

    (torch keeps one Python object per storage: one that a caller holds shows
    only in that object's reference counts.)
    """
    assert _use_count is not None
    storage = t.untyped_storage()
    return _use_count(storage._cdata), sys.getrefcount(storage), weakref.getweakrefcount(storage)


def _baseline() -> Optional[tuple[int, int, int]]:
    """`_holders` of a storage that one tensor alone holds (``None``: the counts cannot tell)."""
    if _use_count is None:
        return None
    try:
        alone = torch.empty(1)
        count = _holders(alone)
        view = alone[:]
        seen_view = _holders(alone) != count
        del view
        storage = alone.untyped_storage()
        seen_storage = _holders(alone) != count
        watch = weakref.ref(storage)
        del storage
        seen_weak = _holders(alone) != count
        del watch
        seen = seen_view and seen_storage and seen_weak
        return count if seen and _holders(alone) == count and count[2] == 0 else None
    except Exception:  # pragma: no cover - a torch whose private count behaves otherwise
        return None


_ALONE: Optional[tuple[int, int, int]] = None
_MEASURED = False


def _alone() -> Optional[tuple[int, int, int]]:
    """The baseline, measured at the first use outside any dispatch mode (``None``: keep nothing)."""
    global _ALONE, _MEASURED
    if not _MEASURED:
        _ALONE, _MEASURED = _baseline(), True
    return _ALONE


def _plain() -> bool:
    """Whether allocations now make real tensors: no compiler, fake or tracing mode is active."""
    return not torch.compiler.is_compiling() and _python_dispatch._get_current_dispatch_mode() is None


Key = tuple[int, torch.dtype]


def _on(base: torch.Tensor) -> torch.Tensor:
    """A new 1-D tensor on ``base``'s storage, with no autograd link to ``base``."""
    with torch.no_grad():
        return base.new_empty(0).set_(base.untyped_storage(), 0, base.shape, (1,))


class Pool:
    """Buffers kept for reuse (see the module docstring)."""

    def __init__(self, per_layout: int = PER_LAYOUT, layouts: int = LAYOUTS) -> None:
        self.per_layout = per_layout
        self.layouts = layouts
        self.kept: "OrderedDict[Key, list[torch.Tensor]]" = OrderedDict()
        self.lock = threading.Lock()

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D buffer of ``n`` elements that nothing else refers to (its values are arbitrary)."""
        if device.type != "cpu" or n * dtype.itemsize < SMALLEST or not _plain():
            return torch.empty(n, dtype=dtype, device=device)
        alone = _alone()
        if alone is None:
            return torch.empty(n, dtype=dtype, device=device)
        key = (n, dtype)
        with self.lock:
            kept = self.kept.get(key)
            if kept is not None:
                self.kept.move_to_end(key)
                kept[:] = [base for base in kept if not base.untyped_storage().is_shared()]  # another process may use it
                for base in kept:
                    if _holders(base) == alone:  # nothing but the pool holds it
                        return _on(base)
            fresh = torch.empty(n, dtype=dtype, device=device)
            kept = self.kept.setdefault(key, [])
            if len(kept) >= self.per_layout:
                kept.pop(0)
            kept.append(fresh)
            while len(self.kept) > self.layouts:
                self.kept.popitem(last=False)
            return _on(fresh)

    def release(self) -> int:
        """Drop every kept buffer; return the bytes no longer kept."""
        with self.lock:
            total = sum(t.numel() * t.element_size() for kept in self.kept.values() for t in kept)
            self.kept.clear()
        return total


POOL = Pool()
"""The process's pool."""


def release_buffers() -> int:
    """Drop the host buffers the round engine keeps for reuse; return how many bytes they held.

    A pure round on a CPU host writes its result into a buffer it kept from
    an earlier round once the caller no longer holds that round's params
    (which saves the page faults of fresh memory, see ``docs/performance.md``).
    Those buffers count in the process's memory between rounds; call this
    after training, or before a phase that needs the memory. Rounds after it
    allocate afresh.

    Examples:
      >>> import torch, avgfn
      >>> avgfn.release_buffers() >= 0
      True
    """
    return POOL.release()
