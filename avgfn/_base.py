"""The core types: the Reduce a caller injects and the Averager record."""

from __future__ import annotations

import operator
from typing import Any, Protocol, TypeVar

import attrs
import torch

Params = Any
"""A pytree of tensors (``dict(model.named_parameters())``, nested containers...)."""

State = Any
"""An averager's state: an immutable record registered as a pytree."""


class Reduce(Protocol):
    """The collective an averager is given: the mean over the replicas of a group.

    It is handed a contiguous tensor that the caller owns and returns the
    elementwise mean of that tensor over the replicas of its group. It may write
    into its argument. ``lambda t: t`` is the Reduce of a group of one.
    """

    def __call__(self, tensor: torch.Tensor, /) -> torch.Tensor:
        """Return the mean of ``tensor`` over the group (may reuse its storage)."""
        ...


class InitFn(Protocol):
    """Builds an averager's initial state from the params it will average."""

    def __call__(self, params: Params, /) -> State:
        """Return the initial state for ``params``."""
        ...


class UpdateFn(Protocol):
    """One call per training step: averages when due, never mutates its inputs."""

    def __call__(self, params: Params, state: State, step: int, /) -> tuple[Params, State]:
        """Return ``(params, state)`` after the averaging due at ``step`` (if any)."""
        ...


@attrs.frozen
class Averager:
    """An immutable record of two pure functions, ``init`` and ``update``.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(params, state, step) -> (params, state)``. On a step where
        nothing is due it returns its inputs themselves, at the cost of a
        comparison or two.

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.periodic(2, reduce=lambda t: t)
      >>> params = {"w": torch.ones(3)}
      >>> state = avg.init(params)
      >>> new, state = avg.update(params, state, 1)   # off-step
      >>> new is params
      True
    """

    init: InitFn
    update: UpdateFn


_S = TypeVar("_S")


def check_step(step: Any) -> int:
    """Validate the ``step`` argument of ``update`` and return it as an int."""
    if type(step) is int:
        # The common case, first: torch.compile keeps a plain int step symbolic
        # here, where operator.index would bake each value into a new graph.
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got bool {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def check_state(state: Any, cls: type[_S], averager: str) -> _S:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (made by ``averager``'s init)."""
    if not isinstance(state, cls):
        raise TypeError(
            f"state must be a {cls.__name__} made by {averager}(...).init, "
            f"got {type(state).__name__}"
        )
    return state


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Validate an integer hyperparameter: ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an int, got {type(value).__name__} {value!r}"
            ) from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_reduce(name: str, reduce: Any) -> None:
    """Raise ``TypeError`` unless ``reduce`` is callable."""
    if not callable(reduce):
        raise TypeError(f"{name} must be a callable Tensor -> Tensor, got {reduce!r}")
