"""The inner optimizer's state at a sync: keep it, average it, or reset it.

An averager only sees params. When it synchronizes them (periodic averaging,
a DiLoCo outer step, a Streaming DiLoCo fragment), the inner optimizer's
state (momentum buffers, Adam moments) was built on the local trajectory.
[`sync_inner_state()`][avgfn.sync_inner_state] applies one of three policies to it, leaf by leaf,
for exactly the leaves the averager changed; [`with_inner_state()`][avgfn.with_inner_state] is
[`avgfn.with_averaging()`][avgfn.with_averaging] with that policy applied after each sync.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from avgfn._core import tree as _tree
from avgfn._round.engine import average_tree
from avgfn._round.options import Round

_INNER_ROUND = Round(nonfinite="ignore", agree=False)
"""The optimizer state is averaged as it is: its agreement is the params' round's."""
from avgfn._core.types import Averager, Params, Reduce
from avgfn._core.checks import check_reduce
from avgfn._training.compose import AveragingState, AveragingUpdate, Skip, with_averaging
from avgfn._algorithms.post_local import GradientSchedule, PostLocalSGD, unpack
from avgfn.optim._base import Optimizer

__all__ = ["INNER_STATE_POLICIES", "sync_inner_state", "with_inner_state"]

INNER_STATE_POLICIES = ("keep", "average", "reset")


def check_policy(policy: Any, reduce: Optional[Reduce], optimizer: Optional[Optimizer]) -> str:
    """Validate a policy and what it needs (a Reduce to average, an optimizer to reset)."""
    if policy not in INNER_STATE_POLICIES:
        raise ValueError(f"inner_state must be one of {list(INNER_STATE_POLICIES)}, got {policy!r}")
    if policy == "average":
        if reduce is None:
            raise ValueError("inner_state='average' needs reduce= (the Reduce to average the state with)")
        check_reduce("reduce", reduce)
    if policy == "reset" and not isinstance(optimizer, Optimizer):
        raise TypeError(
            "inner_state='reset' needs optimizer= (the avgfn.optim.Optimizer whose init gives the "
            f"fresh state), got {optimizer!r}"
        )
    return policy


def _params_like(spec: Any, params_leaves: list[Any]) -> Any:
    """``is_leaf`` for the optimizer state: true on the subtrees shaped like params."""
    if _tree.is_leaf_spec(spec):
        (only,) = params_leaves
        shape = getattr(only, "shape", None)
        return lambda node: isinstance(node, torch.Tensor) and node.shape == shape and node.dim() > 0

    def is_params_like(node: Any) -> bool:
        if isinstance(node, torch.Tensor) or node is None:
            return False
        return _tree.tree_flatten(node)[1] == spec

    return is_params_like


def sync_inner_state(
    opt_state: Any,
    before: Params,
    after: Params,
    *,
    policy: str,
    reduce: Optional[Reduce] = None,
    optimizer: Optional[Optimizer] = None,
) -> Any:
    """Apply an inner-state policy to the leaves an averager synchronized.

    ``before`` is what the averager was handed, ``after`` what it returned;
    a leaf of ``after`` that is not the very object of ``before`` was
    synchronized (averagers return untouched leaves as the same objects). The
    parts of ``opt_state`` shaped like the params (momentum buffers, ``exp_avg``,
    ``exp_avg_sq``...) are then changed for those leaves only:

    * ``"keep"``: nothing changes (torchft's and the DiLoCo paper's choice: the
      inner AdamW state persists across rounds).
    * ``"average"``: they are averaged over the group with ``reduce`` (one
      [`avgfn.average()`][avgfn.average] round), so every replica continues from the same
      inner state.
    * ``"reset"``: they are replaced by those of ``optimizer.init(after)``.
      Other leaves of the state (step counters) are reset too only when every
      leaf of the params was synchronized, so a fragment sync (Streaming
      DiLoCo) does not restart the bias correction of the others.

    Nothing is done (and no Reduce is called) when no leaf was synchronized.
    Pure: ``opt_state`` is not modified. Works under ``vmap``.

    Args:
      opt_state: the inner optimizer's state.
      before: the params given to the averager.
      after: the params it returned.
      policy: ``"keep"``, ``"average"`` or ``"reset"``.
      reduce: the Reduce for ``"average"`` (usually the averager's own).
      optimizer: the inner optimizer, for ``"reset"``.

    Returns:
      The new optimizer state.

    Raises:
      ValueError: an unknown policy, ``"average"`` without ``reduce``, or
        ``before`` and ``after`` of different structures.
      TypeError: ``"reset"`` without an optimizer.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.sgd(0.1, momentum=0.9)
      >>> before = {"a": torch.ones(2), "b": torch.ones(2)}
      >>> state = opt.init(before)
      >>> _, state = opt.update(before, state, before)       # buffers now hold the grads
      >>> after = {"a": torch.zeros(2), "b": before["b"]}    # only "a" was synchronized
      >>> new = avgfn.sync_inner_state(state, before, after, policy="reset", optimizer=opt)
      >>> new.momentum_buffer["a"], new.momentum_buffer["b"], int(new.step)
      (tensor([0., 0.]), tensor([1., 1.]), 1)
    """
    policy = check_policy(policy, reduce, optimizer)
    if policy == "keep" or after is before:
        return opt_state
    b_leaves, spec = _tree.tree_flatten(before)
    a_leaves, a_spec = _tree.tree_flatten(after)
    if a_spec != spec:
        raise ValueError(
            f"sync_inner_state: before and after have different structures: {spec} and {a_spec}"
        )
    synced = [a is not b for a, b in zip(a_leaves, b_leaves)]
    if not any(synced):
        return opt_state
    is_params_like = _params_like(spec, a_leaves)
    nodes, node_spec = _tree.tree_flatten(opt_state, is_leaf=is_params_like)
    fresh_nodes: list[Any] = []
    if policy == "reset":
        assert optimizer is not None  # check_policy refuses "reset" without an optimizer
        fresh = optimizer.init(after)
        fresh_nodes, fresh_spec = _tree.tree_flatten(fresh, is_leaf=is_params_like)
        if fresh_spec != node_spec:
            raise ValueError(
                "sync_inner_state: optimizer.init(after) does not have the structure of opt_state "
                "(is it the optimizer that made the state?)"
            )
    whole = all(synced)
    out = []
    for k, node in enumerate(nodes):
        if not is_params_like(node):
            out.append(fresh_nodes[k] if policy == "reset" and whole else node)
            continue
        leaves, leaf_spec = _tree.tree_flatten(node)
        new = list(leaves)
        if policy == "reset":
            fresh = _tree.tree_flatten(fresh_nodes[k])[0]
            for i, flag in enumerate(synced):
                if flag:
                    new[i] = fresh[i]
        else:
            assert reduce is not None  # check_policy refuses "average" without a Reduce
            chosen = [i for i, flag in enumerate(synced) if flag and isinstance(leaves[i], torch.Tensor)]
            means, _ = average_tree(
                tuple(leaves[i] for i in chosen), reduce, None, _INNER_ROUND, what="optimizer state"
            )
            for i, value in zip(chosen, means):
                new[i] = value
        out.append(_tree.tree_unflatten(new, leaf_spec))
    return _tree.tree_unflatten(out, node_spec)


def _nothing() -> Averager:
    return Averager(init=lambda params: None, update=lambda params, state, step: (params, state))


def with_inner_state(
    optimizer: Optimizer,
    averager: Union[Averager, PostLocalSGD],
    inner_state: str,
    *,
    reduce: Optional[Reduce] = None,
    gradients: Optional[GradientSchedule] = None,
) -> AveragingUpdate:
    """[`avgfn.with_averaging()`][avgfn.with_averaging], with an inner-state policy after each sync.

    ``update(grads, state, params, step, *, skip=False)`` runs the gradient
    schedule, the inner optimizer and the averager exactly as
    [`avgfn.with_averaging()`][avgfn.with_averaging] does, then
    ``sync_inner_state(..., policy=inner_state)`` on the leaves the averager
    changed. The state is an `avgfn.AveragingState`, laid out as
    ``with_averaging``'s.

    Args:
      optimizer: the inner [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer].
      averager: an [`avgfn.Averager`][avgfn.Averager] (or [`avgfn.PostLocalSGD`][avgfn.PostLocalSGD]).
      inner_state: ``"keep"``, ``"average"`` or ``"reset"`` (see
        [`sync_inner_state()`][avgfn.sync_inner_state]).
      reduce: the Reduce for ``"average"``.
      gradients: a gradient schedule, as for [`avgfn.with_averaging()`][avgfn.with_averaging].

    Returns:
      An [`avgfn.AveragingUpdate`][avgfn.AveragingUpdate].

    Raises:
      ValueError, TypeError: a bad policy or argument (see
        [`sync_inner_state()`][avgfn.sync_inner_state] and [`avgfn.with_averaging()`][avgfn.with_averaging]).

    Examples:
      >>> import torch, avgfn
      >>> avg = avgfn.diloco(2, reduce=lambda t: t, outer_optimizer=avgfn.optim.sgd(1.0))
      >>> train = avgfn.with_inner_state(avgfn.optim.adamw(0.1), avg, "reset")
      >>> params = {"w": torch.tensor([1.0])}
      >>> state = train.init(params)
      >>> for step in range(2):
      ...     params, state = train.update({"w": torch.tensor([1.0])}, state, params, step)
      >>> int(state.optimizer.step), state.optimizer.exp_avg["w"]   # reset at the sync (step 1)
      (0, tensor([0.]))
    """
    averager, gradients = unpack(averager, gradients, "with_inner_state")
    if not isinstance(averager, Averager):
        raise TypeError(
            "with_inner_state: averager must be an avgfn.Averager or an avgfn.PostLocalSGD, "
            f"got {type(averager).__name__}"
        )
    check_policy(inner_state, reduce, optimizer if inner_state == "reset" else None)
    local = with_averaging(optimizer, _nothing(), gradients=gradients)

    def init(params: Params) -> AveragingState:
        return local.init(params).replace(averager=averager.init(params))

    def update(
        grads: Params, state: AveragingState, params: Params, step: int, *, skip: Skip = False
    ) -> tuple[Params, AveragingState]:
        if not isinstance(state, AveragingState):
            raise TypeError(
                f"state must be an AveragingState made by with_inner_state(...).init, got "
                f"{type(state).__name__}"
            )
        stepped, inner = local.update(grads, state.replace(averager=None), params, step, skip=skip)
        new_params, a_state = averager.update(stepped, state.averager, step)
        o_state = sync_inner_state(
            inner.optimizer, stepped, new_params, policy=inner_state, reduce=reduce, optimizer=optimizer
        )
        return new_params, AveragingState(inner.gradients, o_state, a_state)

    return AveragingUpdate(init=init, update=update)
