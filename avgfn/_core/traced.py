"""Whether a tensor is seen inside a transform, where a value cannot stop the program."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch


def batched(t: torch.Tensor) -> bool:
    """True for a tensor seen inside a torch.func transform (vmap, grad)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def traced(leaf: torch.Tensor) -> bool:
    """True under a torch.func transform or while torch.compile traces."""
    return torch.compiler.is_compiling() or batched(leaf)


def zeros_like_batch(
    leaves: Sequence[Any],
    shape: tuple[int, ...] = (),
    *,
    dtype: torch.dtype = torch.int64,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """A zero tensor (a counter) that ``vmap`` batches like the first tensor of ``leaves``.

    ``torch.zeros`` inside ``vmap(init)`` makes an unbatched tensor, which
    ``vmap`` returns expanded to the replica dimension with stride 0; the
    counter that ``update`` returns (``counter + 1``) is a fresh tensor with
    stride 1. ``torch.compile`` guards on strides, so a state made by
    ``vmap(init)`` would compile one graph and the state after the first
    ``update`` another. Built with ``new_zeros`` on a batched leaf, the counter
    is batched too, and ``vmap`` stacks it into the strides ``update`` gives.
    Outside a transform it is ``torch.zeros`` (a plain tensor, whatever the
    subclass of the leaf).

    Args:
      leaves: the params' leaves (non-tensors are passed over).
      shape: the counter's shape.
      dtype: its dtype.
      device: its device; ``None`` for that of the first tensor (CPU without one).
    """
    first = next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    if first is not None and batched(first):
        return first.new_zeros(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)
