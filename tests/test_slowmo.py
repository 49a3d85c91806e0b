"""SlowMo: fairscale's slow momentum step, operation for operation; its identities
with local SGD and DiLoCo; its failure policy and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import avgfn
from avgfn import optim, simulate
from avgfn import diloco
from avgfn import NonFiniteError
from avgfn import SlowMoState, slowmo
from avgfn.testing import RecordingReduce, peers_mean

W = 3
LR = 0.1


def start(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return {"w": torch.randn(3, 2, generator=g).to(dtype), "b": torch.randn(2, generator=g).to(dtype)}


def batches(steps, world=W, dtype=torch.float32):
    g = torch.Generator().manual_seed(23)
    x = torch.randn(steps, world, 5, 3, generator=g).to(dtype)
    return x, torch.randn(steps, world, 5, 2, generator=g).to(dtype)


def loss_fn(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def local(p, x, y, lr=LR):
    g = grad(loss_fn)(p, x, y)
    return {k: v - lr * g[k] for k, v in p.items()}


def _fairscale_slow_step(old, gmb, p, lr, slowmo_lr, beta):
    """fairscale's ``_perform_local_optimization``, in place on copies."""
    old, gmb, p = old.clone(), gmb.clone(), p.clone()
    gmb.mul_(beta).sub_(p, alpha=1 / lr).add_(old, alpha=1 / lr)
    old.add_(gmb, alpha=-lr * slowmo_lr)
    p.copy_(old)
    return old, gmb, p


@pytest.mark.parametrize("base_period", [None, 2, 4])
def test_slow_step_is_fairscales_operation_for_operation(base_period):
    reduce = RecordingReduce(peers_mean(lambda t: 0.9 * t + 0.01))
    schedule = lambda step: LR * (1 + step % 3)  # noqa: E731 - a base lr schedule
    avg = slowmo(6, reduce=reduce, lr=schedule, momentum=0.6, slow_lr=0.8, base_period=base_period)
    params = start()
    state = avg.init(params)
    old = {k: v.clone() for k, v in params.items()}
    gmb = {k: torch.zeros_like(v) for k, v in params.items()}
    x, y = batches(18, 1)
    base_rounds = slow_rounds = 0
    for step in range(18):
        params = local(params, x[step, 0], y[step, 0])
        calls = reduce.calls
        new, state = avg.update(params, state, step)
        slow = (step + 1) % 6 == 0
        base = base_period is not None and (step + 1) % base_period == 0
        assert reduce.calls - calls == (1 if slow or base else 0), step
        if slow or base:
            flat = reduce.outputs[-1]
            averaged = {"w": flat[:6].view(3, 2), "b": flat[6:]}
        if slow:
            slow_rounds += 1
            for k in params:
                old[k], gmb[k], want = _fairscale_slow_step(old[k], gmb[k], averaged[k], schedule(step), 0.8, 0.6)
                assert torch.equal(new[k], want), (step, k)
                assert torch.equal(state.momentum[list(params).index(k)], gmb[k])
        elif base:
            base_rounds += 1
            assert all(torch.equal(new[k], averaged[k]) for k in params)
        else:
            assert new is params
        params = new
    assert state.rounds.tolist() == [base_rounds, slow_rounds] == [{None: 0, 2: 6, 4: 3}[base_period], 3]


def simulate_run(avg, steps, dtype=torch.float64):
    stacked = simulate.stack([start(dtype) for _ in range(W)])
    x, y = batches(steps, W, dtype)
    state = vmap(avg.init)(stacked)
    run = vmap(lambda p, s, xb, yb, step: avg.update(local(p, xb, yb), s, step), in_dims=(0, 0, 0, 0, None))
    history = []
    for step in range(steps):
        stacked, state = run(stacked, state, x[step], y[step], step)
        history.append(stacked)
    return history


def _close(a, b):
    for x, y in zip(a, b):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-10, atol=1e-11)


def test_without_momentum_it_is_local_sgd():
    mean = simulate.replica_mean()
    _close(
        simulate_run(slowmo(4, reduce=mean, lr=LR, momentum=0.0, slow_lr=1.0), 13),
        simulate_run(avgfn.periodic(4, reduce=mean, warmup_steps=3), 13),
    )
    _close(  # the base averagings, and slow steps that coincide with them
        simulate_run(slowmo(6, reduce=mean, lr=LR, momentum=0.0, slow_lr=1.0, base_period=2), 13),
        simulate_run(avgfn.periodic(2, reduce=mean, warmup_steps=1), 13),
    )


def test_with_a_constant_lr_it_is_diloco_with_heavy_ball_outer_sgd():
    mean = simulate.replica_mean()
    _close(
        simulate_run(slowmo(3, reduce=mean, lr=LR, momentum=0.7, slow_lr=0.9), 13),
        simulate_run(diloco(3, reduce=mean, outer_optimizer=optim.sgd(0.9, momentum=0.7)), 13),
    )


def test_nonfinite_policies():
    params = {"w": torch.ones(2)}
    bad = {"w": torch.tensor([math.nan, 0.0])}
    avg = slowmo(2, reduce=lambda t: t, lr=0.5)
    state = avg.init(params)
    with pytest.raises(NonFiniteError, match="at step 1: slowmo"):
        avg.update(bad, state, 1)
    skip = slowmo(2, reduce=lambda t: t, lr=0.5, round=avgfn.Round(nonfinite="skip"))
    state = skip.init(params)
    new, state2 = skip.update(bad, state, 1)
    assert torch.equal(new["w"], params["w"]) and torch.equal(state2.momentum[0], torch.zeros(2))
    assert state2.rounds.tolist() == [0, 1] and int(state2.skipped) == 1
    # under vmap "raise" skips, on every replica
    avg = slowmo(2, reduce=simulate.replica_mean(), lr=0.5)
    stacked = {"w": torch.ones(2, 2)}
    s = vmap(avg.init)(stacked)
    new, s = vmap(avg.update, in_dims=(0, 0, None))({"w": torch.tensor([[math.nan, 0.0], [1.0, 1.0]])}, s, 1)
    assert torch.equal(new["w"], torch.ones(2, 2)) and s.skipped.tolist() == [1, 1]


def test_bad_input():
    ok = {"reduce": lambda t: t, "lr": 0.1}
    with pytest.raises(ValueError, match="period must be >= 1"):
        slowmo(0, **ok)
    with pytest.raises(ValueError, match="base_period must be >= 1"):
        slowmo(4, base_period=0, **ok)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        slowmo(4, momentum=-0.5, **ok)
    with pytest.raises(ValueError, match="slow_lr must be >= 0"):
        slowmo(4, slow_lr=-1.0, **ok)
    with pytest.raises(ValueError, match="learning rate must be finite and > 0, got 0.0"):
        slowmo(4, reduce=lambda t: t, lr=0.0)
    with pytest.raises(TypeError, match="lr\\(step\\) must return a real number"):
        slowmo(4, reduce=lambda t: t, lr="0.1")
    avg = slowmo(1, reduce=lambda t: t, lr=lambda step: 0.0)
    params = {"w": torch.ones(1)}
    state = avg.init(params)
    with pytest.raises(ValueError, match="> 0, got 0.0 at step 0"):
        avg.update(params, state, 0)
    with pytest.raises(TypeError, match="state must be a SlowMoState"):
        avg.update(params, avgfn.periodic(2, reduce=lambda t: t).init(params), 0)
    assert isinstance(state, SlowMoState)
