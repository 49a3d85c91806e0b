"""A fake group of two replicas for unit tests of the round engine's group paths."""

from __future__ import annotations

from typing import Any

import torch

from avgfn._core.types import Done


class Pair:
    """A group-backed Reduce of two replicas whose peer holds the same values as this one.

    ``start_sum`` doubles its tensor in place (the sum of two equal shares)
    and notes its size in ``sums``; ``agree`` and ``commit`` always pass.
    """

    size = 2

    def __init__(self) -> None:
        self.sums: list[int] = []

    def divisor(self) -> int:
        return 2

    def start(self, tensor: torch.Tensor) -> Any:
        return Done(tensor)

    def start_sum(self, tensor: torch.Tensor) -> Any:
        self.sums.append(tensor.numel())
        return Done(tensor.mul_(2))

    def agree(self, digest: bytes, entries: Any) -> None:
        pass

    def commit(self) -> bool:
        return True

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
