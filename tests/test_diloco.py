"""DiLoCo: its identity with periodic averaging, its outer step, its failure policy,
its checks, and the inner optimizer state at a sync (keep / average / reset)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch.func import grad, vmap

import avgfn
from avgfn import optim, simulate
from avgfn import with_averaging
from avgfn import DiLoCoState, diloco
from avgfn import NonFiniteError
from avgfn import sync_inner_state, with_inner_state
from avgfn import streaming_diloco
from avgfn.testing import RecordingReduce, peers_mean

W = 3
LR = 0.1


def start(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(4, generator=g).to(dtype), "b": torch.zeros((), dtype=dtype)}


def batches(steps, world=W, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(steps, world, 6, 4, generator=g).to(dtype)
    y = torch.randn(steps, world, 6, generator=g).to(dtype)
    return x, y


def loss_fn(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def local(p, x, y):
    g = grad(loss_fn)(p, x, y)
    return {k: v - LR * g[k] for k, v in p.items()}


def simulate_run(avg, steps, dtype=torch.float64, world=W):
    """``world`` replicas from the same start, each on its own data, under vmap."""
    stacked = simulate.stack([start(dtype) for _ in range(world)])
    x, y = batches(steps, world, dtype)
    state = vmap(avg.init)(stacked)

    def step_fn(p, s, xb, yb, step):
        return avg.update(local(p, xb, yb), s, step)

    run = vmap(step_fn, in_dims=(0, 0, 0, 0, None))
    history = []
    for step in range(steps):
        stacked, state = run(stacked, state, x[step], y[step], step)
        history.append(stacked)
    return history, state


# --- identities -------------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 2, 3, 4, 5])
def test_outer_sgd_lr_one_is_periodic_averaging(period):
    steps = 13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # periodic(1) warns, as torch does
        ref = avgfn.periodic(period, reduce=simulate.replica_mean(), warmup_steps=period - 1)
    got, state = simulate_run(diloco(period, reduce=simulate.replica_mean(), outer_optimizer=optim.sgd(1.0)), steps)
    want, ref_state = simulate_run(ref, steps)
    for step in range(steps):
        for key in ("w", "b"):
            torch.testing.assert_close(got[step][key], want[step][key], rtol=1e-12, atol=1e-13)
    assert state.rounds.tolist() == ref_state.rounds.tolist() == [steps // period] * W
    # between rounds the replicas differ; at a round they agree
    for step in range(steps):
        agree = all(torch.equal(got[step]["w"][0], got[step]["w"][r]) for r in range(W))
        assert agree == ((step + 1) % period == 0), step


def test_off_steps_return_the_inputs_and_call_no_reduce():
    reduce = RecordingReduce()
    avg = diloco(3, reduce=reduce)
    params = start()
    state = avg.init(params)
    for step in (0, 1, 3, 4, 6):
        new, new_state = avg.update(params, state, step)
        assert new is params and new_state is state
    assert reduce.calls == 0
    new, new_state = avg.update(params, state, 5)
    assert reduce.calls == 1 and new is not params and int(new_state.rounds) == 1


# --- the outer step ---------------------------------------------------------------------


def _torch_outer(opt_cls, kwargs, rounds, world_pgs):
    """torch's optimizer on the global params, with the averaged pseudo-gradient as .grad."""
    glob = [torch.nn.Parameter(t.clone()) for t in start().values()]
    opt = opt_cls(glob, **kwargs)
    for pgs in world_pgs[:rounds]:
        for p, g in zip(glob, pgs):
            p.grad = g
        opt.step()
    return [p.detach() for p in glob]


