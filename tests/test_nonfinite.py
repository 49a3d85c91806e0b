"""Non-finite params: raise by default, exclude on request, never spread a NaN."""

from __future__ import annotations

import math
import re

import pytest
import torch

import avgfn
from avgfn import simulate
from avgfn.testing import RecordingReduce, peers_mean

NAN = float("nan")


def _params(bad=None):
    params = {"a": torch.ones(3), "b": {"c": torch.full((2,), 2.0)}, "i": torch.arange(2)}
    if bad == "b":
        params["b"]["c"] = torch.tensor([2.0, NAN])
    return params


def _same(x, y):
    return torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0))


def test_raise_names_the_local_leaf_and_changes_nothing():
    params = _params("b")
    avg = avgfn.periodic(2, reduce=lambda t: t, warmup_steps=4)
    state = avg.init(params)
    with pytest.raises(avgfn.NonFiniteError, match=re.escape(
        "at step 4: this replica holds non-finite values at ['b']['c']; nothing was averaged"
    )) as info:
        avg.update(params, state, 4)
    assert info.value.step == 4 and info.value.paths == ("['b']['c']",)
    assert _same(params["b"]["c"], torch.tensor([2.0, NAN])) and int(state.rounds) == 0


def test_raise_when_a_peer_is_not_finite():
    reduce = peers_mean(lambda t: t + math.inf)
    with pytest.raises(avgfn.NonFiniteError, match=re.escape(
        "the group's mean is non-finite at ['a'], ['b']['c']: a peer replica holds"
    )) as info:
        avgfn.average(_params(), reduce)
    assert info.value.paths == ()


def test_ignore_lets_torch_behaviour_through():
    out = avgfn.average(_params("b"), lambda t: t, round=avgfn.Round(nonfinite="ignore"))
    assert math.isnan(out["b"]["c"][1].item())


def test_default_costs_no_extra_collective():
    reduce = RecordingReduce()
    avgfn.average(_params(), reduce)
    assert reduce.calls == 1


def test_donation_exchanges_health_first_and_writes_nothing():
    params = _params("b")
    before = params["a"].clone()
    reduce = RecordingReduce()
    with pytest.raises(avgfn.NonFiniteError, match="this replica holds non-finite values at"):
        avgfn.average(params, reduce, round=avgfn.Round(donate=True))
    assert reduce.calls == 1 and reduce.inputs[0].tolist() == [1.0, 0.0, 1.0]  # only the flags moved (unhealthy, healthy, no room)
    assert torch.equal(params["a"], before)


def test_policy_is_validated():
    with pytest.raises(ValueError, match=re.escape("nonfinite must be one of ('raise', 'skip', 'exclude', 'ignore'), got 'drop'")):
        avgfn.periodic(2, reduce=lambda t: t, round=avgfn.Round(nonfinite="drop"))
    with pytest.raises(ValueError, match=re.escape("nonfinite must be one of ('raise', 'skip', 'exclude') for this averager")):
        avgfn.diloco(2, reduce=lambda t: t, round=avgfn.Round(nonfinite="ignore"))


def _stacked(bad_replica=None):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 5, generator=g)
    b = torch.randn(4, 2, generator=g).double()
    if bad_replica is not None:
        w[bad_replica, 1] = NAN
    return {"w": w, "b": b}


@pytest.mark.parametrize("group_size", [None, 2])
def test_exclude_under_vmap_matches_a_hand_computation(group_size):
    params = _stacked(bad_replica=2)
    avg = avgfn.periodic(2, reduce=simulate.replica_mean(group_size), round=avgfn.Round(nonfinite="exclude"))
    state = torch.func.vmap(avg.init)(params)
    new, _ = torch.func.vmap(avg.update, in_dims=(0, 0, None))(params, state, 0)
    size = group_size or 4
    for r in range(4):
        group = range(r // size * size, r // size * size + size)
        healthy = [g for g in group if g != 2]
        for k in params:
            expected = sum(params[k][g] for g in healthy) / len(healthy)
            assert torch.allclose(new[k][r], expected, rtol=1e-6, atol=1e-7), (r, k)


def test_exclude_equals_plain_mean_when_all_healthy():
    params = _stacked()
    plain = avgfn.periodic(2, reduce=simulate.replica_mean(), round=avgfn.Round(nonfinite="ignore"))
    excl = avgfn.periodic(2, reduce=simulate.replica_mean(), round=avgfn.Round(nonfinite="exclude"))
    run = lambda a: torch.func.vmap(a.update, in_dims=(0, 0, None))(params, torch.func.vmap(a.init)(params), 0)[0]  # noqa: E731
    for k, v in run(plain).items():
        assert torch.equal(v, run(excl)[k])


def test_raise_under_vmap_keeps_each_replica_where_the_mean_is_not_finite():
    params = _stacked(bad_replica=1)
    avg = avgfn.periodic(2, reduce=simulate.replica_mean(2))
    new, _ = torch.func.vmap(avg.update, in_dims=(0, 0, None))(params, torch.func.vmap(avg.init)(params), 0)
    # group {0, 1} holds the NaN: both keep their own "w"; "b" is finite and averaged
    assert _same(new["w"][0], params["w"][0]) and _same(new["w"][1], params["w"][1])
    assert torch.allclose(new["b"][0], (params["b"][0] + params["b"][1]) / 2)
    # group {2, 3} is healthy and averaged
    assert torch.allclose(new["w"][2], (params["w"][2] + params["w"][3]) / 2)


def test_exclude_with_no_healthy_replica_raises_eagerly():
    with pytest.raises(avgfn.NonFiniteError, match="nonfinite='exclude'"):
        avgfn.average(_params("b"), lambda t: t, round=avgfn.Round(nonfinite="exclude"))


def test_an_excluded_replica_sends_none_of_its_carried_rounding_error():
    # this replica is unhealthy and carries a residual of 0.25 per element; its
    # healthy peer holds 3.0: the mean of the healthy replicas is the peer's 3.0
    def peer(t):
        if t.numel() == 3 and t.dtype == torch.float32:  # the health flags: healthy, with room
            return torch.tensor([0.0, 1.0, 0.0])
        return torch.full_like(t, 3.0)

    rnd = avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True, nonfinite="exclude")
    avg = avgfn.periodic(1, reduce=avgfn.testing.peers_mean(peer), round=rnd)
    params = {"w": torch.tensor([1.0, NAN, 2.0])}
    state = avg.init(params)
    state = state.replace(residual=(torch.full((3,), 0.25),))
    new, after = avg.update(params, state, 0)
    assert new["w"].tolist() == [3.0, 3.0, 3.0]
    assert after.residual[0].tolist() == [0.25] * 3  # kept for the next round it takes part in


def test_the_one_pass_finiteness_test_of_the_outer_step_is_exact():
    # one read per tensor (aminmax): huge finite values are finite, any inf or NaN is caught
    from avgfn._algorithms.outer import all_finite

    big = torch.full((8,), 3e38)  # finite elements whose float32 sum overflows
    assert bool(all_finite([big])) and bool(all_finite([big, -big]))
    assert bool(all_finite([torch.full((4096,), 65504.0, dtype=torch.float16)]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(1000)
        x[517] = bad
        assert not bool(all_finite([torch.ones(3), x]))
    pair = torch.tensor([float("inf"), -float("inf")])  # their sum is NaN, not a finite number
    assert not bool(all_finite([pair]))
    assert bool(all_finite([torch.arange(5), torch.empty(0)]))  # no float element to test
    assert not bool(all_finite([torch.tensor([1 + 1j, complex("nan")])]))
