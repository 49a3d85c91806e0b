"""What a round needs to know about its leaves' layout, read once per round.

Every part of a round asks the same questions of its leaves: how many
elements each holds, the dtype their mean is taken in, whether they share
one device. On a model of many small tensors each pass over the leaves
costs as much as the arithmetic, so `facts()` reads each leaf's shape, dtype
and device once and keeps the answers for a layout it has seen before.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

Signature = tuple[tuple[torch.Size, torch.dtype, torch.device], ...]


class Facts:
    """The layout of a round's leaves.

    Attributes:
      signature: ``(shape, dtype, device)`` of each leaf.
      numels: the element count of each leaf.
      count: their sum.
      dtype: the dtype the mean is taken in: the promoted dtype of the leaves, as
        ``torch.cat`` gives torch's ``average_parameters`` its flat buffer
        (integer or bool leaves alone: the default float dtype, so that their
        mean is not truncated before the cast back).
      uniform: every leaf has that dtype.
      device: the device of every leaf, or ``None`` when they are on several.
      solid: every leaf has at least one dimension and one element (what
        `torch._chunk_cat` takes).
      shaped: ``(index, shape)`` of each leaf that is not 1-D (its piece of a
        flat buffer needs a view of its own shape).
    """

    __slots__ = ("signature", "numels", "count", "dtype", "uniform", "device", "solid", "shaped")

    def __init__(self, signature: Signature) -> None:
        self.signature = signature
        self.numels = [math.prod(shape) for shape, _, _ in signature]
        self.count = sum(self.numels)
        self.dtype = promoted({dtype for _, dtype, _ in signature})
        self.uniform = all(dtype == self.dtype for _, dtype, _ in signature)
        devices = {device for _, _, device in signature}
        self.device: Optional[torch.device] = signature[0][2] if len(devices) == 1 else None
        self.solid = all(len(shape) > 0 for shape, _, _ in signature) and all(self.numels)
        self.shaped = [(i, shape) for i, (shape, _, _) in enumerate(signature) if len(shape) != 1]


def promoted(dtypes: set[torch.dtype]) -> torch.dtype:
    """The promoted dtype of ``dtypes`` (at least one); integer or bool alone promote to the default float."""
    dtype, *others = dtypes
    for other in others:
        dtype = torch.promote_types(dtype, other)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


_SIGNATURE = operator.attrgetter("shape", "dtype", "device")

_KNOWN: dict[tuple[Signature, torch.dtype], Facts] = {}
_KEEP = 64


def facts(leaves: list[torch.Tensor]) -> Facts:
    """The `Facts` of ``leaves`` (at least one), kept for layouts seen before."""
    if torch.compiler.is_compiling():  # a traced graph must not guard on this cache
        return Facts(tuple([(leaf.shape, leaf.dtype, leaf.device) for leaf in leaves]))
    signature = tuple(map(_SIGNATURE, leaves))  # one C loop over the leaves
    key = (signature, torch.get_default_dtype())  # integer leaves alone take the default dtype
    found = _KNOWN.get(key)
    if found is None:
        if len(_KNOWN) >= _KEEP:
            _KNOWN.clear()
        found = _KNOWN[key] = Facts(signature)
    return found
