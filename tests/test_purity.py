"""Purity of the averagers on random trees (hypothesis)."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import avgfn
from avgfn.testing import RecordingReduce, raising_reduce

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    t = t.to(dtype)
    if draw(st.booleans()) and dtype.is_floating_point:
        t = t.requires_grad_()
    return t


leaves = st.one_of(tensors(), tensors(), st.integers(-5, 5), st.just("tag"))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcde"), children, max_size=3),
    ),
    max_leaves=8,
)

REDUCES = {
    "identity": lambda: RecordingReduce(),
    "writes_into_argument": lambda: RecordingReduce(lambda t: t.mul_(2).add_(1)),
    "new_tensor": lambda: RecordingReduce(lambda t: t * 0.5 - 1),
    "raises": lambda: raising_reduce(),
    "raises_on_second_call": lambda: raising_reduce(after=1),
}


def _snapshot(tree):
    flat, _ = pytree.tree_flatten(tree)
    return [(id(x), x.detach().clone() if isinstance(x, torch.Tensor) else x) for x in flat]


def _assert_unchanged(tree, snap):
    flat, _ = pytree.tree_flatten(tree)
    assert len(flat) == len(snap)
    for x, (ident, copy) in zip(flat, snap):
        assert id(x) == ident
        if isinstance(x, torch.Tensor):
            assert x.dtype == copy.dtype and x.shape == copy.shape
            assert torch.equal(x.detach(), copy) or (copy.isnan().any() and torch.equal(x.isnan(), copy.isnan()))
        else:
            assert x == copy


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