@pytest.mark.parametrize(
    "make, torch_opt",
    [
        (lambda: None, (torch.optim.SGD, {"lr": 0.7, "momentum": 0.9, "nesterov": True})),
        (lambda: optim.adamw(0.05), (torch.optim.AdamW, {"lr": 0.05})),
        (lambda: optim.sgd(0.5, momentum=0.8), (torch.optim.SGD, {"lr": 0.5, "momentum": 0.8})),
    ],
)
def test_outer_step_equals_torch_optimizers_on_the_averaged_pseudo_gradient(make, torch_opt):
    # One peer whose pseudo-gradient is a fixed function of ours; the averaged
    # pseudo-gradient the Reduce returns is recorded and handed to torch.
    reduce = RecordingReduce(peers_mean(lambda t: 0.5 * t + 0.01))
    outer = make()
    avg = diloco(2, reduce=reduce, outer_optimizer=outer)
    params = start()
    state = avg.init(params)
    x, y = batches(8, 1)
    averaged = []
    for step in range(8):
        params, state = avg.update(local(params, x[step, 0], y[step, 0]), state, step)
        if (step + 1) % 2 == 0:
            flat = reduce.outputs[-1]
            averaged.append([flat[:4].view(4), flat[4:].view(())])
    want = _torch_outer(*torch_opt, 4, averaged)
    for got, ref in zip(state.global_params, want):
        assert torch.equal(got, ref)
    assert torch.equal(params["w"], want[0]) and torch.equal(params["b"], want[1])


def test_pseudo_gradient_is_global_minus_local():
    reduce = RecordingReduce()
    avg = diloco(1, reduce=reduce, outer_optimizer=optim.sgd(0.25))
    params = {"w": torch.tensor([1.0, 2.0])}
    state = avg.init(params)
    new, state = avg.update({"w": torch.tensor([0.0, 4.0])}, state, 0)
    assert torch.equal(reduce.inputs[0], torch.tensor([1.0, -2.0]))
    assert torch.equal(new["w"], torch.tensor([0.75, 2.5]))


def test_global_copy_is_float32_for_half_params_and_the_wire_dtype_is_honoured():
    reduce = RecordingReduce()
    avg = diloco(2, reduce=reduce, round=avgfn.Round(comm_dtype=torch.bfloat16), outer_optimizer=optim.sgd(1.0))
    params = {"h": torch.ones(3, dtype=torch.bfloat16), "d": torch.ones(2, dtype=torch.float64)}
    state = avg.init(params)
    assert [g.dtype for g in state.global_params] == [torch.float32, torch.float64]
    local_p = {"h": params["h"] - 0.5, "d": params["d"] - 0.25}
    new, state = avg.update(local_p, state, 1)
    assert reduce.inputs[0].dtype == torch.bfloat16
    assert new["h"].dtype == torch.bfloat16 and new["d"].dtype == torch.float64
    assert torch.equal(new["h"], local_p["h"]) and torch.equal(new["d"], local_p["d"])
    assert state.global_params[0].dtype == torch.float32


def test_where_leaves_other_leaves_alone():
    def where(leaf):
        return isinstance(leaf, torch.Tensor) and leaf.dim() > 0

    avg = diloco(1, reduce=lambda t: t * 0, where=where, outer_optimizer=optim.sgd(1.0))
    params = {"w": torch.ones(2), "s": torch.tensor(5.0), "tag": 3}
    state = avg.init(params)
    assert len(state.global_params) == 1
    new, _ = avg.update({"w": torch.zeros(2), "s": torch.tensor(6.0), "tag": 3}, state, 0)
    assert torch.equal(new["w"], torch.ones(2))  # pg averaged to 0: back to the global params
    assert new["s"].item() == 6.0 and new["tag"] == 3


