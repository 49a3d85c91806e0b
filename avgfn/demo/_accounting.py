"""Counting what an algorithm communicates: a Reduce that keeps a ledger.

Every byte an avgfn algorithm sends goes through the Reduce it was given, so
wrapping that Reduce is enough to count the collective calls and the bytes of
each worker: one call per Reduce call, and ``numel * element_size`` bytes for
the tensor handed to it (the payload one worker contributes; a ring
all-reduce moves about twice that over the wire).

Under ``torch.func.vmap`` a Python-level Reduce is called once per vmapped
call for all the simulated workers together, and sees one worker's tensor:
one entry in the ledger is one collective per worker, as in a real process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import avgfn

__all__ = ["CountingReduce", "Ledger"]


class Ledger:
    """Collective calls and bytes per worker, kept by label.

    Attributes:
      calls: label -> number of calls.
      bytes: label -> bytes handed over, summed.
      peak: the largest single call, in bytes.

    Examples:
      >>> from avgfn.demo import Ledger
      >>> ledger = Ledger()
      >>> ledger.record("world", 40); ledger.record("pairs", 8); ledger.record("world", 40)
      >>> ledger.total_calls, ledger.total_bytes, ledger.peak, ledger.calls
      (3, 88, 40, {'world': 2, 'pairs': 1})
    """

    __slots__ = ("calls", "bytes", "peak")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.peak = 0

    def record(self, label: str, nbytes: int) -> None:
        """Count one call of ``nbytes`` bytes under ``label``."""
        self.calls[label] = self.calls.get(label, 0) + 1
        self.bytes[label] = self.bytes.get(label, 0) + nbytes
        self.peak = max(self.peak, nbytes)

    @property
    def total_calls(self) -> int:
        """All calls, every label."""
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        """All bytes, every label."""
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"Ledger(calls={self.total_calls}, bytes={self.total_bytes}, peak={self.peak})"


class CountingReduce(avgfn.ForwardingReduce):
    """A Reduce that records each buffer in a `Ledger`, then hands it to ``inner``.

    A [`avgfn.ForwardingReduce`][avgfn.ForwardingReduce]: every capability of ``inner`` (fused
    division, asynchronous starts, the replica agreement) still works through
    it, and every data buffer is counted before ``inner`` may write into it.
    The agreement's small check is not counted: it is not training traffic.

    Args:
      inner: the Reduce that does the work.
      ledger: where to count.
      label: the ledger entry, e.g. ``"all 8"`` or ``"pairs"``.

    Examples:
      >>> import torch, avgfn
      >>> from avgfn import simulate
      >>> from avgfn.demo import CountingReduce, Ledger
      >>> ledger = Ledger()
      >>> reduce = CountingReduce(simulate.replica_mean(), ledger, "all")
      >>> stacked = {"w": torch.zeros(8, 3, 4)}                      # 8 workers, 12 floats each
      >>> _ = torch.func.vmap(lambda p: avgfn.average(p, reduce))(stacked)
      >>> ledger.calls, ledger.bytes                                  # once per vmapped call
      ({'all': 1}, {'all': 48})
    """

    def __init__(self, inner: Callable[[torch.Tensor], torch.Tensor], ledger: Ledger, label: str) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.label = label

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        del divided
        self.ledger.record(self.label, tensor.numel() * tensor.element_size())

    def __repr__(self) -> str:
        return f"CountingReduce({self.inner!r}, label={self.label!r})"
