"""Purity and no partial updates, for every averager of the package, whatever the Reduce does.

Hypothesis draws the params (nested containers of tensors of every dtype,
empty and 0-d tensors, views that share storage, Python scalars), the
averager and its periods, the steps, and what the Reduce does: answer its
input, write into its argument, answer a new tensor, answer NaN, or raise on
its first, second or third call (a peer that dies part-way through a round
that makes several calls: health flags, weights, buckets). Whatever happens,
``update`` either returns or raises, and in both cases the params and state it
was given hold the same objects with the same bits.

The averagers are those of ``tests/test_conformance.py``'s registry (each one
must have a factory here, so an averager added there is covered here too)
plus the fast-path and non-finite options of the core averagers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import avgfn
from avgfn import optim
from avgfn import chain
from avgfn import diloco
from avgfn import slowmo
from avgfn import streaming_diloco
from avgfn import ema, swa
from avgfn import fedavg, fedavgm, weighted
from avgfn.testing import RecordingReduce, raising_reduce
from test_conformance import REGISTRY

# --- the averagers: name -> (reduce, period, warmup) -> Averager ---------------------------

Make = Callable[[Any, int, int], avgfn.Averager]

FACTORIES: dict[str, Make] = {
    "periodic": lambda r, p, w: avgfn.periodic(p, reduce=r, warmup_steps=w),
    "periodic_buckets": lambda r, p, w: avgfn.periodic(p, reduce=r, warmup_steps=w, round=avgfn.Round(bucket_bytes=32)),
    "periodic_bf16_feedback": lambda r, p, w: avgfn.periodic(
        p, reduce=r, round=avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True), 
    ),
    "periodic_exclude": lambda r, p, w: avgfn.periodic(p, reduce=r, round=avgfn.Round(nonfinite="exclude")),
    "periodic_ignore": lambda r, p, w: avgfn.periodic(p, reduce=r, round=avgfn.Round(nonfinite="ignore")),
    "hierarchical": lambda r, p, w: avgfn.hierarchical([(p, r), (2 * p, r)], warmup_steps=w),
    "hierarchical_exclude_buckets": lambda r, p, w: avgfn.hierarchical(
        [(p, r), (3 * p, r)], round=avgfn.Round(nonfinite="exclude", bucket_bytes=48), 
    ),
    "post_local_sgd": lambda r, p, w: avgfn.post_local_sgd(
        w, global_reduce=r, local_reduce=None, period=p
    ).averager,
    "diloco": lambda r, p, w: diloco(p, reduce=r),
    "diloco_adamw": lambda r, p, w: diloco(p, reduce=r, outer_optimizer=optim.adamw(0.05)),
    "diloco_sgd1": lambda r, p, w: diloco(p, reduce=r, outer_optimizer=optim.sgd(1.0)),
    "diloco_exclude_buckets": lambda r, p, w: diloco(p, reduce=r, round=avgfn.Round(nonfinite="exclude", bucket_bytes=32)),
    "diloco_skip": lambda r, p, w: diloco(p, reduce=r, round=avgfn.Round(nonfinite="skip")),
    "streaming": lambda r, p, w: streaming_diloco(2 * p, reduce=r, num_fragments=2, delay=1, alpha=0.5),
    "streaming_sgd1": lambda r, p, w: streaming_diloco(
        2 * p, reduce=r, num_fragments=2, outer_optimizer=optim.sgd(1.0)
    ),
    "slowmo": lambda r, p, w: slowmo(2 * p, reduce=r, lr=0.1, momentum=0.5, base_period=p),
    "weighted": lambda r, p, w: weighted(p, reduce=r, weight=2.0, warmup_steps=w),
    "weighted_ignore_skip": lambda r, p, w: weighted(
        p, reduce=r, weight=2.0, round=avgfn.Round(nonfinite="ignore"), invalid_weights="skip"
    ),
    "fedavg": lambda r, p, w: fedavg(p, reduce=r, weight=lambda params, step: 3),
    "fedavgm": lambda r, p, w: fedavgm(p, reduce=r, weight=1.5, server_lr=0.8, server_momentum=0.5),
    "ema": lambda r, p, w: ema(0.8, start=w, every=p),
    "swa": lambda r, p, w: swa(start=w, every=p),
    "chain_diloco_ema": lambda r, p, w: chain(diloco(p, reduce=r), ema(0.9)),
    "overlapped": lambda r, p, w: avgfn.overlapped_diloco(p, reduce=r, num_replicas=1),
    "overlapped_delayed": lambda r, p, w: avgfn.overlapped_diloco(p, reduce=r, eager=False),
}
NAMES = sorted(FACTORIES)
# FAULT_EXAMPLES=3000 for a longer search than CI's.
EXAMPLES = int(os.environ.get("FAULT_EXAMPLES", "250"))

# Averagers with a known bug, reported to the lead: out of the random search,
# expected to fail (strictly) in the fixed cases until fixed.
KNOWN_BUGS: dict[str, str] = {}
SEARCHED = [name for name in NAMES if name not in KNOWN_BUGS]


def test_every_registered_averager_is_covered():
    missing = sorted(set(REGISTRY) - set(FACTORIES))
    assert not missing, f"averagers of the conformance registry without a factory here: {missing}"


# --- what the Reduce does ---------------------------------------------------------------

REDUCES: dict[str, Callable[[], Any]] = {
    "identity": lambda: RecordingReduce(),
    "writes_into_argument": lambda: RecordingReduce(lambda t: t.mul_(2).add_(1)),
    "new_tensor": lambda: RecordingReduce(lambda t: t * 0.5 - 1),
    "answers_nan": lambda: RecordingReduce(lambda t: t * math.nan),
    "raises_at_first_call": lambda: raising_reduce(),
    "raises_at_second_call": lambda: raising_reduce(after=1),
    "raises_at_third_call": lambda: raising_reduce(after=2),
}

# --- the params ----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    seed = draw(st.integers(0, 2**16))
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # not contiguous
    if dtype.is_floating_point and draw(st.booleans()):
        t = t.requires_grad_()
    return t


@st.composite
def shared_views(draw):
    """Two leaves that are views of one storage."""
    base = torch.randn(2, 3, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return [base[0], base[1]]


leaves = st.one_of(tensors(), tensors(), tensors(), st.integers(-5, 5), st.just("tag"), st.just(None))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcde"), children, max_size=3),
        shared_views(),
    ),
    max_leaves=8,
).filter(lambda tree: any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(tree)))
"""Params trees of any shape with at least one tensor (a tree without one is refused)."""


def _snapshot(tree: Any) -> list[tuple[int, Any]]:
    out = []
    for leaf in pytree.tree_leaves(tree):
        out.append((id(leaf), leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf))
    return out


def _assert_unchanged(tree: Any, snapshot: list[tuple[int, Any]], what: str) -> None:
    flat = pytree.tree_leaves(tree)
    assert len(flat) == len(snapshot), what
    for leaf, (ident, copy) in zip(flat, snapshot):
        assert id(leaf) == ident, f"{what}: a leaf was replaced"
        if isinstance(leaf, torch.Tensor):
            assert leaf.dtype == copy.dtype and leaf.shape == copy.shape, what
            same = torch.equal(leaf.detach(), copy) or torch.equal(
                torch.nan_to_num(leaf.detach().float(), nan=7.0), torch.nan_to_num(copy.float(), nan=7.0)
            )
            assert same, f"{what}: a tensor's values changed"
        else:
            assert leaf == copy, what


def _assert_like(new: Any, old: Any, what: str) -> None:
    """The returned params have the input's structure, dtypes and shapes."""
    new_leaves, new_spec = pytree.tree_flatten(new)
    old_leaves, old_spec = pytree.tree_flatten(old)
    assert new_spec == old_spec, what
    for a, b in zip(new_leaves, old_leaves):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        else:
            assert a is b or a == b, what


