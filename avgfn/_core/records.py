"""Immutable state records: frozen ``attrs`` classes that are pytree nodes.

A record is declared as an ``attrs`` class body deriving from `Record` and
decorated with `record()`. Fields are pytree children unless declared with
``static_field()``, whose values travel in the tree's context instead (periods,
names: things that never change and are not tensors).

Two facts of torch 2.13 shape this module (see ``shared/STYLE.md``):

* ``torch.compile`` cannot construct ``attrs.frozen`` instances but can run a
  plain ``__init__`` that sets slots with ``object.__setattr__``; so
  `record()` writes that ``__init__`` itself.
* ``torch.func.vmap`` only sees classes registered with ``torch.utils._pytree``;
  so every record is registered there, with keys, by `avgfn._tree`.

Type checkers see a record as a frozen dataclass (`record()` is marked with
``dataclass_transform``): its constructor takes its fields, every one of them
required, as the generated ``__init__`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from avgfn._core import tree as _tree

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
elif TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        """On Python 3.10 the marker only matters to type checkers."""
        return lambda decorated: decorated


_STATIC = "avgfn_static"

T = TypeVar("T")
R = TypeVar("R", bound="Record")


class Record:
    """The base of every state record: declares, for type checkers, what `record()` adds.

    At run time it is an empty slotted class; `record()` attaches ``replace``.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        def replace(self: R, **changes: Any) -> R:
            """A copy of this record with the named fields changed."""
            ...


def static_field(**kwargs: Any) -> Any:
    """An ``attrs`` field kept out of the pytree (it rides in the tree context)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_STATIC] = True
    return attrs.field(metadata=metadata, **kwargs)


def _make_init(names: tuple[str, ...]) -> Any:
    # A plain function with an explicit signature: torch.compile traces it.
    args = ", ".join(names)
    body = "\n".join(f"    object.__setattr__(self, {n!r}, {n})" for n in names) or "    pass"
    src = f"def __init__(self, {args}):\n{body}\n" if names else f"def __init__(self):\n{body}\n"
    namespace: dict[str, Any] = {}
    exec(src, namespace)  # noqa: S102 - generated from attribute names only
    return namespace["__init__"]


@dataclass_transform(
    eq_default=False, frozen_default=True, field_specifiers=(attrs.field, static_field)
)
def record(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, slotted, pytree-registered state record.

    The record compares by identity (``eq=False``: ``==`` on tensors would
    return a tensor) and has a ``replace(**changes)`` method. Its ``__init__``
    takes every field, without defaults (pytree unflattening passes them all).
    """
    # The class is finished dynamically below (a generated __init__, replace,
    # the field names), which its static type cannot describe.
    frozen: Any = attrs.frozen(cls, eq=False, init=False)
    all_fields = attrs.fields(frozen)
    names = tuple(f.name for f in all_fields)
    children = tuple(f.name for f in all_fields if not f.metadata.get(_STATIC))
    statics = tuple(f.name for f in all_fields if f.metadata.get(_STATIC))
    frozen.__init__ = _make_init(names)

    def replace(self: Any, **changes: Any) -> Any:
        unknown = set(changes) - set(names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.replace() got unknown field(s) {sorted(unknown)}; "
                f"fields are {list(names)}"
            )
        values = {n: changes.get(n, getattr(self, n)) for n in names}
        return type(self)(**values)

    frozen.replace = replace
    frozen._avgfn_children = children
    frozen._avgfn_statics = statics
    _tree.register_record(frozen, children, statics, frozen)
    return frozen
