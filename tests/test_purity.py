"""Purity of the averagers on random trees (hypothesis)."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import avgfn
from avgfn.testing import RecordingReduce, raising_reduce

# The random trees of the fault properties: any dtype, non-contiguous and
# autograd leaves, shared views, None and other non-tensor leaves.
from test_fault_properties import _assert_unchanged as _unchanged
from test_fault_properties import _snapshot, trees

REDUCES = {
    "identity": lambda: RecordingReduce(),
    "writes_into_argument": lambda: RecordingReduce(lambda t: t.mul_(2).add_(1)),
    "new_tensor": lambda: RecordingReduce(lambda t: t * 0.5 - 1),
    "raises": lambda: raising_reduce(),
    "raises_on_second_call": lambda: raising_reduce(after=1),
}


def _assert_unchanged(tree, snap):
    _unchanged(tree, snap, "update")


def _make(kind, reduce, where):
    if kind == "periodic":
        return avgfn.periodic(3, reduce=reduce, warmup_steps=1, where=where)
    return avgfn.hierarchical([(2, reduce), (4, reduce)], warmup_steps=1, where=where)


WHERES = {
    "default": None,
    "callable": lambda leaf: isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel() > 1,
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=trees,
    kind=st.sampled_from(["periodic", "hierarchical"]),
    reduce_name=st.sampled_from(sorted(REDUCES)),
    where_name=st.sampled_from(sorted(WHERES)),
    step=st.integers(0, 12),
)
def test_update_is_pure(params, kind, reduce_name, where_name, step):
    reduce = REDUCES[reduce_name]()
    where = WHERES[where_name]
    avg = _make(kind, reduce, where)
    state = avg.init(params)
    snap, state_snap = _snapshot(params), _snapshot(state)
    try:
        new, new_state = avg.update(params, state, step)
    except RuntimeError as e:
        assert "fake reduce failure" in str(e)
        _assert_unchanged(params, snap)
        _assert_unchanged(state, state_snap)
        return
    _assert_unchanged(params, snap)
    _assert_unchanged(state, state_snap)
    due = step >= 1 and (((step - 1) % 3 == 0) if kind == "periodic" else step % 2 == 0)
    calls = getattr(reduce, "calls", None)
    if not due:
        assert new is params and new_state is state
        assert calls in (None, 0)
        return
    flat, spec = pytree.tree_flatten(params)
    new_flat, new_spec = pytree.tree_flatten(new)
    assert new_spec == spec
    pick = where or (lambda leaf: isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
    selected = [pick(x) for x in flat]
    if calls is not None:
        assert calls == (1 if any(selected) else 0)
    for x, y, chosen in zip(flat, new_flat, selected):
        if not chosen:
            assert y is x
        else:
            assert y is not x and isinstance(y, torch.Tensor)
            assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
            assert y.requires_grad == x.requires_grad
    # state structure is stable across steps
    assert pytree.tree_flatten(new_state)[1] == pytree.tree_flatten(state)[1]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=trees)
def test_group_of_one_is_identity_in_value(params):
    new = avgfn.average(params, lambda t: t)
    for x, y in zip(pytree.tree_leaves(params), pytree.tree_leaves(new)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x.detach(), y.detach())
        else:
            assert x == y
