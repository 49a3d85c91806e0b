"""The functional optimizer protocol: a record of ``init`` and ``update``.

An avgfn optimizer applies its update itself and returns the new params,
instead of returning "updates" for the caller to add. That is what lets it
match ``torch.optim`` bit for bit: torch computes ``p.add_(d, alpha=-lr)`` in one
kernel, and the out-of-place ``torch.add(p, d, alpha=-lr)`` runs the same
kernel, while ``p + (-lr * d)`` rounds twice.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol

import attrs
import torch

from avgfn._core import tree as _tree
from avgfn._core.types import Params

OptState = Any
"""An optimizer's state: an immutable record registered as a pytree."""


class OptInitFn(Protocol):
    """Builds an optimizer's initial state from the params it will update."""

    def __call__(self, params: Params, /) -> OptState:
        """Return the initial state for ``params``."""
        ...


class OptUpdateFn(Protocol):
    """One optimizer step: pure, never mutates its inputs."""

    def __call__(self, grads: Params, state: OptState, params: Params, /) -> tuple[Params, OptState]:
        """Return ``(new_params, new_state)`` after one step with ``grads``."""
        ...


@attrs.frozen
class Optimizer:
    """An immutable record of two pure functions, ``init`` and ``update``.

    The same shape as optax's and torchopt's, except that ``update`` returns the
    new params rather than the updates to add to them.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(grads, state, params) -> (new_params, new_state)``.
        ``grads`` and ``params`` are pytrees of the same structure whose leaves
        are tensors. Neither they nor ``state`` are modified; on an error
        nothing changes.
      settings: what the optimizer is, with its hyperparameters
        (``"sgd(lr=0.7, momentum=0.9, ...)"``), as the built-in factories
        say; ``""`` for one built by hand. The DiLoCo family's per-round
        check compares its outer optimizer's across the replicas, so that
        replicas built with other outer steps are refused instead of
        drifting apart.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.sgd(0.5)
      >>> params = {"w": torch.tensor([1.0, 2.0])}
      >>> state = opt.init(params)
      >>> new, state = opt.update({"w": torch.tensor([2.0, 2.0])}, state, params)
      >>> new["w"], params["w"]
      (tensor([0., 1.]), tensor([1., 2.]))
    """

    init: OptInitFn
    update: OptUpdateFn
    settings: str = attrs.field(default="", kw_only=True)


def settings_of(name: str, lr: Any, **options: Any) -> str:
    """``name(lr=..., option=...)``: the `Optimizer.settings` of a built-in factory.

    A schedule of the learning rate is named by its own ``settings`` string
    when it has one, else as ``schedule``: schedules are then not told apart
    (nor compared by the DiLoCo family's check).
    """
    named = getattr(lr, "settings", None)
    rate = repr(lr) if isinstance(lr, (int, float)) else named if isinstance(named, str) and named else "schedule"
    rest = "".join(f", {key}={value!r}" for key, value in options.items())
    return f"{name}(lr={rate}{rest})"


def check_float(name: str, value: Any, *, minimum: float | None = 0.0, below: float | None = None) -> float:
    """Validate a real hyperparameter, returning it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def flatten_params(params: Params, who: str) -> tuple[list[torch.Tensor], _tree.TreeSpec]:
    """Flatten ``params``; every leaf must be a floating-point tensor."""
    leaves, spec = _tree.tree_flatten(params)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
            path = _tree.keystr(_tree.tree_flatten_with_path(params)[0][i][0]) or "<root>"
            raise TypeError(
                f"{who}: every leaf of params must be a floating-point tensor; the leaf at "
                f"{path} is {type(leaf).__name__}"
                + (f" of dtype {leaf.dtype}" if isinstance(leaf, torch.Tensor) else "")
            )
    return leaves, spec


def flatten_like(
    name: str, tree: Any, spec: _tree.TreeSpec, like: list[torch.Tensor], who: str
) -> list[torch.Tensor]:
    """Flatten ``tree`` and check it has ``spec`` and tensors shaped like ``like``.

    The error says which argument does not match params, so a state or grads
    built for another param tree is refused before anything is computed.
    """
    leaves, tree_spec = _tree.tree_flatten(tree)
    if tree_spec != spec:
        raise ValueError(
            f"{who}: {name} does not match the structure of params (was it made for another "
            f"param tree?); {name} is {tree_spec}, params are {spec}"
        )
    for i, (leaf, ref) in enumerate(zip(leaves, like)):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{who}: {name} holds {type(leaf).__name__} where params hold a tensor")
        if leaf.shape != ref.shape:
            path = _tree.keystr(_tree.tree_flatten_with_path(tree)[0][i][0]) or "<root>"
            raise ValueError(
                f"{who}: {name} at {path} has shape {tuple(leaf.shape)}, the param has "
                f"{tuple(ref.shape)} (was it made for another param tree?)"
            )
    return leaves


def check_state_type(state: Any, cls: type, who: str) -> None:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (made by ``who``'s init)."""
    if not isinstance(state, cls):
        raise TypeError(
            f"state must be a {cls.__name__} made by {who}(...).init, got {type(state).__name__}"
        )
