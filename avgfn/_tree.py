"""The one place that touches ``torch.utils._pytree``.

Every other module goes through these wrappers, so a change in torch's private
pytree API is mended here alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.utils._pytree as _pytree

TreeSpec = _pytree.TreeSpec
KeyPath = tuple[Any, ...]

tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map
tree_flatten_with_path = _pytree.tree_flatten_with_path
keystr = _pytree.keystr
GetAttrKey = _pytree.GetAttrKey


def is_leaf_spec(spec: TreeSpec) -> bool:
    """True when ``spec`` describes a bare leaf (no container)."""
    return spec.is_leaf()


def register_record(
    cls: type,
    field_names: Sequence[str],
    static_names: Sequence[str],
    build: Callable[..., Any],
) -> None:
    """Register a record class as a pytree node with keyed children.

    ``field_names`` become children (keyed by :class:`GetAttrKey`), the values of
    ``static_names`` travel in the context, and ``build(**fields)`` rebuilds it.
    """
    fields = tuple(field_names)
    statics = tuple(static_names)

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        return [getattr(obj, n) for n in fields], tuple(getattr(obj, n) for n in statics)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        return (
            [(GetAttrKey(n), getattr(obj, n)) for n in fields],
            tuple(getattr(obj, n) for n in statics),
        )

    def unflatten(children: Any, context: Any) -> Any:
        kwargs = dict(zip(fields, children))
        kwargs.update(zip(statics, context))
        return build(**kwargs)

    _pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
