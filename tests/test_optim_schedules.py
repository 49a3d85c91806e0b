"""avgfn.optim schedules against torch.optim.lr_scheduler; optimizers driven by them against torch.

Two comparisons of values:

* exact (``==`` on float64) against the closed forms torch's schedulers
  document (``_get_closed_form_lr``), written out here in Python floats;
* float64-tight (relative 1e-14, a few ulps) against ``get_last_lr()`` of the
  torch schedulers stepped one step at a time, which compute each value from
  the previous one and so round differently.

And one of training: an avgfn optimizer given a schedule as ``lr`` against the
torch optimizer stepped with the torch scheduler, equal bits at every step.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch.optim import lr_scheduler as L

from _optim_oracle import run_against_torch
import avgfn
import avgfn.optim as optim

STEPS = 60
SHAPES = {"w": (5, 7), "b": (37,), "s": ()}


def _torch_lrs(make, lr, steps=STEPS):
    """The lr torch's scheduler gives each of ``steps`` optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    values = []
    for _ in range(steps):
        values.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return values


# (name, torch scheduler factory, avgfn schedule, base lr, closed form in Python floats)
CASES = [
    (
        "linear",
        lambda o: L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=20),
        optim.linear_warmup(0.3, 20, start_factor=0.1),
        0.3,
        lambda t: 0.3 * (0.1 + (1.0 - 0.1) * min(20, t) / 20),
    ),
    (
        "linear_down",
        lambda o: L.LinearLR(o, start_factor=0.7, end_factor=0.2, total_iters=13),
        optim.linear_warmup(0.05, 13, start_factor=0.7, end_factor=0.2),
        0.05,
        lambda t: 0.05 * (0.7 + (0.2 - 0.7) * min(13, t) / 13),
    ),
    (
        "linear_default",
        lambda o: L.LinearLR(o, total_iters=5),
        optim.linear_warmup(0.1, 5),
        0.1,
        lambda t: 0.1 * (1 / 3 + (1.0 - 1 / 3) * min(5, t) / 5),
    ),
    (
        "step",
        lambda o: L.StepLR(o, step_size=3, gamma=0.7),
        optim.step_decay(0.1, 3, gamma=0.7),
        0.1,
        lambda t: 0.1 * 0.7 ** (t // 3),
    ),
    (
        "step_default",
        lambda o: L.StepLR(o, step_size=7),
        optim.step_decay(2.0, 7),
        2.0,
        lambda t: 2.0 * 0.1 ** (t // 7),
    ),
    (
        "cosine",
        lambda o: L.CosineAnnealingLR(o, T_max=STEPS - 1, eta_min=1e-3),
        optim.cosine_decay(0.1, STEPS - 1, eta_min=1e-3),
        0.1,
        lambda t: 1e-3 + (0.1 - 1e-3) * (1 + math.cos(math.pi * t / (STEPS - 1))) / 2,
    ),
    (
        "cosine_to_zero",
        lambda o: L.CosineAnnealingLR(o, T_max=37),
        optim.cosine_decay(0.02, 37),
        0.02,
        None,  # past T_max torch rises again; compared up to T_max below
    ),
    (
        "warmup_cosine",
        lambda o: L.SequentialLR(
            o,
            [
                L.LinearLR(o, start_factor=0.01, total_iters=10),
                L.CosineAnnealingLR(o, T_max=45, eta_min=1e-4),
            ],
            milestones=[10],
        ),
        optim.cosine_decay(0.1, 45, eta_min=1e-4, warmup_steps=10, warmup_start_factor=0.01),
        0.1,
        None,
    ),
]
IDS = [c[0] for c in CASES]


def _horizon(name):
    # torch's CosineAnnealingLR turns back up after T_max; ours holds at eta_min.
    return {"cosine_to_zero": 38, "warmup_cosine": 56}.get(name, STEPS)


@pytest.mark.parametrize("name, make, schedule, lr, closed", CASES, ids=IDS)
def test_values_match_torch_scheduler(name, make, schedule, lr, closed):
    steps = _horizon(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that optimizer.step() saw no grad
        expected = torch.tensor(_torch_lrs(make, lr, steps), dtype=torch.float64)
    got = schedule(torch.arange(steps))
    assert got.dtype == torch.float64 and got.shape == (steps,)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    ints = torch.stack([schedule(t) for t in range(steps)])
    assert torch.equal(ints, got), "an int count and a tensor count disagree"


@pytest.mark.parametrize(
    "name, make, schedule, lr, closed", [c for c in CASES if c[4] is not None], ids=repr
)
def test_values_equal_torch_closed_form_exactly(name, make, schedule, lr, closed):
    del make, lr
    got = schedule(torch.arange(STEPS)).tolist()
    expected = [closed(t) for t in range(STEPS)]
    if name == "cosine":
        # torch.cos and math.cos may differ in the last bit of a double.
        assert all(abs(a - b) <= math.ulp(b) for a, b in zip(got, expected))
    else:
        assert got == expected


def test_cosine_holds_at_eta_min_after_decay():
    schedule = optim.cosine_decay(0.1, 10, eta_min=0.01, warmup_steps=3)
    assert schedule(13).item() == 0.01
    later = schedule(torch.tensor([13, 14, 1000, 10**12]))
    assert torch.equal(later, torch.full((4,), 0.01, dtype=torch.float64))


def test_linear_warmup_holds_end_value():
    schedule = optim.linear_warmup(0.5, 4, start_factor=0.0, end_factor=0.5)
    assert schedule(0).item() == 0.0
    assert schedule(4).item() == schedule(10**9).item() == 0.25


def test_join_schedules_is_sequential_lr():
    make = lambda o: L.SequentialLR(  # noqa: E731
        o,
        [L.LinearLR(o, start_factor=0.5, total_iters=4), L.StepLR(o, step_size=2, gamma=0.5),
         L.LinearLR(o, start_factor=0.25, total_iters=8)],
        milestones=[6, 15],
    )
    ours = optim.join_schedules(
        [optim.linear_warmup(0.2, 4, start_factor=0.5), optim.step_decay(0.2, 2, gamma=0.5),
         optim.linear_warmup(0.2, 8, start_factor=0.25)],
        [6, 15],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.tensor(_torch_lrs(make, 0.2, 40), dtype=torch.float64)
    torch.testing.assert_close(ours(torch.arange(40)), expected, rtol=1e-14, atol=0)


def test_constant_schedule():
    schedule = optim.constant_schedule(0.25)
    assert torch.equal(schedule(torch.arange(5)), torch.full((5,), 0.25, dtype=torch.float64))
    assert schedule(7).item() == 0.25


ALL_SCHEDULES = {
    "constant": optim.constant_schedule(0.1),
    "linear": optim.linear_warmup(0.1, 7, start_factor=0.2),
    "cosine": optim.cosine_decay(0.1, 9, eta_min=0.01, warmup_steps=4),
    "step": optim.step_decay(0.1, 3, gamma=0.5),
}


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_schedule_under_vmap_and_on_int64_step(name):
    schedule = ALL_SCHEDULES[name]
    counts = torch.tensor([0, 3, 5, 12], dtype=torch.int64)
    batched = torch.func.vmap(schedule)(counts)
    singles = torch.stack([schedule(c) for c in counts])  # 0-d int64 tensors, as in a state
    assert torch.equal(batched, singles)
    assert torch.equal(schedule(torch.tensor(5, dtype=torch.int32)), schedule(5))


# --- optimizers driven by a schedule, against torch.optim + torch's scheduler ---

def _grads(step, dtype):
    g = torch.Generator().manual_seed(step)
    scale = 10.0 ** ((step % 5) - 2)
    return {k: torch.randn(s, generator=g, dtype=dtype) * scale for k, s in SHAPES.items()}


def _run_scheduled(torch_cls, torch_kwargs, make_sched, ours, steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(99)
    init = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    scheduler = []

    def make(ps):
        opt = torch_cls(ps, **torch_kwargs)
        scheduler.append(make_sched(opt))
        return opt

    return run_against_torch(
        make, ours, init, lambda step: _grads(step, dtype), steps, after_step=lambda: scheduler[0].step()
    )


def _warmup_cosine_torch(o):
    return L.SequentialLR(
        o,
        [L.LinearLR(o, start_factor=0.05, total_iters=8), L.CosineAnnealingLR(o, T_max=40, eta_min=1e-4)],
        milestones=[8],
    )


def _warmup_cosine(lr):
    return optim.cosine_decay(lr, 40, eta_min=1e-4, warmup_steps=8, warmup_start_factor=0.05)


TRAINING_CASES = {
    "sgd_step": (
        torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
        lambda o: L.StepLR(o, step_size=7, gamma=0.5),
        lambda: optim.sgd(optim.step_decay(0.05, 7, gamma=0.5), momentum=0.9, weight_decay=1e-2),
    ),
    "sgd_nesterov_warmup_cosine": (
        torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        _warmup_cosine_torch,
        lambda: optim.sgd(_warmup_cosine(0.1), momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "sgd_plain_linear": (
        torch.optim.SGD, {"lr": 0.2},
        lambda o: L.LinearLR(o, start_factor=0.1, total_iters=25),
        lambda: optim.sgd(optim.linear_warmup(0.2, 25, start_factor=0.1)),
    ),
    "adamw_warmup_cosine": (
        torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1},
        _warmup_cosine_torch,
        lambda: optim.adamw(_warmup_cosine(0.01), weight_decay=0.1),
    ),
    "adamw_amsgrad_step": (
        torch.optim.AdamW, {"lr": 0.01, "amsgrad": True},
        lambda o: L.StepLR(o, step_size=5, gamma=0.8),
        lambda: optim.adamw(optim.step_decay(0.01, 5, gamma=0.8), amsgrad=True),
    ),
    "adam_linear": (
        torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2},
        lambda o: L.LinearLR(o, start_factor=0.2, total_iters=15),
        lambda: optim.adam(optim.linear_warmup(0.01, 15, start_factor=0.2), weight_decay=1e-2),
    ),
}


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_scheduled_optimizer_matches_torch_exactly(name):
    torch_cls, kwargs, make_sched, ours = TRAINING_CASES[name]
    # 49 steps: through the warm-up and the whole cosine (torch's rises again after it).
    state = _run_scheduled(torch_cls, kwargs, make_sched, ours(), 49)
    assert int(state.step) == 49


def test_constant_schedule_equals_float_lr_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    params = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    for make in (
        lambda lr: optim.sgd(lr, momentum=0.9, nesterov=True),
        lambda lr: optim.adamw(lr, weight_decay=0.1),
        lambda lr: optim.adam(lr, weight_decay=0.1),
    ):
        a, b = make(0.03), make(optim.constant_schedule(0.03))
        pa, sa, pb, sb = params, a.init(params), params, b.init(params)
        for step in range(20):
            grads = _grads(step, torch.float32)
            pa, sa = a.update(grads, sa, pa)
            pb, sb = b.update(grads, sb, pb)
            for k in pa:
                assert torch.equal(pa[k], pb[k])
        assert pytree.tree_flatten(sa)[1] == pytree.tree_flatten(sb)[1]


def test_a_plain_callable_is_a_schedule():
    params = {"w": torch.tensor([1.0, 2.0])}
    opt = optim.sgd(lambda count: 0.5)
    new, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    assert torch.equal(new["w"], torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.sgd(_warmup_cosine(0.1), momentum=0.9),
        lambda: optim.adamw(optim.step_decay(0.01, 2, gamma=0.5)),
        lambda: optim.adam(optim.linear_warmup(0.01, 3), weight_decay=0.1),
    ],
    ids=["sgd", "adamw", "adam"],
)
def test_scheduled_optimizer_under_vmap_equals_per_replica_loop(make):
    opt = make()
    replicas = 3
    g = torch.Generator().manual_seed(0)
    stacked = {
        "a": torch.randn(replicas, 37, generator=g),
        "b": torch.randn(replicas, 4, 5, generator=g),
    }
    state = torch.func.vmap(opt.init)(stacked)
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(replicas)]
    single_states = [opt.init(p) for p in singles]
    for _ in range(12):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in stacked.items()}
        stacked, state = torch.func.vmap(opt.update)(grads, state, stacked)
        for i in range(replicas):
            singles[i], single_states[i] = opt.update(
                {k: v[i] for k, v in grads.items()}, single_states[i], singles[i]
            )
    for i in range(replicas):
        for k in stacked:
            assert torch.equal(stacked[k][i], singles[i][k])


def test_scheduled_sgd_state_is_unchanged_and_checkpoints():
    params = {"w": torch.randn(3)}
    plain, scheduled = optim.sgd(0.1, momentum=0.9), optim.sgd(optim.step_decay(0.1, 2), momentum=0.9)
    state = scheduled.init(params)
    assert sorted(avgfn.state_dict(state)) == sorted(avgfn.state_dict(plain.init(params)))
    for _ in range(3):
        params, state = scheduled.update({"w": torch.ones(3)}, state, params)
    loaded = avgfn.load_state_dict(scheduled.init(params), avgfn.state_dict(state))
    grads = {"w": torch.full((3,), 0.5)}
    a, _ = scheduled.update(grads, state, params)
    b, _ = scheduled.update(grads, loaded, params)
    assert torch.equal(a["w"], b["w"])
    assert int(loaded.step) == 3


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: optim.linear_warmup(0.1, 0), ValueError, "warmup_steps must be >= 1"),
        (
            lambda: optim.linear_warmup(0.1, 5, start_factor=-0.1),
            ValueError, "start_factor must be >= 0",
        ),
        (lambda: optim.linear_warmup(0.1, 2.5), TypeError, "warmup_steps must be an int"),
        (lambda: optim.cosine_decay(0.1, 0), ValueError, "decay_steps must be >= 1"),
        (lambda: optim.cosine_decay(0.1, 10, warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
        (lambda: optim.cosine_decay(-0.1, 10), ValueError, "lr must be >= 0"),
        (lambda: optim.step_decay(0.1, 0), ValueError, "step_size must be >= 1"),
        (lambda: optim.step_decay(0.1, 2, gamma="x"), TypeError, "gamma must be a real number"),
        (lambda: optim.constant_schedule(float("nan")), ValueError, "value must not be NaN"),
        (
            lambda: optim.join_schedules([optim.constant_schedule(1.0)], [3]),
            ValueError, "boundaries must hold",
        ),
        (lambda: optim.join_schedules([1.0, 2.0], [3]), TypeError, r"schedules\[0\] must be a schedule"),
        (lambda: optim.join_schedules([], []), ValueError, "at least one"),
        (
            lambda: optim.join_schedules([optim.constant_schedule(1.0)] * 3, [5, 5]),
            ValueError, "strictly increasing",
        ),
        (lambda: optim.sgd("0.1"), TypeError, "lr must be a real number or a schedule"),
        (lambda: optim.adam(lr=None), TypeError, "lr must be a real number or a schedule"),
    ],
)
def test_bad_schedule_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_counts_and_bad_schedule_values():
    schedule = optim.step_decay(0.1, 2)
    with pytest.raises(ValueError, match="count must be >= 0"):
        schedule(-1)
    with pytest.raises(TypeError, match="count must be an integer tensor"):
        schedule(torch.tensor(1.0))
    with pytest.raises(TypeError, match="count must be an int"):
        schedule(1.5)
    params = {"w": torch.zeros(2)}
    grads = {"w": torch.ones(2)}
    opt = optim.sgd(lambda count: torch.ones(2))
    with pytest.raises(ValueError, match="must return a scalar"):
        opt.update(grads, opt.init(params), params)
    opt = optim.adamw(lambda count: "fast")
    with pytest.raises(TypeError, match="lr schedule returned str"):
        opt.update(grads, opt.init(params), params)


def test_scheduled_clipped_update_compiles_to_one_graph():
    opt = optim.clip_by_global_norm(1.0, optim.adamw(_warmup_cosine(0.01), weight_decay=0.1))
    params = {k: v.clone() for k, v in _grads(100, torch.float32).items()}
    compiled = torch.compile(opt.update, fullgraph=True, backend="aot_eager")
    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = eager_p, eager_s
    for step in range(12):
        grads = _grads(step, torch.float32)
        eager_p, eager_s = opt.update(grads, eager_s, eager_p)
        comp_p, comp_s = compiled(grads, comp_s, comp_p)
        for k in params:
            assert torch.equal(comp_p[k], eager_p[k]), (step, k)