def _check_error(reduce_name: str, error: Exception) -> None:
    """An update may fail only for a reason the Reduce gave it, and say so."""
    if reduce_name.startswith("raises"):
        if "fake reduce failure" not in str(error):
            raise error
    elif reduce_name == "identity":
        raise error  # a group of one never makes an update fail
    elif not isinstance(error, (avgfn.AveragingError, ValueError)):
        # A Reduce that answers NaN, or nonsense for the health flags or the
        # weights, may be refused with a clear error; never with a crash.
        raise error


def _run(name: str, params: Any, reduce_name: str, period: int, warmup: int, steps: list[int]) -> None:
    reduce = REDUCES[reduce_name]()
    avg = FACTORIES[name](reduce, period, warmup)
    snapshot_params = _snapshot(params)
    try:
        state = avg.init(params)
    except (TypeError, ValueError) as error:
        # A documented refusal (too few leaves for the fragments of streaming DiLoCo...).
        event(f"init refused: {type(error).__name__}")
        _assert_unchanged(params, snapshot_params, "a refused init changed the params")
        return
    _assert_unchanged(params, snapshot_params, "init changed the params")
    for step in steps:
        before_params, before_state = _snapshot(params), _snapshot(state)
        try:
            new_params, new_state = avg.update(params, state, step)
        except Exception as error:
            event(f"update raised {type(error).__name__}")
            _check_error(reduce_name, error)
            _assert_unchanged(params, before_params, f"{name}: params after a failed update")
            _assert_unchanged(state, before_state, f"{name}: state after a failed update")
            return  # the caller keeps what it had; nothing more to check
        _assert_unchanged(params, before_params, f"{name}: params after an update")
        _assert_unchanged(state, before_state, f"{name}: state after an update")
        _assert_like(new_params, params, f"{name}: the returned params")
        assert pytree.tree_structure(new_state) == pytree.tree_structure(state), name
        params, state = new_params, new_state
    event("every update returned")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=trees,
    name=st.sampled_from(SEARCHED),
    reduce_name=st.sampled_from(sorted(REDUCES)),
    period=st.integers(2, 4),
    warmup=st.integers(0, 3),
    steps=st.lists(st.integers(0, 12), min_size=1, max_size=5, unique=True).map(sorted),
)
def test_update_is_pure_and_all_or_nothing(params, name, reduce_name, period, warmup, steps):
    _run(name, params, reduce_name, period, warmup, steps)


