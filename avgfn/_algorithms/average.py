"""One averaging of a params tree: torch's ``average_parameters``, made pure."""

from __future__ import annotations

from typing import Any, Optional

from avgfn._core import select as _select
from avgfn._core import tree as _tree
from avgfn._core.checks import check_has_tensor, check_params
from avgfn._core.types import Params, Reduce
from avgfn._round.engine import average_tree, refusing
from avgfn._round.options import Round, round_options


def average(
    params: Params,
    reduce: Reduce,
    *,
    where: _select.Where = None,
    round: Optional[Round] = None,
    **deprecated: Any,
) -> Params:
    """Average the selected leaves of ``params`` over a group, once.

    The pure twin of torch's
    ``torch.distributed.algorithms.model_averaging.utils.average_parameters``:
    the selected leaves are flattened into one buffer of their promoted dtype
    (as ``torch.cat`` does), handed to ``reduce``, and split back. Each leaf
    keeps its dtype, shape and device; unselected leaves come back as the same
    objects; the inputs are never modified (unless ``round`` donates them).

    Args:
      params: a pytree of tensors (other leaves pass through unless selected).
        An iterator such as ``model.parameters()`` is refused.
      reduce: the mean over the group (see [`avgfn.Reduce`][avgfn.Reduce]);
        ``avgfn.collectives.all_reduce_mean()`` on a process group,
        ``avgfn.simulate.replica_mean()`` under ``vmap``.
      where: ``None`` (every floating-point tensor), a callable ``leaf -> bool``
        (torch's own filter is ``lambda p: p.grad is not None``), or a pytree
        of bools shaped like ``params``.
      round: the [`avgfn.Round`][avgfn.Round] options (donation, buckets, wire dtype,
        ``nonfinite`` in ``"raise"``, ``"skip"``, ``"exclude"``, ``"ignore"``,
        the agreement check). ``error_feedback`` needs a state: use
        [`avgfn.periodic()`][avgfn.periodic] for it.
      **deprecated: the same options as keywords (``donate=True``...), their
        spelling before [`avgfn.Round`][avgfn.Round]; they warn.

    Returns:
      A new params tree with the selected leaves averaged.

    Raises:
      NonFiniteError: a replica holds non-finite values (``nonfinite="raise"``).
      ReplicaMismatchError: the replicas do not average the same leaves.
      ValueError: a ``where`` tree that does not match ``params``, or a
        donation of tensors that share memory.
      TypeError: an iterator for ``params``, a tree with no tensor, a selected
        leaf that is not a tensor, a ``where`` that yields something other than
        a bool, a Reduce result of another dtype or device.

    Examples:
      >>> import torch, avgfn
      >>> params = {"w": torch.tensor([1.0, 3.0]), "step": 7}
      >>> peer = {"w": torch.tensor([3.0, 5.0]), "step": 7}
      >>> reduce = avgfn.testing.peers_mean(peer["w"])   # as if one peer held these
      >>> avgfn.average(params, reduce)
      {'w': tensor([2., 4.]), 'step': 7}
      >>> out = avgfn.average(params, lambda t: t, round=avgfn.Round(donate=True))
      >>> out["w"] is params["w"]                         # reduced in place
      True
    """
    rnd = round_options(
        "average", round, deprecated, nonfinite=("raise", "skip", "exclude", "ignore"),
        allowed=("donate", "bucket_bytes", "comm_dtype", "nonfinite", "verify", "agree"),
    )  # fmt: skip
    with refusing(reduce, rnd.agree, None):  # the peers are in the round: they learn of it at once
        _select.check_where(where)
        check_params(params, "average")
        check_has_tensor(_tree.tree_leaves(params), "average")
    return average_tree(params, reduce, where, rnd, what="params of average")[0]
