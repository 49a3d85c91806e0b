"""The replicas of a group agree on what they average, before any value is mixed.

Two checks, both through the group-backed Reduce's ``agree`` (see
[`avgfn.GroupReduce`][avgfn.GroupReduce]): fakes and simulated replicas have nothing to
compare against, and skip them.

* At ``init`` (`verify()`), the replicas compare a signature of their
  params: ``"structure"`` (paths, shapes, dtypes), ``"values"`` (also a
  digest of every tensor's bytes: the replicas start from identical values)
  or ``None`` (no check).
* At every round (`agree_round()`, on by default: ``Round(agree=False)``
  turns it off), the replicas compare the paths, shapes and dtypes of the
  leaves they are about to average, and the step. A replica whose ``where``
  selects other leaves, or that is at another step of its schedule, makes
  every replica raise [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] before the data
  moves. It costs one all-reduce of two int64 per round; the digest of the
  structure is cached, so each round hashes only the step.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Callable
from typing import Any, Optional

import torch

from avgfn._core import tree as _tree
from avgfn._core import types as _types
from avgfn._core.traced import traced
from avgfn._core.types import Reduce

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
    if _types.group_of(reduce) is None:
        return
    leaves = [leaf for leaf in _tree.tree_leaves(params) if isinstance(leaf, torch.Tensor)]
    if leaves and traced(leaves[0]):
        return
    digest, entries = signature(params, mode)
    _types.agree(reduce, digest, lambda: entries)


_STRUCTURES: dict[Any, bytes] = {}
_CACHE_SIZE = 64


def _structure(leaves: list[torch.Tensor], names: Callable[[], list[str]], key: Any) -> bytes:
    """The digest of the leaves' paths, shapes and dtypes, cached under ``key``."""
    layout = tuple((leaf.shape, leaf.dtype) for leaf in leaves)
    full = None if key is None else (key, layout)
    cached = None if full is None else _STRUCTURES.get(full)
    if cached is None:
        entries = [(name, f"{tuple(s)} {d}") for name, (s, d) in zip(names(), layout)]
        cached = hashlib.blake2b(repr(entries).encode(), digest_size=8).digest()
        if full is not None:
            if len(_STRUCTURES) >= _CACHE_SIZE:
                _STRUCTURES.clear()
            _STRUCTURES[full] = cached
    return cached


def agree_round(
    leaves: list[torch.Tensor], reduce: Reduce, step: Optional[int], names: Callable[[], list[str]], key: Any
) -> None:
    """Every replica raises unless all average the same leaves at the same ``step``."""
    if _types.group_of(reduce) is None or (leaves and traced(leaves[0])):
        return
    structure = _structure(leaves, names, key)
    at = -1 if step is None else step
    digest = hashlib.blake2b(structure + at.to_bytes(8, "little", signed=True), digest_size=8).digest()

    def entries() -> list[tuple[str, str]]:
        described = [(name, f"{tuple(leaf.shape)} {leaf.dtype}") for name, leaf in zip(names(), leaves)]
        return [("<step>", "none" if step is None else str(step))] + described

    _types.agree(reduce, digest, entries)