# --- the same, on a fixed tree at a due step, so that every pair surely raises or returns ---------


def _fixed_params() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 5, generator=g)
    return {
        "w": torch.randn(4, 3, generator=g).requires_grad_(),
        "views": [base[0], base[1]],
        "h": torch.randn(6, generator=g).to(torch.bfloat16),
        "d": torch.randn(3, generator=g, dtype=torch.float64),
        "count": torch.tensor(5),
        "tag": "fixed",
    }


@pytest.mark.parametrize("reduce_name", [n for n in sorted(REDUCES) if n.startswith("raises")])
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_BUGS[n], strict=True)) if n in KNOWN_BUGS else n
        for n in NAMES
    ],
)
def test_a_reduce_that_dies_part_way_changes_nothing(name, reduce_name):
    """Every averager that communicates, every step 0..11: the failure surfaces, nothing changed."""
    params = _fixed_params()
    reduce = REDUCES[reduce_name]()
    avg = FACTORIES[name](reduce, 2, 1)
    state = avg.init(params)
    failed = False
    for step in range(12):
        before_params, before_state = _snapshot(params), _snapshot(state)
        try:
            params, state = avg.update(params, state, step)
        except RuntimeError as error:
            assert "fake reduce failure" in str(error)
            _assert_unchanged(params, before_params, f"{name} at step {step}")
            _assert_unchanged(state, before_state, f"{name} at step {step}")
            failed = True
            break
    assert failed == (name not in ("ema", "swa")), (name, failed)  # those two never communicate
