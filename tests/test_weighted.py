"""Weighted averaging (FedAvg) and server momentum (FedAvgM): equal weights are plain
averaging, the weighted mean is the closed form, FedAvgM is Flower's server update,
and bad weights are refused or skipped, never averaged."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import grad, vmap

import avgfn
from avgfn import simulate
from avgfn import NonFiniteError
from avgfn import WeightedState, fedavg, fedavgm, weighted
from avgfn.testing import RecordingReduce

W = 4
LR = 0.1


def start(rank, dtype=torch.float32, same=False):
    g = torch.Generator().manual_seed(1 if same else 30 + rank)
    w, b = torch.randn(3, generator=g).to(dtype), torch.randn((), generator=g).to(dtype)
    return {"w": w, "b": b, "n": torch.tensor(rank + 1)}


def batches(steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(9)
    return torch.randn(steps, W, 4, 3, generator=g).to(dtype), torch.randn(steps, W, 4, generator=g).to(dtype)


def loss_fn(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def local(p, x, y):
    fp = {"w": p["w"], "b": p["b"]}
    g = grad(loss_fn)(fp, x, y)
    return {"w": p["w"] - LR * g["w"], "b": p["b"] - LR * g["b"], "n": p["n"]}


def simulate_run(avg, steps, dtype=torch.float32, same=False):
    stacked = simulate.stack([start(r, dtype, same) for r in range(W)])
    x, y = batches(steps, dtype)
    state = vmap(avg.init)(stacked)
    run = vmap(lambda p, s, xb, yb, step: avg.update(local(p, xb, yb), s, step), in_dims=(0, 0, 0, 0, None))
    history = []
    for step in range(steps):
        before = stacked
        stacked, state = run(stacked, state, x[step], y[step], step)
        history.append((before, stacked))
    return history, state


@pytest.mark.parametrize("period, warmup", [(1, 0), (2, 1), (3, 2), (4, 0)])
@pytest.mark.parametrize("weight", [1.0, 7, torch.tensor(2.5)])
def test_equal_weights_are_plain_averaging_bit_for_bit(period, warmup, weight):
    mean = simulate.replica_mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = avgfn.periodic(period, reduce=mean, warmup_steps=warmup)
    got, state = simulate_run(weighted(period, reduce=mean, weight=weight, warmup_steps=warmup), 9)
    want, ref_state = simulate_run(plain, 9)
    for (_, a), (_, b) in zip(got, want):
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"])
    assert state.rounds.tolist() == ref_state.rounds.tolist()


def test_the_weighted_mean_is_sum_w_x_over_sum_w():
    avg = weighted(3, reduce=simulate.replica_mean(), weight=lambda p, step: p["n"] * (step + 1))
    history, state = simulate_run(avg, 7, torch.float64)
    for step in (0, 3, 6):
        before, after = history[step]
        x, y = batches(7, torch.float64)
        trained = vmap(local)(before, x[step], y[step])
        w = (torch.arange(1, W + 1) * (step + 1)).double()
        for key in ("w", "b"):
            want = (w.view(-1, *[1] * (trained[key].dim() - 1)) * trained[key]).sum(0) / w.sum()
            for r in range(W):
                torch.testing.assert_close(after[key][r], want, rtol=1e-13, atol=1e-14)
        assert torch.equal(after["n"], torch.arange(1, W + 1))  # the int leaf is not averaged
    assert state.rounds.tolist() == [3] * W and state.skipped.tolist() == [0] * W


def test_fedavg_is_weighted_after_every_period_local_steps():
    mean = simulate.replica_mean()
    a, _ = simulate_run(fedavg(3, reduce=mean, weight=lambda p, s: p["n"]), 8)
    b, _ = simulate_run(weighted(3, reduce=mean, weight=lambda p, s: p["n"], warmup_steps=2), 8)
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x["w"], y["w"])
    for step, (_, x) in enumerate(a):
        agree = torch.equal(x["w"][0], x["w"][1])
        assert agree == ((step + 1) % 3 == 0)


@pytest.mark.parametrize("server_lr, server_momentum", [(1.0, 0.0), (0.7, 0.0), (1.0, 0.9), (0.5, 0.5)])
def test_fedavgm_is_flowers_server_update(server_lr, server_momentum):
    avg = fedavgm(2, reduce=simulate.replica_mean(), weight=lambda p, s: p["n"], server_lr=server_lr,
                  server_momentum=server_momentum)  # fmt: skip
    history, state = simulate_run(avg, 8, torch.float64, same=True)
    x, y = batches(8, torch.float64)
    server = {k: v.clone() for k, v in start(0, torch.float64, same=True).items() if k != "n"}
    momentum = None
    n = torch.arange(1, W + 1).double()
    for step, (before, after) in enumerate(history):
        if (step + 1) % 2:
            continue
        trained = vmap(local)(before, x[step], y[step])
        # Flower's FedAvgM.aggregate_fit: pseudo-gradient, momentum, SGD
        fedavg_result = {k: (n.view(-1, *[1] * server[k].dim()) * trained[k]).sum(0) / n.sum() for k in server}
        pseudo = {k: server[k] - fedavg_result[k] for k in server}
        if server_momentum > 0:
            momentum = pseudo if momentum is None else {k: server_momentum * momentum[k] + pseudo[k] for k in server}
            pseudo = momentum
        server = {k: server[k] - server_lr * pseudo[k] for k in server}
        for k in server:
            for r in range(W):
                torch.testing.assert_close(after[k][r], server[k], rtol=1e-12, atol=1e-13)
    assert state.rounds.tolist() == [4] * W


def test_weights_travel_with_the_same_reduce():
    reduce = RecordingReduce()
    avg = weighted(1, reduce=reduce, weight=3.0)
    params = {"w": torch.ones(2, dtype=torch.float16)}
    new, _ = avg.update(params, avg.init(params), 0)
    assert reduce.calls == 2
    assert reduce.inputs[0].dtype == torch.float64 and reduce.inputs[0].tolist() == [3.0, 0.0]
    assert reduce.inputs[1].dtype == torch.float32  # half params are scaled in float32
    assert new["w"].dtype == torch.float16 and torch.equal(new["w"], params["w"])


# --- bad weights ------------------------------------------------------------------------


def test_bad_constant_weights_are_refused_at_construction():
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            weighted(2, reduce=lambda t: t, weight=bad)
    with pytest.raises(TypeError, match="got bool"):
        weighted(2, reduce=lambda t: t, weight=True)
    with pytest.raises(TypeError, match="one-element real tensor"):
        weighted(2, reduce=lambda t: t, weight=torch.ones(2))
    with pytest.raises(TypeError, match="weight must be a number, a one-element tensor, or a callable"):
        weighted(2, reduce=lambda t: t, weight="3")
    with pytest.raises(ValueError, match="invalid_weights must be one of"):
        weighted(2, reduce=lambda t: t, weight=1.0, invalid_weights="ignore")
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip', 'ignore'\) for this averager"):
        weighted(2, reduce=lambda t: t, weight=1.0, round=avgfn.Round(nonfinite="exclude"))
    with pytest.raises(ValueError, match="period must be >= 1"):
        weighted(0, reduce=lambda t: t, weight=1.0)
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip'\) for this averager"):
        fedavgm(2, reduce=lambda t: t, weight=1.0, round=avgfn.Round(nonfinite="exclude"))
    with pytest.raises(ValueError, match="server_momentum must be >= 0"):
        fedavgm(2, reduce=lambda t: t, weight=1.0, server_momentum=-0.1)


def avg_state(params):
    return fedavgm(2, reduce=lambda t: t, weight=1.0).init(params)


@pytest.mark.parametrize("value", [-2.0, math.nan, 0.0])
def test_invalid_weights_raise_on_every_replica_and_change_nothing(value):
    # a group of one: a negative or NaN weight is invalid, and so is an all-zero round
    avg = weighted(1, reduce=lambda t: t, weight=lambda p, s: value)
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    with pytest.raises(ValueError, match="invalid weights at step 0"):
        avg.update(params, state, 0)
    assert int(state.rounds) == 0
    with pytest.raises(ValueError, match="invalid weights at step 1"):
        fedavgm(2, reduce=lambda t: t, weight=lambda p, s: value).update(params, avg_state(params), 1)


def test_a_peer_with_a_negative_weight_makes_everyone_skip():
    weights = torch.tensor([1, -1, 2, 1])
    avg = weighted(1, reduce=simulate.replica_mean(), weight=lambda p, s: p["n"], invalid_weights="skip")
    stacked = {"w": torch.arange(8.0).view(4, 2), "n": weights}
    state = vmap(avg.init)(stacked)
    new, state = vmap(avg.update, in_dims=(0, 0, None))(stacked, state, 0)
    assert torch.equal(new["w"], stacked["w"]) and state.skipped.tolist() == [1] * 4
    # "raise" under vmap cannot raise: it skips the same way
    avg = weighted(1, reduce=simulate.replica_mean(), weight=lambda p, s: p["n"])
    new, state = vmap(avg.update, in_dims=(0, 0, None))(stacked, vmap(avg.init)(stacked), 0)
    assert torch.equal(new["w"], stacked["w"]) and state.skipped.tolist() == [1] * 4
    # zero weights on some replicas are fine: those replicas do not count
    stacked["n"] = torch.tensor([0, 0, 1, 3])
    new, state = vmap(avg.update, in_dims=(0, 0, None))(stacked, vmap(avg.init)(stacked), 0)
    torch.testing.assert_close(new["w"], torch.tensor([[5.5, 6.5]] * 4))
    assert isinstance(state, WeightedState)


def test_nonfinite_params_raise_naming_the_leaf():
    avg = weighted(1, reduce=lambda t: t, weight=1.0)
    params = {"w": torch.tensor([1.0, math.nan]), "v": torch.ones(1)}
    with pytest.raises(NonFiniteError, match="at step 0: this replica holds non-finite values at \\['w'\\]"):
        avg.update(params, avg.init(params), 0)


def test_a_round_skipped_for_its_weights_does_not_check_params_it_did_not_average():
    # every replica skips for the peer's negative weight: the one holding a NaN
    # must skip too, not raise alone while its peers go on
    def peer(t):  # the peer hands in an invalid weight ([weight, invalid flag], float64)
        return torch.tensor([-1.0, 1.0], dtype=t.dtype) if t.dtype == torch.float64 else t

    avg = weighted(1, reduce=avgfn.testing.peers_mean(peer), weight=1.0, invalid_weights="skip")
    params = {"w": torch.tensor([1.0, math.nan])}
    new, state = avg.update(params, avg.init(params), 0)
    assert new["w"] is params["w"] or torch.equal(new["w"].nan_to_num(), params["w"].nan_to_num())
    assert int(state.skipped) == 1


def test_a_round_skipped_for_nonfinite_params_is_counted():
    avg = weighted(1, reduce=lambda t: t, weight=1.0, round=avgfn.Round(nonfinite="skip"))
    params = {"w": torch.tensor([1.0, math.nan])}
    new, state = avg.update(params, avg.init(params), 0)
    assert int(state.skipped) == 1 and int(state.rounds) == 1
    assert torch.equal(new["w"].nan_to_num(), params["w"].nan_to_num())
    _, state = avg.update({"w": torch.ones(2)}, state, 1)
    assert int(state.skipped) == 1 and int(state.rounds) == 2
