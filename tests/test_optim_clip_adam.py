"""clip_grad_norm / clip_by_global_norm against torch.nn.utils.clip_grad_norm_, adam against
torch.optim.Adam, and Nesterov SGD with weight decay against torch.optim.SGD: equal bits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree

from _optim_oracle import run_against_torch
import avgfn
import avgfn.optim as optim

# Sizes that exercise both the vectorized body and the scalar tail of torch's kernels.
SHAPES = {"w": (5, 7), "b": (37,), "s": ()}


def _tree(seed, dtypes=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or {}
    return {
        k: torch.randn(s, generator=g, dtype=dtypes.get(k, torch.float32)) * scale
        for k, s in SHAPES.items()
    }


def _grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    # Magnitudes spread over four decades, so clipping is sometimes active, sometimes not.
    scale = 10.0 ** ((step % 5) - 2)
    return {k: torch.randn(s, generator=g, dtype=dtype) * scale for k, s in SHAPES.items()}


def _torch_clip(grads, max_norm, **kwargs):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, **kwargs)
    return [p.grad for p in params], total


# --- clip_grad_norm against torch.nn.utils.clip_grad_norm_ ---

@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 0.5, 1.0, 7.3, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False], ids=["foreach_default", "foreach_off"])
def test_clip_grad_norm_matches_torch_exactly(max_norm, norm_type, foreach):
    for seed in range(4):
        grads = _tree(seed, scale=10.0 ** (seed - 2))
        before = {k: v.clone() for k, v in grads.items()}
        clipped, total = optim.clip_grad_norm(grads, max_norm, norm_type=norm_type)
        expected, expected_total = _torch_clip(grads, max_norm, norm_type=norm_type, foreach=foreach)
        assert torch.equal(total, expected_total) and total.dtype == expected_total.dtype
        for (k, got), want in zip(clipped.items(), expected):
            assert got.dtype == want.dtype and torch.equal(got, want), k
        assert all(torch.equal(grads[k], before[k]) for k in grads), "grads were modified"


@pytest.mark.parametrize(
    "dtypes",
    [
        {"b": torch.float64},
        {"w": torch.float64, "s": torch.float64},
        {"w": torch.float64, "b": torch.float16},
        {"s": torch.float16},
    ],
    ids=repr,
)
def test_clip_grad_norm_mixed_dtypes_matches_torch_exactly(dtypes):
    # torch sums the per-tensor norms group by group, in its own order of
    # (device, dtype) groups, not in the order of the leaves: the bits differ.
    for seed in range(12):
        grads = _tree(seed, dtypes, scale=3.0)
        clipped, total = optim.clip_grad_norm(grads, 1.0)
        expected, expected_total = _torch_clip(grads, 1.0)
        assert total.dtype == expected_total.dtype and torch.equal(total, expected_total)
        for (k, got), want in zip(clipped.items(), expected):
            assert got.dtype == want.dtype and torch.equal(got, want), k


def test_clip_grad_norm_skips_missing_grads_and_empty_trees():
    grads = {"a": torch.tensor([3.0, 4.0]), "frozen": None, "b": [torch.tensor(12.0)]}
    clipped, total = optim.clip_grad_norm(grads, 1.0)
    assert clipped["frozen"] is None
    expected, expected_total = _torch_clip({"a": grads["a"], "b": grads["b"][0]}, 1.0)
    assert torch.equal(total, expected_total)
    assert torch.equal(clipped["a"], expected[0]) and torch.equal(clipped["b"][0], expected[1])
    empty, norm = optim.clip_grad_norm({}, 1.0)
    assert empty == {} and torch.equal(norm, torch.tensor(0.0))


def test_clip_grad_norm_nonfinite_scales_like_torch():
    grads = {"a": torch.tensor([1.0, float("inf")]), "b": torch.tensor([2.0])}
    clipped, total = optim.clip_grad_norm(grads, 1.0)
    expected, expected_total = _torch_clip(grads, 1.0)
    assert torch.equal(total, expected_total)
    for got, want in zip(clipped.values(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_clip_grad_norm_under_vmap_equals_per_replica():
    replicas = 5
    g = torch.Generator().manual_seed(3)
    stacked = {
        "a": torch.randn(replicas, 1001, generator=g),
        "b": torch.randn(replicas, 4, 5, generator=g)
        * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]).view(-1, 1, 1),
    }
    stacked["c"] = torch.randn(replicas, 9, generator=g, dtype=torch.float64)
    clipped, totals = torch.func.vmap(lambda t: optim.clip_grad_norm(t, 2.0))(stacked)
    for i in range(replicas):
        single, total = optim.clip_grad_norm({k: v[i] for k, v in stacked.items()}, 2.0)
        expected, expected_total = _torch_clip({k: v[i] for k, v in stacked.items()}, 2.0)
        assert torch.equal(totals[i], total) and torch.equal(total, expected_total)
        for k, want in zip(stacked, expected):
            assert torch.equal(clipped[k][i], single[k]) and torch.equal(single[k], want)


# --- clip_by_global_norm before an optimizer, against clip_grad_norm_ + torch.optim ---

def _run_clipped(torch_cls, kwargs, ours, max_norm, steps, norm_type=2.0, dtype=torch.float32):
    return run_against_torch(
        lambda ps: torch_cls(ps, **kwargs), ours, _tree(1234, {k: dtype for k in SHAPES}),
        lambda step: _grads(step, dtype), steps,
        before_step=lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type=norm_type),
    )  # fmt: skip


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip_then_adamw_matches_torch_exactly(max_norm, dtype):
    ours = optim.clip_by_global_norm(max_norm, optim.adamw(0.01, weight_decay=0.1))
    state = _run_clipped(
        torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, ours, max_norm, 100, dtype=dtype
    )
    assert isinstance(state, optim.AdamWState) and int(state.step) == 100


def test_clip_then_sgd_and_adam_match_torch_exactly():
    _run_clipped(
        torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        optim.clip_by_global_norm(0.5, optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        0.5, 60,
    )
    _run_clipped(
        torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2, "amsgrad": True},
        optim.clip_by_global_norm(
            0.3, optim.adam(0.01, weight_decay=1e-2, amsgrad=True), norm_type=math.inf
        ),
        0.3, 60, norm_type=math.inf,
    )


def test_clip_by_global_norm_keeps_the_inner_state_and_checkpoints():
    inner = optim.adamw(0.01)
    clipped = optim.clip_by_global_norm(1.0, inner)
    params = {"w": torch.randn(3)}
    state = clipped.init(params)
    assert type(state) is optim.AdamWState
    assert sorted(avgfn.state_dict(state)) == sorted(avgfn.state_dict(inner.init(params)))
    params, state = clipped.update({"w": torch.tensor([30.0, 40.0, 0.0])}, state, params)
    loaded = avgfn.load_state_dict(inner.init(params), avgfn.state_dict(state))
    grads = {"w": torch.ones(3)}
    a, _ = clipped.update(grads, state, params)
    b, _ = clipped.update(grads, loaded, params)
    assert torch.equal(a["w"], b["w"])


def test_clip_by_global_norm_under_vmap_equals_per_replica_loop():
    opt = optim.clip_by_global_norm(1.0, optim.adamw(0.01))
    replicas = 3
    g = torch.Generator().manual_seed(0)
    stacked = {
        "a": torch.randn(replicas, 37, generator=g),
        "b": torch.randn(replicas, 4, 5, generator=g),
    }
    state = torch.func.vmap(opt.init)(stacked)
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(replicas)]
    single_states = [opt.init(p) for p in singles]
    for step in range(10):
        # replica i's gradients are scaled so that only some replicas are clipped
        scales = 0.1 * 10.0 ** torch.arange(replicas)
        grads = {
            k: torch.randn(v.shape, generator=g) * scales.view(-1, *([1] * (v.ndim - 1)))
            for k, v in stacked.items()
        }
        stacked, state = torch.func.vmap(opt.update)(grads, state, stacked)
        for i in range(replicas):
            singles[i], single_states[i] = opt.update(
                {k: v[i] for k, v in grads.items()}, single_states[i], singles[i]
            )
    for i in range(replicas):
        for k in stacked:
            assert torch.equal(stacked[k][i], singles[i][k])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: optim.clip_grad_norm({"a": torch.ones(2)}, -1.0), ValueError, "max_norm must be >= 0"),
        (
            lambda: optim.clip_grad_norm({"a": torch.ones(2)}, 1.0, norm_type=0),
            ValueError, "norm_type must be > 0",
        ),
        (
            lambda: optim.clip_grad_norm({"a": torch.ones(2)}, "1"),
            TypeError, "max_norm must be a real number",
        ),
        (
            lambda: optim.clip_grad_norm({"a": [1.0]}, 1.0),
            TypeError, r"the leaf at \['a'\]\[0\] is float",
        ),
        (
            lambda: optim.clip_by_global_norm(1.0, optim.sgd),
            TypeError, "optimizer must be an avgfn.optim.Optimizer",
        ),
        (lambda: optim.clip_by_global_norm(-2, optim.sgd(0.1)), ValueError, "max_norm must be >= 0"),
        (lambda: optim.clip_by_global_norm(1.0, optim.sgd(0.1), norm_type=True), TypeError, "norm_type"),
    ],
)
def test_bad_clip_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- adam against torch.optim.Adam ---

def _run_against_torch(torch_opt_cls, ours, steps, dtype=torch.float32, **kwargs):
    init = _tree(1234, {k: dtype for k in SHAPES})
    return run_against_torch(lambda ps: torch_opt_cls(ps, **kwargs), ours, init, lambda step: _grads(step, dtype), steps)


ADAM_CASES = [
    {},
    {"weight_decay": 1e-2},
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    {"weight_decay": 0.05, "amsgrad": True},
    {"weight_decay": 0.05, "maximize": True},
]


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=repr)
def test_adam_matches_torch_exactly(kwargs):
    # Past step 1270 with the default betas, as the AdamW test.
    steps = 1300 if kwargs == {"weight_decay": 1e-2} else 200
    state = _run_against_torch(torch.optim.Adam, optim.adam(0.01, **kwargs), steps, lr=0.01, **kwargs)
    assert isinstance(state, optim.AdamState) and int(state.step) == steps


def test_adam_float64_matches_torch_exactly():
    _run_against_torch(torch.optim.Adam, optim.adam(0.01, weight_decay=0.1), 100, dtype=torch.float64,
                       lr=0.01, weight_decay=0.1)


def test_adam_weight_decay_is_not_decoupled():
    # Same hyperparameters, different algorithms: Adam's L2 decay goes through the moments.
    params = _tree(7)
    a, w = optim.adam(0.01, weight_decay=0.1), optim.adamw(0.01, weight_decay=0.1)
    pa, _ = a.update(_grads(1), a.init(params), params)
    pw, _ = w.update(_grads(1), w.init(params), params)
    assert not torch.equal(pa["w"], pw["w"])


def test_adam_pure_vmap_and_state_checks():
    opt = optim.adam(0.01, weight_decay=0.01, amsgrad=True)
    replicas = 3
    g = torch.Generator().manual_seed(0)
    stacked = {
        "a": torch.randn(replicas, 37, generator=g),
        "b": torch.randn(replicas, 4, 5, generator=g),
    }
    state = torch.func.vmap(opt.init)(stacked)
    spec = pytree.tree_flatten(state)[1]
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(replicas)]
    single_states = [opt.init(p) for p in singles]
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in stacked.items()}
        snapshot = [t.clone() for t in pytree.tree_leaves((grads, state, stacked))]
        new, state2 = torch.func.vmap(opt.update)(grads, state, stacked)
        after = pytree.tree_leaves((grads, state, stacked))
        assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "an input was modified"
        assert pytree.tree_flatten(state2)[1] == spec
        stacked, state = new, state2
        for i in range(replicas):
            singles[i], single_states[i] = opt.update(
                {k: v[i] for k, v in grads.items()}, single_states[i], singles[i]
            )
    for i in range(replicas):
        for k in stacked:
            assert torch.equal(stacked[k][i], singles[i][k])
    params = {"w": torch.randn(3)}
    with pytest.raises(TypeError, match="state must be a AdamState made by adam"):
        optim.adam().update({"w": torch.ones(3)}, optim.adamw().init(params), params)
    with pytest.raises(TypeError, match="state must be a AdamWState made by adamw"):
        optim.adamw().update({"w": torch.ones(3)}, optim.adam().init(params), params)
    with pytest.raises(ValueError, match="adam.update: this adam has amsgrad=True"):
        optim.adam(amsgrad=True).update({"w": torch.ones(3)}, optim.adam().init(params), params)
    with pytest.raises(ValueError, match=r"betas\[0\] must be < 1.0"):
        optim.adam(betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        optim.adam(weight_decay=-0.1)


# --- Nesterov SGD with weight decay ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sgd_nesterov_momentum_09_weight_decay_matches_torch_exactly(dtype):
    kwargs = {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 5e-4}
    ours = optim.sgd(0.05, **kwargs)
    state = _run_against_torch(torch.optim.SGD, ours, 200, dtype=dtype, lr=0.05, **kwargs)
    assert int(state.step) == 200
