"""Whether a tensor is seen inside a transform, where a value cannot stop the program."""

from __future__ import annotations

import torch


def batched(t: torch.Tensor) -> bool:
    """True for a tensor seen inside a torch.func transform (vmap, grad)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def traced(leaf: torch.Tensor) -> bool:
    """True under a torch.func transform or while torch.compile traces."""
    return torch.compiler.is_compiling() or batched(leaf)