def test_init_checks_the_structure_and_the_first_round_the_global_copy():
    class Checking(avgfn.ForwardingReduce):
        def __init__(self, inner):
            super().__init__(inner)
            self.checks = []

        def agree(self, digest, entries):
            self.checks.append(entries())

    reduce = Checking(lambda t: t)
    params = {"w": torch.ones(2), "count": torch.tensor(3)}
    avg = diloco(2, reduce=reduce, round=avgfn.Round(agree=False))
    state = avg.init(params)
    # init compares the structure of the selected leaves only: a resume builds
    # its template from mid-period params, which differ between replicas
    assert reduce.checks == [[("['w']", "(2,) torch.float32"), ("['count']", "NoneType")]]
    assert state.global_params[0] is not params["w"] and torch.equal(state.global_params[0], params["w"])
    local = {"w": torch.full((2,), 0.5), "count": torch.tensor(4)}
    same, same_state = avg.update(local, state, 0)  # an off-step checks nothing
    assert same is local and same_state is state
    assert len(reduce.checks) == 1
    # the first round compares the values of the global copy (not the local params)
    _, state = avg.update(local, state, 1)
    assert len(reduce.checks) == 2
    first_round = reduce.checks[1]
    assert first_round[:2] == [("['w']", "(2,) torch.float32"), ("['count']", "NoneType")]
    assert first_round[2][0] == "<values>"
    # ... once: later rounds keep the copies equal
    avg.update(local, state, 3)
    assert len(reduce.checks) == 2
    reduce.checks.clear()
    quiet = diloco(2, reduce=reduce, round=avgfn.Round(verify=None, agree=False))
    quiet.update(local, quiet.init(params), 1)
    assert reduce.checks == []
    structure = diloco(2, reduce=reduce, round=avgfn.Round(verify="structure", agree=False))
    structure.update(local, structure.init(params), 1)
    assert len(reduce.checks) == 1 and reduce.checks[0][-1][0] != "<values>"


# --- non-finite pseudo-gradients --------------------------------------------------------


def _after(avg, bad_local, step=1):
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    return params, state, avg.update(bad_local, state, step)


def test_nonfinite_raise_is_the_default_and_changes_nothing():
    avg = diloco(2, reduce=lambda t: t)
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    bad = {"w": torch.tensor([0.5, math.nan])}
    message = "at step 1: diloco: the averaged pseudo-gradient is not finite"
    with pytest.raises(NonFiniteError, match=re.escape(message)) as info:
        avg.update(bad, state, 1)
    assert info.value.step == 1
    assert int(state.rounds) == 0 and torch.equal(state.global_params[0], torch.ones(2))
    assert math.isnan(bad["w"][1].item())


def test_nonfinite_raise_when_only_a_peer_is_not_finite():
    avg = diloco(2, reduce=peers_mean(lambda t: t + math.inf))
    params = {"w": torch.ones(2)}
    with pytest.raises(NonFiniteError):
        avg.update({"w": torch.zeros(2)}, avg.init(params), 1)


def test_nonfinite_raise_on_an_outer_step_that_overflows():
    avg = diloco(1, reduce=lambda t: t, outer_optimizer=optim.sgd(3e38))
    params = {"w": torch.ones(2)}
    with pytest.raises(NonFiniteError, match="outer optimizer step made the global params non-finite"):
        avg.update({"w": torch.full((2,), -2.0)}, avg.init(params), 0)


def test_nonfinite_skip_keeps_the_global_params_and_restarts_local_from_them():
    avg = diloco(2, reduce=lambda t: t, round=avgfn.Round(nonfinite="skip"))
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    good, state = avg.update({"w": torch.full((2,), 0.5)}, state, 1)
    kept = [g.clone() for g in state.global_params]
    momentum = state.outer.momentum_buffer[0].clone()
    new, state2 = avg.update({"w": torch.tensor([0.0, math.inf])}, state, 3)
    assert torch.equal(state2.global_params[0], kept[0])
    assert torch.equal(state2.outer.momentum_buffer[0], momentum) and int(state2.outer.step) == 1
    assert torch.equal(new["w"], kept[0])
    assert (int(state2.rounds), int(state2.skipped)) == (2, 1)


