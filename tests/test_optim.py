"""avgfn.optim against torch.optim, bit for bit; purity, vmap, bad input."""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils._pytree as pytree

from _optim_oracle import run_against_torch
import avgfn
import avgfn.optim as optim

# Sizes that exercise both the vectorized body and the scalar tail of torch's kernels.
SHAPES = {"w": (5, 7), "b": (37,), "s": ()}

SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.9, "weight_decay": 1e-2},
    {"momentum": 0.5, "nesterov": True, "weight_decay": 1e-3},
    {"weight_decay": 0.1, "maximize": True},
]
ADAMW_CASES = [
    {},
    {"weight_decay": 0.0},
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    {"amsgrad": True},
    {"maximize": True},
]


def _grads(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    # Magnitudes spread over four decades, so rounding differences would show.
    scale = 10.0 ** ((step % 5) - 2)
    return {k: torch.randn(s, generator=g, dtype=dtype) * scale for k, s in SHAPES.items()}


def _run_against_torch(torch_opt_cls, ours, steps, dtype=torch.float32, **kwargs):
    g = torch.Generator().manual_seed(1234)
    init = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    return run_against_torch(lambda ps: torch_opt_cls(ps, **kwargs), ours, init, lambda step: _grads(step, dtype), steps)


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=repr)
def test_sgd_matches_torch_exactly(kwargs):
    state = _run_against_torch(torch.optim.SGD, optim.sgd(0.05, **kwargs), 200, lr=0.05, **kwargs)
    assert int(state.step) == 200


@pytest.mark.parametrize("kwargs", ADAMW_CASES, ids=repr)
def test_adamw_matches_torch_exactly(kwargs):
    # The default betas run past step 1270, where (1 - 0.999**t) ** 0.5 and
    # sqrt(1 - 0.999**t) differ in the last bit (torch uses the former).
    steps = 1300 if not kwargs else 200
    state = _run_against_torch(torch.optim.AdamW, optim.adamw(0.01, **kwargs), steps, lr=0.01, **kwargs)
    assert int(state.step) == steps


def test_float64_matches_torch_exactly():
    _run_against_torch(torch.optim.SGD, optim.sgd(0.1, momentum=0.9, nesterov=True), 50,
                       dtype=torch.float64, lr=0.1, momentum=0.9, nesterov=True)
    _run_against_torch(torch.optim.AdamW, optim.adamw(0.01), 50, dtype=torch.float64, lr=0.01)


OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": lambda: optim.adamw(0.01),
    "adamw_amsgrad": lambda: optim.adamw(0.01, amsgrad=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pure_and_structure_stable(name):
    opt = OPTIMIZERS[name]()
    params = {"layer": [torch.randn(3, 2), torch.randn(2)], "head": (torch.randn(4),)}
    state = opt.init(params)
    spec = pytree.tree_flatten(state)[1]
    for step in range(3):
        grads = pytree.tree_map(torch.randn_like, params)
        before = [t.clone() for t in pytree.tree_leaves((grads, state, params))]
        new_params, new_state = opt.update(grads, state, params)
        after = pytree.tree_leaves((grads, state, params))
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"
        assert pytree.tree_flatten(new_state)[1] == spec
        assert pytree.tree_flatten(new_params)[1] == pytree.tree_flatten(params)[1]
        for old, new in zip(pytree.tree_leaves(params), pytree.tree_leaves(new_params)):
            assert new is not old and new.dtype == old.dtype and new.shape == old.shape
        params, state = new_params, new_state
    assert int(state.step) == 3


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_vmap_equals_per_replica_loop(name):
    opt = OPTIMIZERS[name]()
    replicas = 3
    g = torch.Generator().manual_seed(0)
    stacked = {"a": torch.randn(replicas, 37, generator=g), "b": torch.randn(replicas, 4, 5, generator=g)}
    state = torch.func.vmap(opt.init)(stacked)
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(replicas)]
    single_states = [opt.init(p) for p in singles]
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in stacked.items()}
        stacked, state = torch.func.vmap(opt.update)(grads, state, stacked)
        for i in range(replicas):
            singles[i], single_states[i] = opt.update(
                {k: v[i] for k, v in grads.items()}, single_states[i], singles[i]
            )
    for i in range(replicas):
        for k in stacked:
            torch.testing.assert_close(stacked[k][i], singles[i][k], rtol=0, atol=0)


