"""Resolving ``where``: which leaves of a params tree an averager averages."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, Union

import torch

from avgfn._core import tree as _tree

Where = Union[None, Callable[[Any], bool], Any]
"""``None`` (every floating-point tensor), a callable ``leaf -> bool``, or a
pytree of bools shaped like the params."""


def default_selected(leaf: Any) -> bool:
    """The selection of ``where=None``: floating-point tensors."""
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


_LEFT_OUT: contextvars.ContextVar[Optional[frozenset[int]]] = contextvars.ContextVar(
    "avgfn_left_out", default=None
)


@contextlib.contextmanager
def left_out(tensors: Iterable[Any]) -> Iterator[None]:
    """Within the block, no selection picks any of ``tensors`` (compared by identity).

    The torch-shaped adapters apply torch's filter with it (only the
    parameters that have a gradient are averaged) to an averager whose
    ``where`` they cannot see: a leaf that is one of ``tensors`` is left out
    as if ``where`` had not selected it.
    """
    token = _LEFT_OUT.set(frozenset(id(t) for t in tensors))
    try:
        yield
    finally:
        _LEFT_OUT.reset(token)


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


def selection(where: Where, params: Any, leaves: list[Any], flat: Any) -> list[bool]:
    """One bool per leaf of ``params`` (flattened to ``leaves``; ``flat`` its spec or `Flat`).

    Raises ``ValueError`` when a ``where`` tree does not match ``params`` and
    ``TypeError`` when a selected leaf is not a tensor or ``where`` yields a
    non-bool. Inside `left_out()`, its tensors are never selected.
    """
    mask = _selection(where, params, leaves, flat)
    excluded = None if torch.compiler.is_compiling() else _LEFT_OUT.get()  # the adapters run eagerly
    if not excluded:
        return mask
    return [chosen and id(leaf) not in excluded for chosen, leaf in zip(mask, leaves)]


def _selection(where: Where, params: Any, leaves: list[Any], flat: Any) -> list[bool]:
    if where is None:  # selects tensors only: nothing to check below
        if not torch.compiler.is_compiling() and _tree.all_tensors(leaves):
            return list(map(torch.Tensor.is_floating_point, leaves))  # one C loop
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
        spec = flat.spec if isinstance(flat, _tree.Flat) else flat
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
