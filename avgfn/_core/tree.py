"""The one place that touches ``torch.utils._pytree``.

Every other module goes through these wrappers, so a change in torch's private
pytree API is mended here alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as _pytree

TreeSpec = _pytree.TreeSpec
KeyPath = tuple[Any, ...]

tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
tree_map = _pytree.tree_map
tree_map_only = _pytree.tree_map_only
tree_flatten_with_path = _pytree.tree_flatten_with_path
keystr = _pytree.keystr
GetAttrKey = _pytree.GetAttrKey


class Flat:
    """A tree flattened for one round: its leaves' structure, cheap to key and rebuild.

    A plain ``dict``, ``list`` or ``tuple`` of tensors (``dict(model.named_parameters())``)
    is flattened, keyed and rebuilt without walking torch's pytree, whose spec
    costs a Python call per leaf to build, hash and unflatten; any other tree
    goes through torch's pytree. Both give the same leaves in the same order.
    """

    __slots__ = ("kind", "keys", "_spec")

    def __init__(self, kind: Any, keys: Any, spec: Any = None) -> None:
        self.kind = kind
        self.keys = keys
        self._spec = spec

    @property
    def key(self) -> Any:
        """A hashable value equal for trees of the same structure."""
        return self._spec if self.kind is None else (self.kind, self.keys)

    @property
    def spec(self) -> TreeSpec:
        """torch's spec of the tree (built on first use for the plain containers)."""
        if self._spec is None:
            placeholder = [0] * (len(self.keys) if self.kind is dict else self.keys)
            self._spec = tree_flatten(self.unflatten(placeholder))[1]
        return self._spec

    def unflatten(self, leaves: list[Any]) -> Any:
        """The tree with ``leaves`` in place of its leaves."""
        if self.kind is dict:
            return dict(zip(self.keys, leaves))
        if self.kind is list:
            return list(leaves)
        if self.kind is tuple:
            return tuple(leaves)
        return tree_unflatten(leaves, self._spec)


def all_tensors(values: Sequence[Any]) -> bool:
    """Whether every one of ``values`` is a tensor (of any subclass); true when there are none.

    Eagerly it looks at the set of their types (one C loop over the values,
    then a check per type) instead of a Python ``isinstance`` per value.
    """
    if torch.compiler.is_compiling():
        return all(isinstance(v, torch.Tensor) for v in values)
    return all(issubclass(kind, torch.Tensor) for kind in set(map(type, values)))


def flatten(tree: Any) -> tuple[list[Any], Flat]:
    """The leaves of ``tree`` and its `Flat` structure (see there)."""
    kind = type(tree)
    if kind is dict:
        values = list(tree.values())
        if all_tensors(values):
            return values, Flat(dict, tuple(tree))
    elif kind is list or kind is tuple:
        if all_tensors(tree):
            return list(tree), Flat(kind, len(tree))
    leaves, spec = tree_flatten(tree)
    return leaves, Flat(None, None, spec)


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