def test_nonfinite_raise_skips_under_vmap_and_all_replicas_agree():
    avg = diloco(1, reduce=simulate.replica_mean(), outer_optimizer=optim.sgd(1.0))
    stacked = {"w": torch.ones(3, 2)}
    state = vmap(avg.init)(stacked)
    bad = {"w": torch.tensor([[0.0, 0.0], [math.nan, 0.0], [0.0, 0.0]])}
    new, state = vmap(avg.update, in_dims=(0, 0, None))(bad, state, 0)
    assert torch.equal(new["w"], torch.ones(3, 2))
    assert state.skipped.tolist() == [1, 1, 1] and torch.equal(state.global_params[0], torch.ones(3, 2))


def test_nonfinite_exclude_averages_the_healthy_replicas():
    avg = diloco(1, reduce=simulate.replica_mean(), outer_optimizer=optim.sgd(1.0), round=avgfn.Round(nonfinite="exclude"))
    stacked = {"w": torch.zeros(3, 2)}
    state = vmap(avg.init)(stacked)
    local_p = {"w": torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, 4.0]])}
    new, state = vmap(avg.update, in_dims=(0, 0, None))(local_p, state, 0)
    # every replica gets the healthy mean, the sick one too
    torch.testing.assert_close(new["w"], torch.tensor([[2.0, 3.0]] * 3))
    assert state.skipped.tolist() == [0, 0, 0]


# --- bad input --------------------------------------------------------------------------


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        diloco(0, reduce=lambda t: t)
    with pytest.raises(TypeError, match="period must be an int"):
        diloco(2.0, reduce=lambda t: t)
    with pytest.raises(TypeError, match="reduce must be a callable"):
        diloco(2, reduce=None)
    with pytest.raises(TypeError, match="outer_optimizer must be an avgfn.optim.Optimizer"):
        diloco(2, reduce=lambda t: t, outer_optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        diloco(2, reduce=lambda t: t, round=avgfn.Round(nonfinite="ignore"))
    with pytest.raises(ValueError, match="verify must be one of"):
        diloco(2, reduce=lambda t: t, round=avgfn.Round(verify="everything"))


def test_a_state_for_other_params_or_another_averager_is_refused():
    avg = diloco(1, reduce=lambda t: t)
    state = avg.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="has shape \\(3,\\) but its global copy in the state has shape \\(2,\\)"):
        avg.update({"w": torch.ones(3)}, state, 0)
    with pytest.raises(ValueError, match="global copy of 1 leaves but `where` selects 2"):
        avg.update({"w": torch.ones(2), "v": torch.ones(1)}, state, 0)
    with pytest.raises(TypeError, match="state must be a DiLoCoState made by diloco"):
        avg.update({"w": torch.ones(2)}, avgfn.periodic(2, reduce=lambda t: t).init({"w": torch.zeros(1)}), 0)
    assert isinstance(state, DiLoCoState)


# --- the inner optimizer state at a sync ------------------------------------------------


def _adam_state_after_steps(opt, params, steps=2):
    state = opt.init(params)
    for k in range(steps):
        params, state = opt.update({key: torch.full_like(v, k + 1.0) for key, v in params.items()}, state, params)
    return params, state


def test_sync_inner_state_keep_reset_average():
    opt = optim.adamw(0.1)
    before = {"a": torch.ones(2), "b": torch.ones(3)}
    before, state = _adam_state_after_steps(opt, before)
    after = {"a": torch.zeros(2), "b": before["b"]}  # only "a" synchronized
    assert sync_inner_state(state, before, after, policy="keep") is state
    assert sync_inner_state(state, before, before, policy="reset", optimizer=opt) is state

    reset = sync_inner_state(state, before, after, policy="reset", optimizer=opt)
    assert torch.equal(reset.exp_avg["a"], torch.zeros(2)) and torch.equal(reset.exp_avg_sq["a"], torch.zeros(2))
    assert reset.exp_avg["b"] is state.exp_avg["b"] and int(reset.step) == 2  # partial: step kept
    whole = sync_inner_state(state, before, {"a": after["a"], "b": before["b"] * 1}, policy="reset", optimizer=opt)
    assert int(whole.step) == 0  # every leaf synced: a fresh optimizer state

    copy = avgfn.state_dict(state)
    copy = {k: v.clone() for k, v in copy.items()}
    reduce = RecordingReduce(lambda t: t * 0 + 7.0)
    averaged = sync_inner_state(state, before, after, policy="average", reduce=reduce)
    assert reduce.calls == 2  # exp_avg, exp_avg_sq: the synchronized leaf of each
    assert torch.equal(averaged.exp_avg["a"], torch.full((2,), 7.0))
    assert averaged.exp_avg["b"] is state.exp_avg["b"] and averaged.step is state.step
    assert all(torch.equal(v, copy[k]) for k, v in avgfn.state_dict(state).items())  # input untouched


