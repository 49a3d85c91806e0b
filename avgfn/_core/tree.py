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

    ``field_names`` become children (keyed by `GetAttrKey`), the values of
    ``static_names`` travel in the context, and ``build(**fields)`` rebuilds it.
    """
    fields = tuple(field_names)
    statics = tuple(static_names)

    # A field holding None is structure, not a leaf (torch's pytree would make
    # None a leaf, which vmap and checkpoints cannot hold): it rides in the
    # context, with the static fields.
    def split(obj: Any) -> tuple[list[tuple[str, Any]], Any]:
        present = [(n, getattr(obj, n)) for n in fields]
        empty = tuple(n for n, v in present if v is None)
        context = (tuple(getattr(obj, n) for n in statics), empty)
        return [(n, v) for n, v in present if v is not None], context

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        children, context = split(obj)
        return [v for _, v in children], context

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        children, context = split(obj)
        return [(GetAttrKey(n), v) for n, v in children], context

    def unflatten(children: Any, context: Any) -> Any:
        static_values, empty = context
        values = iter(children)
        kwargs = {n: (None if n in empty else next(values)) for n in fields}
        kwargs.update(zip(statics, static_values))
        return build(**kwargs)

    _pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


def paths(tree: Any) -> list[str]:
    """The path of every leaf of ``tree``, in flattening order (``"<root>"`` for a bare leaf)."""
    return [keystr(path) or "<root>" for path, _ in tree_flatten_with_path(tree)[0]]


def path_of(tree: Any, index: int) -> str:
    """The path of leaf ``index`` of ``tree`` (flattening with keys costs: error paths only)."""
    return paths(tree)[index]


def lazy_paths(tree: Any, chosen: Sequence[int]) -> Callable[[], list[str]]:
    """A function naming the leaves ``chosen`` of ``tree``, computed on first call only."""
    memo: list[list[str]] = []

    def names() -> list[str]:
        if not memo:
            every = paths(tree)
            memo.append([every[i] for i in chosen])
        return memo[0]

    return names
