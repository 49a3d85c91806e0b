"""Resolving ``where``: which leaves of a params tree an averager averages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

from avgfn._core import tree as _tree

Where = Union[None, Callable[[Any], bool], Any]
"""``None`` (every floating-point tensor), a callable ``leaf -> bool``, or a
pytree of bools shaped like the params."""


def default_selected(leaf: Any) -> bool:
    """The selection of ``where=None``: floating-point tensors."""
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


def check_where(where: Any) -> None:
    """Early validation of ``where`` at factory time (its shape is checked later)."""
    if where is None or callable(where):
        return
    for leaf in _tree.tree_leaves(where):
        if not isinstance(leaf, bool):
            raise TypeError(
                "where must be None, a callable leaf -> bool, or a pytree of bools; "
                f"it holds {type(leaf).__name__} {leaf!r}"
            )


def selection(where: Where, params: Any, leaves: list[Any], spec: _tree.TreeSpec) -> list[bool]:
    """One bool per leaf of ``params`` (flattened to ``leaves``/``spec``).

    Raises ``ValueError`` when a ``where`` tree does not match ``params`` and
    ``TypeError`` when a selected leaf is not a tensor or ``where`` yields a
    non-bool.
    """
    if where is None:
        return [default_selected(leaf) for leaf in leaves]
    if callable(where):
        mask = []
        for i, leaf in enumerate(leaves):
            chosen = where(leaf)
            if not isinstance(chosen, bool):
                raise TypeError(
                    f"where(leaf) must return a bool, got {type(chosen).__name__} "
                    f"{chosen!r} for the leaf at {_tree.path_of(params, i)}"
                )
            mask.append(chosen)
    else:
        mask, where_spec = _tree.tree_flatten(where)
        if where_spec != spec:
            raise ValueError(
                "where must be a pytree of bools with the structure of params; "
                f"where is {where_spec}, params is {spec}"
            )
        for leaf in mask:
            if not isinstance(leaf, bool):
                raise TypeError(
                    f"where must hold bools only, got {type(leaf).__name__} {leaf!r}"
                )
    for i, (leaf, chosen) in enumerate(zip(leaves, mask)):
        if chosen and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"where selects the leaf at {_tree.path_of(params, i)} for averaging, but it is "
                f"{type(leaf).__name__} {leaf!r}, not a tensor"
            )
    return mask