def test_sync_inner_state_bad_policy():
    opt = optim.sgd(0.1, momentum=0.9)
    p = {"a": torch.ones(1)}
    s = opt.init(p)
    with pytest.raises(ValueError, match="inner_state must be one of"):
        sync_inner_state(s, p, p, policy="drop")
    with pytest.raises(ValueError, match="needs reduce="):
        sync_inner_state(s, p, p, policy="average")
    with pytest.raises(TypeError, match="needs optimizer="):
        sync_inner_state(s, p, p, policy="reset")


def _train_with(policy, avg, reduce=None, steps=6):
    train = with_inner_state(optim.adamw(0.05), avg, policy, reduce=reduce)
    stacked = simulate.stack([start() for _ in range(W)])
    x, y = batches(steps)
    state = vmap(train.init)(stacked)

    def step_fn(p, s, xb, yb, step):
        g = grad(loss_fn)(p, xb, yb)
        return train.update(g, s, p, step)

    run = vmap(step_fn, in_dims=(0, 0, 0, 0, None))
    steps_seen = []
    for step in range(steps):
        stacked, state = run(stacked, state, x[step], y[step], step)
        steps_seen.append(state.optimizer.step.tolist())
    return stacked, state, steps_seen


def test_with_inner_state_policies_under_vmap():
    mean = simulate.replica_mean()
    _, kept, seen = _train_with("keep", diloco(3, reduce=mean))
    assert seen[-1] == [6] * W
    assert not torch.equal(kept.optimizer.exp_avg["w"][0], kept.optimizer.exp_avg["w"][1])
    _, reset, seen = _train_with("reset", diloco(3, reduce=mean))
    assert [s[0] for s in seen] == [1, 2, 0, 1, 2, 0]
    assert torch.equal(reset.optimizer.exp_avg["w"], torch.zeros(W, 4))
    _, averaged, seen = _train_with("average", diloco(3, reduce=mean), reduce=mean)
    assert seen[-1] == [6] * W
    for r in range(1, W):
        assert torch.equal(averaged.optimizer.exp_avg["w"][0], averaged.optimizer.exp_avg["w"][r])
    # a streaming fragment sync resets that fragment only; the step counter goes on
    _, partial, seen = _train_with("reset", streaming_diloco(4, reduce=mean, num_fragments=2))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5, 6]
    assert torch.equal(partial.optimizer.exp_avg["w"], torch.zeros(W, 4))  # "w" synced at step 5
    assert not torch.equal(partial.optimizer.exp_avg["b"], torch.zeros(W))  # "b" at step 3


def test_with_inner_state_equals_with_averaging_when_keeping():
    avg = diloco(2, reduce=lambda t: t)
    ours = with_inner_state(optim.sgd(0.1, momentum=0.9), avg, "keep")
    theirs = with_averaging(optim.sgd(0.1, momentum=0.9), avg)
    p1 = p2 = start()
    s1, s2 = ours.init(p1), theirs.init(p2)
    x, y = batches(5, 1)
    for step in range(5):
        g = grad(loss_fn)(p1, x[step, 0], y[step, 0])
        p1, s1 = ours.update(g, s1, p1, step)
        p2, s2 = theirs.update(g, s2, p2, step, skip=False)
        assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert avgfn.state_dict(s1).keys() == avgfn.state_dict(s2).keys()
