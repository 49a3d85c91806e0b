"""One averaging of a params tree: torch's ``average_parameters``, made pure."""

from __future__ import annotations

from typing import Any

import torch

from avgfn import _health, _select, _tree, _wire
from avgfn._base import Params, Reduce
from avgfn._errors import AveragingError


def compute_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The dtype the mean is taken in: the promoted dtype of ``leaves``.

    This is the dtype ``torch.cat`` gives the flat buffer in torch's
    ``average_parameters``. Integer or bool leaves alone promote further to the
    default floating dtype, so their mean is not truncated before the cast back.
    """
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


def _check_result(result: Any, flat: torch.Tensor) -> torch.Tensor:
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"reduce must return a Tensor, got {type(result).__name__}")
    if result.shape != flat.shape:
        raise ValueError(
            f"reduce must return a tensor shaped like its input {tuple(flat.shape)}, "
            f"got {tuple(result.shape)}"
        )
    return result


def _pack_divided(leaves: list[torch.Tensor], dtype: torch.dtype, divisor: int) -> torch.Tensor:
    """``torch.cat(leaves).to(dtype) / divisor`` in one pass over the memory."""
    flat = torch.empty(sum(leaf.numel() for leaf in leaves), dtype=dtype, device=leaves[0].device)
    offset = 0
    for leaf in leaves:
        n = leaf.numel()
        piece = flat[offset : offset + n]
        source = leaf.detach().reshape(-1)
        if source.dtype == dtype:
            torch.div(source, divisor, out=piece)
        else:  # cast first, as cat then div_ would
            piece.copy_(source)
            piece.div_(divisor)
        offset += n
    return flat


def average_leaves(
    leaves: list[torch.Tensor], reduce: Reduce, watch: _health.Watch | None = None
) -> list[torch.Tensor]:
    """Average ``leaves`` with one Reduce call per device (one in the usual case).

    The leaves are copied into a fresh flat buffer of :func:`compute_dtype` (the
    only buffer the Reduce sees), and come back as views of the reduced buffer
    cast to their own dtype, shape and device. The inputs are never written.
    ``watch``, when given, notes each reduced buffer for the non-finite check.
    """
    dtype = compute_dtype(leaves)
    by_device: dict[torch.device, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_device.setdefault(leaf.device, []).append(i)
    out: list[Any] = [None] * len(leaves)
    divisor = getattr(reduce, "divisor", None)
    start_sum = getattr(reduce, "start_sum", None)
    for indices in by_device.values():
        if divisor is not None and start_sum is not None:
            # A Reduce that divides, then sums (GroupMean): the division is
            # fused into the packing copy, with the bits of cat, then div_.
            flat = _pack_divided([leaves[i] for i in indices], dtype, divisor())
            reduced = _check_result(start_sum(flat).wait(), flat)
        else:
            flat = torch.cat([leaves[i].detach().reshape(-1) for i in indices])
            if flat.dtype != dtype:
                flat = flat.to(dtype)
            reduced = _check_result(reduce(flat), flat)
        if watch is not None:
            watch.add(reduced)
        offset = 0
        for i in indices:
            leaf = leaves[i]
            n = leaf.numel()
            value = reduced[offset : offset + n].view(leaf.shape).to(leaf.dtype)
            if leaf.requires_grad:
                value.requires_grad_(True)
            out[i] = value
            offset += n
    return out


def average_tree(
    params: Params,
    reduce: Reduce,
    where: _select.Where,
    wire: _wire.Wire = _wire.DEFAULT,
    residual: Any = None,
    nonfinite: str = "ignore",
) -> tuple[Params, Any]:
    """The body of :func:`average`, also returning the new rounding residual.

    ``residual`` (used with ``wire.comm_dtype`` by averagers with error
    feedback) is a tuple of one tensor per floating-point leaf of ``params``,
    in tree order.
    """
    leaves, spec = _tree.tree_flatten(params)
    mask = _select.selection(where, params, leaves, spec)
    chosen = [i for i, selected in enumerate(mask) if selected]
    if not chosen:
        return params, residual
    selected = [leaves[i] for i in chosen]
    if not wire.is_default and _wire.batched(selected[0]):
        raise ValueError(
            "donate, bucket_bytes and comm_dtype are not supported under torch.func.vmap (they "
            f"stage values in plain buffers); got {wire}. Use the default round there."
        )
    if wire.donate:
        _wire.check_donatable(leaves, mask, lambda i: _select._path_of(params, i))

    def local_bad() -> list[str]:
        return [_select._path_of(params, i) for i in chosen if not bool(_health.finite([leaves[i]]))]

    health = _health.plan(selected, reduce, nonfinite, wire.donate, local_bad)
    reduce = health.reduce
    if health.mask is not None:
        selected = [_zero_unless(health.mask, leaf) for leaf in selected]
    # The eager "raise" check reads the reduced buffers; traced, it goes per leaf.
    watch = _health.Watch() if health.check and not _health.traced(selected[0]) else None
    if wire.is_default and residual is None:
        averaged = average_leaves(selected, reduce, watch)
        new_res_leaves = None
    else:
        res_leaves = None
        if residual is not None:
            res_leaves = _residual_leaves(residual, leaves)
        averaged, new_res_leaves = _reduce_by_device(
            selected,
            reduce,
            wire,
            None if res_leaves is None else [res_leaves[i] for i in chosen],
            watch,
        )
    if health.mask is not None:
        averaged = [_like(leaves[i], value, health.keep) for i, value in zip(chosen, averaged)]
    if health.check:
        averaged = _health.check_result(
            nonfinite,
            [leaves[i] for i in chosen],
            averaged,
            watch,
            local_bad,
            lambda flags: [_select._path_of(params, i) for i, bad in zip(chosen, flags) if bad],
        )
    new_leaves = list(leaves)
    for i, value in zip(chosen, averaged):
        new_leaves[i] = value
    new_residual = residual
    if new_res_leaves is not None:
        assert res_leaves is not None
        for i, value in zip(chosen, new_res_leaves):
            if value is not None:
                res_leaves[i] = value
        new_residual = tuple(r for r in res_leaves if r is not None)
    return _tree.tree_unflatten(new_leaves, spec), new_residual


def _zero_unless(ok: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``leaf`` where ``ok``, zeros where not (a NaN times zero is still NaN)."""
    return torch.where(ok, leaf.detach(), torch.zeros((), dtype=leaf.dtype, device=leaf.device))


