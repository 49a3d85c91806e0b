"""The check at ``init`` that the replicas of a group hold matching params.

A replica whose params differ in structure (a leaf of another shape or dtype,
a missing leaf) would otherwise meet a backend size error, a hang, or an
average of unrelated numbers. At ``init``, an averager hands a signature of
its params to its Reduce's ``check_replicas`` method, when the Reduce has one
(:class:`avgfn.collectives.GroupMean` does: one small collective that every
rank of the group joins); fakes and simulated replicas have nothing to
compare against, and skip it.

Modes: ``"structure"`` (paths, shapes, dtypes; the default), ``"values"``
(structure and a digest of every tensor's bytes: the replicas must start from
identical values), or ``None`` (no check).
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Any, Optional

import torch

from avgfn import _health, _tree
from avgfn._base import Reduce

MODES = ("structure", "values", None)


def check_mode(verify: Any) -> Optional[str]:
    """Validate the ``verify`` argument."""
    if verify not in MODES:
        raise ValueError(f"verify must be one of {MODES}, got {verify!r}")
    return verify


def describe(params: Any) -> list[tuple[str, str]]:
    """One ``(path, what)`` entry per leaf: shape and dtype, or the leaf's type."""
    entries = []
    for path, leaf in _tree.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, torch.Tensor):
            what = f"{tuple(leaf.shape)} {leaf.dtype}"
        else:
            what = type(leaf).__name__
        entries.append((_tree.keystr(path) or "<root>", what))
    return entries


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def signature(params: Any, mode: str) -> tuple[bytes, list[tuple[str, str]]]:
    """The digest the replicas compare, and the entries it was made from."""
    entries = describe(params)
    digest = hashlib.blake2b(repr(entries).encode(), digest_size=8)
    if mode == "values":
        for leaf in _tree.tree_leaves(params):
            if isinstance(leaf, torch.Tensor):
                digest.update(_tensor_bytes(leaf))
            else:
                digest.update(repr(leaf).encode())
        entries = entries + [("<values>", digest.hexdigest())]
    return digest.digest(), entries


def verify(params: Any, reduce: Reduce, mode: Optional[str]) -> None:
    """Run the check of ``mode`` through ``reduce`` when it can compare replicas."""
    if mode is None:
        return
    check = getattr(reduce, "check_replicas", None)
    if check is None:
        return
    leaves = [leaf for leaf in _tree.tree_leaves(params) if isinstance(leaf, torch.Tensor)]
    if leaves and _health.traced(leaves[0]):
        return
    digest, entries = signature(params, mode)
    check(digest, entries)