def test_works_inside_torch_func_grad_loop():
    model = torch.nn.Linear(3, 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    opt = optim.adamw(0.05)
    state = opt.init(params)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3

    def loss(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    first = loss(params).item()
    for _ in range(100):
        params, state = opt.update(torch.func.grad(loss)(params), state, params)
    assert loss(params).item() < first / 10


def test_state_checkpoint_roundtrip():
    opt = optim.sgd(0.1, momentum=0.9)
    params = {"w": torch.randn(3)}
    state = opt.init(params)
    params, state = opt.update({"w": torch.ones(3)}, state, params)
    buf = io.BytesIO()
    torch.save(avgfn.state_dict(state), buf)
    buf.seek(0)
    loaded = avgfn.load_state_dict(opt.init(params), torch.load(buf, weights_only=True))
    grads = {"w": torch.full((3,), 0.5)}
    a, _ = opt.update(grads, state, params)
    b, _ = opt.update(grads, loaded, params)
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.sgd(-0.1), "lr must be >= 0"),
        (lambda: optim.sgd(0.1, momentum=-1), "momentum must be >= 0"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov"),
        (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
        (lambda: optim.adamw(betas=(0.9, 1.0)), r"betas\[1\] must be < 1.0"),
        (lambda: optim.adamw(eps=-1e-8), "eps must be >= 0"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_hyperparameter_types():
    with pytest.raises(TypeError, match="lr must be a real number"):
        optim.sgd("0.1")
    with pytest.raises(TypeError, match="betas must be a pair"):
        optim.adamw(betas=0.9)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_from_another_param_tree_is_refused(name):
    opt = OPTIMIZERS[name]()
    params = {"w": torch.randn(3), "b": torch.randn(2)}
    state = opt.init(params)
    grads = pytree.tree_map(torch.ones_like, params)
    snapshot = [t.clone() for t in pytree.tree_leaves((state, params))]
    other_keys = opt.init({"w": torch.randn(3), "c": torch.randn(2)})
    other_shapes = opt.init({"w": torch.randn(4), "b": torch.randn(2)})
    if name == "sgd":  # no per-param state: only the grads can disagree
        with pytest.raises(ValueError, match="grads does not match the structure of params"):
            opt.update({"w": torch.ones(3)}, state, params)
        return
    with pytest.raises(ValueError, match="another param tree"):
        opt.update(grads, other_keys, params)
    with pytest.raises(ValueError, match=r"has shape \(4,\), the param has \(3,\)"):
        opt.update(grads, other_shapes, params)
    after = pytree.tree_leaves((state, params))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_state_of_another_optimizer_is_refused():
    params = {"w": torch.randn(3)}
    grads = {"w": torch.ones(3)}
    with pytest.raises(TypeError, match="state must be a SGDState made by sgd"):
        optim.sgd(0.1).update(grads, optim.adamw().init(params), params)
    with pytest.raises(ValueError, match="momentum=0"):
        optim.sgd(0.1, momentum=0.9).update(grads, optim.sgd(0.1).init(params), params)
    with pytest.raises(ValueError, match="amsgrad"):
        optim.adamw(amsgrad=True).update(grads, optim.adamw().init(params), params)


def test_non_float_leaves_are_refused():
    with pytest.raises(TypeError, match=r"the leaf at \['n'\] is Tensor of dtype torch.int64"):
        optim.sgd(0.1).init({"n": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="is int"):
        optim.adamw().init({"n": 3})


def test_sgd_momentum_state_never_aliases_the_grads():
    # the first step's buffer is the gradient's value, in a tensor of its own (torch clones it):
    # a caller that reuses its gradient tensors in place must not change the optimizer's state
    opt = avgfn.optim.sgd(0.1, momentum=0.9)
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 2.0)}
    _, state = opt.update(grads, opt.init(params), params)
    grads["w"].zero_()
    assert torch.equal(state.momentum_buffer["w"], torch.full((3,), 2.0))


def test_the_built_in_optimizers_say_their_settings():
    # the DiLoCo family's per-round check compares its outer optimizer's settings
    assert avgfn.optim.sgd(0.7, momentum=0.9, nesterov=True).settings == (
        "sgd(lr=0.7, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)"
    )
    assert avgfn.optim.adamw(1e-3).settings.startswith("adamw(lr=0.001, betas=(0.9, 0.999), eps=1e-08")
    assert avgfn.optim.adam(1e-3).settings.startswith("adam(lr=0.001,")
    clipped = avgfn.optim.clip_by_global_norm(1.0, avgfn.optim.sgd(0.1))
    assert clipped.settings.startswith("clip_by_global_norm(1.0, sgd(lr=0.1,")
    assert avgfn.optim.sgd(avgfn.optim.cosine_decay(0.1, 10)).settings.startswith("sgd(lr=schedule,")
    assert avgfn.optim.sgd(0.7).settings != avgfn.optim.sgd(0.5).settings
    by_hand = avgfn.optim.Optimizer(init=lambda p: None, update=lambda g, s, p: (p, s))
    assert by_hand.settings == ""  # not compared