def _like(leaf: torch.Tensor, value: torch.Tensor, keep: Any) -> torch.Tensor:
    """Give an excluded round's result the leaf's autograd flag; keep the leaf if told."""
    if keep is not None:
        value = torch.where(keep, leaf.detach(), value)
    if leaf.requires_grad and not value.requires_grad:
        value = value.requires_grad_(True)
    return value


def _residual_leaves(residual: Any, leaves: list[Any]) -> list[Any]:
    """Align the residual (one tensor per floating-point leaf) with ``leaves``."""
    it = iter(residual)
    out: list[Any] = []
    for leaf in leaves:
        if _select.default_selected(leaf):
            res = next(it, None)
            if res is None or res.shape != leaf.shape:
                raise ValueError(
                    "the error-feedback residual in the state does not match params "
                    "(was the state made by init for these params?)"
                )
            out.append(res)
        else:
            out.append(None)
    if next(it, None) is not None:
        raise ValueError("the error-feedback residual in the state has more tensors than params")
    return out


def _reduce_by_device(
    leaves: list[torch.Tensor],
    reduce: Reduce,
    wire: _wire.Wire,
    residuals: Any,
    watch: _health.Watch | None = None,
) -> tuple[list[torch.Tensor], Any]:
    dtype = compute_dtype(leaves)
    by_device: dict[torch.device, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_device.setdefault(leaf.device, []).append(i)
    out: list[Any] = [None] * len(leaves)
    new_res: Any = None if residuals is None else [None] * len(leaves)
    for indices in by_device.values():
        values, res = _wire.reduce_leaves(
            [leaves[i] for i in indices],
            reduce,
            wire,
            dtype,
            None if residuals is None else [residuals[i] for i in indices],
            watch,
        )
        for j, i in enumerate(indices):
            out[i] = values[j]
            if new_res is not None:
                new_res[i] = None if res is None else res[j]
    return out, new_res


def average(
    params: Params,
    reduce: Reduce,
    *,
    where: _select.Where = None,
    donate: bool = False,
    bucket_bytes: int | None = None,
    comm_dtype: torch.dtype | None = None,
    nonfinite: str = "raise",
) -> Params:
    """Average the selected leaves of ``params`` over a group, once.

    The pure twin of torch's
    ``torch.distributed.algorithms.model_averaging.utils.average_parameters``:
    the selected leaves are flattened into one buffer of their promoted dtype
    (as ``torch.cat`` does), handed to ``reduce``, and split back. Each leaf
    keeps its dtype, shape and device; unselected leaves come back as the same
    objects; the inputs are never modified.

    Args:
      params: a pytree of tensors (other leaves pass through unless selected).
      reduce: the mean over the group (see :class:`avgfn.Reduce`);
        ``avgfn.collectives.all_reduce_mean()`` on a process group,
        ``avgfn.simulate.replica_mean()`` under ``vmap``.
      where: ``None`` (every floating-point tensor), a callable ``leaf -> bool``
        (torch's own filter is ``lambda p: p.grad is not None``), or a pytree
        of bools shaped like ``params``.
      donate: give up ``params``: the averaged values are written into its
        tensors, which come back (see ``docs/performance.md``). Refused when a
        selected tensor shares memory with another leaf.
      bucket_bytes: stage at most this many bytes at a time (two buffers of
        half the size, one packed while the other is reduced).
      comm_dtype: the dtype the Reduce sees (``torch.bfloat16`` halves the
        bytes on the wire); results are cast back to each leaf's dtype.
      nonfinite: ``"raise"`` (default), ``"exclude"`` or ``"ignore"``: what to
        do when a replica's selected leaves hold NaN or infinity. Except with
        ``"ignore"``, the replicas first exchange one small health flag
        through ``reduce`` (see ``docs/failures.md``).

    Returns:
      A new params tree with the selected leaves averaged.

    Raises:
      NonFiniteError: a replica holds non-finite values (``nonfinite="raise"``).
      ValueError: a ``where`` tree that does not match ``params``, or a
        donation of tensors that share memory.
      TypeError: a selected leaf that is not a tensor, or a ``where`` that
        yields something other than a bool.

    Examples:
      >>> import torch, avgfn
      >>> params = {"w": torch.tensor([1.0, 3.0]), "step": 7}
      >>> peer = {"w": torch.tensor([3.0, 5.0]), "step": 7}
      >>> reduce = avgfn.testing.peers_mean(peer["w"])   # as if one peer held these
      >>> avgfn.average(params, reduce)
      {'w': tensor([2., 4.]), 'step': 7}
      >>> out = avgfn.average(params, lambda t: t, donate=True)  # reduced in place
      >>> out["w"] is params["w"]
      True
    """
    _select.check_where(where)
    wire = _wire.make_wire(donate, bucket_bytes, comm_dtype)
    return average_tree(params, reduce, where, wire, None, _health.check_policy(nonfinite))[0]


class Averaging:
    """What an averager does at a due step: its ``where`` and wire options.

    Shared by :func:`avgfn.periodic` and :func:`avgfn.hierarchical` (and any
    averager that averages params the same way). Validates at construction.
    """

    __slots__ = ("where", "wire", "error_feedback", "nonfinite")

    def __init__(
        self,
        where: _select.Where = None,
        donate: bool = False,
        bucket_bytes: int | None = None,
        comm_dtype: torch.dtype | None = None,
        error_feedback: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        _select.check_where(where)
        self.nonfinite = _health.check_policy(nonfinite)
        self.where = where
        self.wire = _wire.make_wire(donate, bucket_bytes, comm_dtype)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {error_feedback!r}")
        if error_feedback and comm_dtype is None:
            raise ValueError("error_feedback=True needs a comm_dtype (e.g. torch.bfloat16)")
        self.error_feedback = error_feedback

    def init_residual(self, params: Params) -> Any:
        """The error-feedback residual to keep in the state (``None`` without it)."""
        if not self.error_feedback:
            return None
        return tuple(
            torch.zeros_like(leaf, dtype=torch.promote_types(leaf.dtype, torch.float32))
            for leaf in _tree.tree_leaves(params)
            if _select.default_selected(leaf)
        )

    def __call__(
        self, params: Params, reduce: Reduce, residual: Any, step: int | None = None
    ) -> tuple[Params, Any]:
        """Average ``params`` with ``reduce``; errors of the round name ``step``."""
        try:
            return average_tree(params, reduce, self.where, self.wire, residual, self.nonfinite)
        except AveragingError as error:
            if step is None:
                raise
            raise error.at_step(step) from error
