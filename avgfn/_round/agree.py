"""The replicas of a group agree on what they average, before any value is mixed.

Two checks, both through the group-backed Reduce's ``agree`` (see
[`avgfn.GroupReduce`][avgfn.GroupReduce]): fakes and simulated replicas have nothing to
compare against, and skip them.

* At the start of training (`verify()`), the replicas compare a signature
  of a tree: ``"structure"`` (paths, shapes, dtypes), ``"values"`` (also a
  digest of every tensor's bytes: the replicas start from identical values)
  or ``None`` (no check). Most averagers run it on the params at ``init``;
  the outer-step averagers run the structure check there and the values
  check on their global copy at their first round (a resume builds its
  template from mid-period params, whose values differ between replicas).
* At every round (`start_round()`, then ``wait()``, on by default: ``Round(agree=False)``
  turns it off; skipped under ``vmap`` and while ``torch.compile`` traces,
  where a host-side digest cannot run), the replicas compare the paths, shapes and dtypes of the
  leaves they are about to average, and the step. A replica whose ``where``
  selects other leaves, or that is at another step of its schedule, makes
  every replica raise [`avgfn.ReplicaMismatchError`][avgfn.ReplicaMismatchError] before the data
  moves. It costs one all-reduce of four int64 per round; the digest of the
  structure is cached, so each round hashes only the step.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from avgfn._core import tree as _tree
from avgfn._core import types as _types
from avgfn._core.traced import traced
from avgfn._core.types import Reduce
from avgfn._round import facts as _facts
from avgfn._round import predicted as _predicted
from avgfn._round import sharded as _sharded

MODES = ("structure", "values", None)


def lanes_entry(reduce: Reduce) -> str:
    """What a round's check says of the lanes ``reduce`` spreads its sums over ("" for one lane).

    Their number and the spare groups' names: replicas that differ in either
    would send pieces their peers do not expect, or sum one piece with another.
    """
    lanes = _types.lanes(reduce)
    return "" if lanes == 1 else f", lanes={lanes} {list(_types.lane_names(reduce))}"


def check_mode(verify: Any) -> Optional[str]:
    """Validate the ``verify`` argument."""
    if verify not in MODES:
        raise ValueError(f"verify must be one of {MODES}, got {verify!r}")
    return verify


def describe(params: Any) -> list[tuple[str, str]]:
    """One ``(path, what)`` entry per leaf: shape and dtype, or the leaf's type."""
    entries = []
    for path, leaf in _tree.tree_flatten_with_path(params)[0]:
        if _sharded.is_dtensor(leaf):  # what a replica of the group sees: its shard
            what = f"{tuple(_sharded.local(leaf).shape)} {leaf.dtype}{_sharded.layout(leaf)}"
        elif isinstance(leaf, torch.Tensor):
            what = f"{tuple(leaf.shape)} {leaf.dtype}"
        else:
            what = type(leaf).__name__
        entries.append((_tree.keystr(path) or "<root>", what))
    return entries


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = _sharded.local(t).detach().to("cpu").contiguous()
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
    # On a group that keeps a history, as a round of no predictable layout: a peer
    # may be in a predicted round (a replica that builds its averager again, or
    # resumes, while they go on); this replica takes part in it first, and the
    # peers' check that follows meets this one.
    gate = _predicted.start(reduce, None, digest, lambda: entries, None)
    if gate is None:
        _types.agree(reduce, digest, lambda: entries)
    else:
        gate.wait()


_STRUCTURES: dict[Any, bytes] = {}
_CACHE_SIZE = 64


def _structure(
    leaves: list[torch.Tensor],
    names: Callable[[], list[str]],
    key: Any,
    sharding: Optional[tuple[str, ...]] = None,
    signature: Optional[_facts.Signature] = None,
) -> bytes:
    """The digest of the leaves' paths, shapes and dtypes (and sharding), cached under ``key``.

    ``signature``: the leaves' `avgfn._round.facts.Signature`, when the caller has it.
    """
    if signature is None:
        signature = _facts.facts(leaves).signature if leaves else ()
    full = None if key is None else (key, signature, sharding)
    cached = None if full is None else _STRUCTURES.get(full)
    if cached is None:
        extra = sharding or ("",) * len(leaves)
        entries = [(name, f"{tuple(s)} {d}{x}") for name, (s, d, _), x in zip(names(), signature, extra)]
        cached = hashlib.blake2b(repr(entries).encode(), digest_size=8).digest()
        if full is not None:
            if len(_STRUCTURES) >= _CACHE_SIZE:
                _STRUCTURES.clear()
            _STRUCTURES[full] = cached
    return cached


def start_round(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    step: Optional[int],
    names: Callable[[], list[str]],
    key: Any,
    wire: str = "",
    refused: str = "",
    sharding: Optional[tuple[str, ...]] = None,
    flags: Optional[Sequence[int]] = None,
    layout: Optional[_predicted.Layout] = None,
    signature: Optional[_facts.Signature] = None,
) -> Any:
    """Begin the check that every replica averages the same leaves at the same ``step``.

    ``wire`` describes what decides the round's collectives besides the
    leaves (the round options: buckets, wire dtype, health exchange, devices)
    and what decides its result (the averager and what it averages, the
    ``nonfinite`` policy, error feedback, an outer step's settings); it is
    part of the digest, so replicas built with different options raise
    instead of exchanging buffers that do not match or parting ways. ``refused`` says why
    this replica refuses the round (a local check failed): its peers then
    raise at once instead of waiting for it. ``sharding`` (for DTensor
    leaves, whose local shards ``leaves`` are) gives per leaf the global
    shape, placements and shard offset (`avgfn._round.sharded.layout()`):
    replicas holding other pieces of a tensor disagree. ``flags`` (the
    round's health flags) travel with the check when the group can carry
    them (`avgfn._core.types.carries_flags()`). ``wait()`` on the result
    raises on every replica unless all agree.

    ``layout``: the round's agreement may start with its data
    (`avgfn._round.predicted`); when the group's history predicts exactly
    that round, the result is a [`Predicted`][avgfn._round.predicted.Predicted]
    round, which the engine starts after its data. On a group that keeps a
    history, every call takes part in the collective the history predicts.
    """
    if _types.group_of(reduce) is None or torch.compiler.is_compiling() or (leaves and traced(leaves[0])):
        return _types.AGREED  # no peers, or traced: a host-side digest cannot run in the graph
    structure = _structure(leaves, names, key, sharding, signature)
    at = -1 if step is None else step
    digest = hashlib.blake2b(
        structure + at.to_bytes(8, "little", signed=True) + wire.encode() + refused.encode(), digest_size=8
    ).digest()

    def entries() -> list[tuple[str, str]]:
        extra = sharding or ("",) * len(leaves)
        described = [
            (name, f"{tuple(leaf.shape)} {leaf.dtype}{x}") for name, leaf, x in zip(names(), leaves, extra)
        ]
        head = [("<step>", "none" if step is None else str(step))]
        head += [("<round>", wire)] if wire else []
        return head + ([("<refused>", refused)] if refused else []) + described

    gate = _predicted.start(reduce, layout, digest, entries, flags)
    return _types.start_agree(reduce, digest, entries, flags) if gate is None else gate
