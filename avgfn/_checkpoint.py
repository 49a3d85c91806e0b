"""Checkpoints of averager state: flat dicts that ``torch.load(weights_only=True)`` reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from avgfn._core import tree as _tree
from avgfn._core.types import settle
from avgfn._round import sharded as _sharded

_SCALARS = (bool, int, float)


def _key(path: tuple[Any, ...]) -> str:
    return _tree.keystr(path)


def state_dict(state: Any) -> dict[str, Any]:
    """Flatten an averager state into a dict of tensors and Python scalars.

    Keys are the pytree paths of the leaves (``torch.utils._pytree.keystr``,
    e.g. ``".rounds"``). The dict holds the state's own tensors (no copies);
    ``torch.save`` it, and read it back with ``torch.load(..., weights_only=True)``.

    A tensor still in flight (the result of a collective that an averager
    started at one step and reads at a later one, such as the average
    [`avgfn.overlapped_diloco()`][avgfn.overlapped_diloco] holds between two sync steps) is waited
    for here: the dict holds its value, and a failure of that collective
    raises here, before anything is written.

    Args:
      state: a state from an averager's ``init`` or ``update`` (or any pytree
        of tensors and Python scalars).

    Returns:
      A flat ``dict[str, Tensor | bool | int | float]``.

    Raises:
      TypeError: a leaf that is neither a tensor nor a Python scalar.
      Exception: the failure of a collective in flight (as its ``wait`` raises it).

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.periodic(4, reduce=lambda t: t)
      >>> avgfn.state_dict(avg.init({"w": torch.zeros(2)}))
      {'.rounds': tensor(0)}
    """
    leaves, _ = _tree.tree_flatten_with_path(state)
    out: dict[str, Any] = {}
    for path, leaf in leaves:
        key = _key(path)
        if not isinstance(leaf, (torch.Tensor, *_SCALARS)):
            raise TypeError(
                f"state_dict: the state leaf at {key or '<root>'} is "
                f"{type(leaf).__name__}, not a tensor or a Python scalar"
            )
        out[key] = settle(leaf)
    return out





def _check_leaf(key: str, template: Any, value: Any) -> Any:
    if isinstance(template, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"load_state_dict: {key!r} must be a tensor, got {type(value).__name__}"
            )
        if value.shape != template.shape or value.dtype != template.dtype:
            raise ValueError(
                f"load_state_dict: {key!r} must be a {template.dtype} tensor of shape "
                f"{tuple(template.shape)}, got {value.dtype} of shape {tuple(value.shape)}"
            )
        if _sharded.is_dtensor(template) and (
            not _sharded.is_dtensor(value)
            or tuple(value.placements) != tuple(template.placements)  # type: ignore[attr-defined]
            or value.device_mesh != template.device_mesh  # type: ignore[attr-defined]
        ):
            raise ValueError(
                f"load_state_dict: {key!r} must be a DTensor laid out as the template's "
                f"({_sharded.describe_layout(template)}), got "
                + (_sharded.describe_layout(value) if _sharded.is_dtensor(value) else "a plain tensor")
                + " (load onto the mesh the state was saved from)"
            )
        return value.to(device=template.device)
    if type(value) is not type(template):
        raise TypeError(
            f"load_state_dict: {key!r} must be {type(template).__name__}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def load_state_dict(template_state: Any, state_dict: Mapping[str, Any]) -> Any:
    """Rebuild a state shaped like ``template_state`` from a [`state_dict()`][avgfn.state_dict].

    Loading is strict: a missing or unknown key, a tensor of another shape or
    dtype, or a scalar of another type raises, and nothing is built. Tensors
    are moved to the device of the template's leaf.

    Args:
      template_state: a state of the same averager (``avg.init(params)``).
      state_dict: what [`state_dict()`][avgfn.state_dict] returned (possibly through
        ``torch.save``/``torch.load``).

    Returns:
      A new state record with the loaded values.

    Raises:
      ValueError: missing or unknown keys, or a tensor of another shape or dtype.
      TypeError: ``state_dict`` is not a mapping, or a value of the wrong type.

    Examples:
      >>> import io, torch, avgfn
      >>> avg = avgfn.periodic(4, reduce=lambda t: t)
      >>> params = {"w": torch.zeros(2)}
      >>> _, state = avg.update(params, avg.init(params), 0)
      >>> buf = io.BytesIO(); torch.save(avgfn.state_dict(state), buf); _ = buf.seek(0)
      >>> loaded = avgfn.load_state_dict(avg.init(params), torch.load(buf, weights_only=True))
      >>> int(loaded.rounds)
      1
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}"
        )
    leaves, spec = _tree.tree_flatten_with_path(template_state)
    keys = [_key(path) for path, _ in leaves]
    missing = [k for k in keys if k not in state_dict]
    unknown = sorted(set(state_dict) - set(keys), key=str)
    if missing or unknown:
        raise ValueError(
            f"load_state_dict: the checkpoint does not match the state: missing keys {missing}, "
            f"unknown keys {unknown}"
        )
    values = [_check_leaf(k, leaf, state_dict[k]) for k, (_, leaf) in zip(keys, leaves)]
    return _tree.tree_unflatten(values, spec)
