"""Argument checks shared by every factory and update: each error names the argument."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from types import GeneratorType
from typing import Any, TypeVar

import torch

from avgfn._core.traced import traced

_S = TypeVar("_S")


_LARGEST_STEP = (1 << 63) - 1
"""The largest step: the averagers keep steps (and the rounds they start) in int64 tensors."""


def check_step(step: Any) -> int:
    """Validate the ``step`` argument of ``update`` and return it as an int.

    Accepts a Python int, or any integer ``operator.index`` converts (a NumPy
    integer, an integer tensor of one element such as ``torch.tensor(3)``).
    Refuses with ``TypeError`` a bool or a bool tensor (``True`` is not a step),
    a float, a float tensor or a string; with ``ValueError`` a negative step,
    or one past ``2**63 - 1`` (the averagers keep steps in int64 tensors).
    """
    if type(step) is int:
        # The common case, first: torch.compile keeps a plain int step symbolic
        # here, where operator.index would bake each value into a new graph.
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step > _LARGEST_STEP:
            raise ValueError(f"step must be at most 2**63 - 1 (an int64), got {step}")
        return step
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got bool {step!r}")
    if isinstance(step, torch.Tensor) and step.dtype == torch.bool:
        raise TypeError(f"step must be an int, got a bool tensor: {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    if value > _LARGEST_STEP:
        raise ValueError(f"step must be at most 2**63 - 1 (an int64), got {value}")
    return value


class Refused:
    """Stands for a state that cannot be used: an ``update`` given it raises ``error``.

    [`avgfn.chain()`][avgfn.chain] hands it to its averagers when its own
    state is refused, so that the first of them with a round due at the
    step refuses that round through its own check, and its peers (already
    in that round) learn of it at once instead of waiting out their timeout.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def check_state(state: Any, cls: type[_S], averager: str) -> _S:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (made by ``averager``'s init)."""
    if not isinstance(state, cls):
        if isinstance(state, Refused):
            raise state.error
        raise TypeError(
            f"state must be a {cls.__name__} made by {averager}(...).init, "
            f"got {type(state).__name__}"
        )
    return state


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Validate an integer hyperparameter: ``TypeError``/``ValueError`` naming it.

    Accepts the integers ``check_step`` accepts, and refuses what it refuses.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
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


_CONTAINERS = (dict, list, tuple)


def check_params(params: Any, who: str) -> Any:
    """Refuse an iterator or generator where a pytree of tensors is expected.

    ``model.parameters()`` is a generator: a pytree library sees it as one
    opaque leaf, so it would be averaged as nothing at all.
    """
    if type(params) in _CONTAINERS:
        return params
    if isinstance(params, (Iterator, GeneratorType)):
        raise TypeError(
            f"{who}: params must be a pytree of tensors, got a {type(params).__name__} (an iterator "
            "such as model.parameters() is consumed once and is not a pytree): pass "
            "dict(model.named_parameters()), or use avgfn.ModuleAverager(model, averager)"
        )
    return params


def check_update(params: Any, state: Any, cls: type, averager: str) -> None:
    """The checks of every ``update``: `check_state()` of ``state``, then `check_params()` of ``params``."""
    if not isinstance(state, cls):
        check_state(state, cls, averager)
    if type(params) not in _CONTAINERS:  # (the name is built only for the error)
        check_params(params, f"{averager}(...).update")


def check_has_tensor(leaves: list[Any], who: str) -> None:
    """Refuse a params tree in which there is no tensor to average."""
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves}) or ["nothing"]
        raise TypeError(
            f"{who}: params hold no tensor to average (leaves: {', '.join(kinds)}); pass a pytree "
            "of tensors such as dict(model.named_parameters())"
        )


def check_reduced(result: Any, buf: torch.Tensor) -> torch.Tensor:
    """Refuse a Reduce result that is not a tensor like its input ``buf`` (type, shape, dtype, device).

    Every call of a Reduce, on the data and on the health flags or weights.
    """
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"reduce must return a Tensor, got {type(result).__name__}")
    if result.layout != torch.strided:
        raise TypeError(f"reduce must return a dense (strided) tensor, got layout {result.layout}")
    if result.shape != buf.shape:
        raise ValueError(
            f"reduce must return a tensor shaped like its input {tuple(buf.shape)}, "
            f"got {tuple(result.shape)}"
        )
    if result.dtype != buf.dtype or result.device != buf.device:
        raise TypeError(
            f"reduce must return a tensor of its input's dtype and device ({buf.dtype} on "
            f"{buf.device}), got {result.dtype} on {result.device}"
        )
    if not result.is_contiguous() and not traced(result):
        raise TypeError(
            f"reduce must return a contiguous tensor, like its input (the averaged leaves are views "
            f"of it), got one with strides {result.stride()}"
        )
    return result
