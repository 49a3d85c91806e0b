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
other tensor on it, no reference to its Python storage object), or a
fresh one, which is then kept. Only CPU buffers of
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
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

SMALLEST = 1 << 20
"""The smallest buffer (bytes) worth keeping."""

PER_LAYOUT = 2
"""Buffers kept per size and dtype: the caller's current params, and one free."""

LAYOUTS = 4
"""Sizes and dtypes kept, the most recently used."""

_use_count: Optional[Callable[[Any], int]] = getattr(torch._C, "_storage_Use_Count", None)


def _holders(t: torch.Tensor) -> tuple[int, int]:
    """What holds ``t``'s storage: the tensors on it, and the references to its Python object.

    (torch keeps one Python object per storage: one that a caller holds shows
    only in that object's reference count.)
    """
    assert _use_count is not None
    storage = t.untyped_storage()
    return _use_count(storage._cdata), sys.getrefcount(storage)


def _baseline() -> Optional[tuple[int, int]]:
    """`_holders` of a storage that one tensor alone holds (``None``: the count cannot tell)."""
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
        del storage
        return count if seen_view and seen_storage and _holders(alone) == count else None
    except Exception:  # pragma: no cover - a torch whose private count behaves otherwise
        return None


_ALONE = _baseline()

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
        if _ALONE is None or device.type != "cpu" or n * dtype.itemsize < SMALLEST or torch.compiler.is_compiling():
            return torch.empty(n, dtype=dtype, device=device)
        key = (n, dtype)
        with self.lock:
            kept = self.kept.get(key)
            if kept is not None:
                self.kept.move_to_end(key)
                for base in kept:
                    if _holders(base) == _ALONE:
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
