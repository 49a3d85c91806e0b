"""Unit tests of avgfn.average and the averagers' schedules, with fake Reduces."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch

import avgfn
from avgfn.testing import RecordingReduce, peers_mean


def test_single_call_promoted_dtype_and_layout():
    params = {
        "a": torch.ones(2, 3, dtype=torch.float16),
        "b": torch.full((4,), 2.0, dtype=torch.bfloat16),
        "c": torch.tensor(3.0, dtype=torch.float32),
    }
    reduce = RecordingReduce()
    new = avgfn.average(params, reduce)
    assert reduce.calls == 1
    flat = reduce.inputs[0]
    assert flat.dtype == torch.float32  # promote(fp16, bf16, fp32), as torch.cat gives
    assert flat.tolist() == [1.0] * 6 + [2.0] * 4 + [3.0]
    for k in params:
        assert new[k].dtype == params[k].dtype and new[k].shape == params[k].shape
        assert new[k] is not params[k]
        assert torch.equal(new[k], params[k])


def test_mean_is_taken_in_the_promoted_dtype():
    # 1 + 2**-12 is not a float16 value, but the mean of (1, 1 + 2**-11) in fp32 is exact
    params = {"h": torch.tensor([1.0], dtype=torch.float16), "d": torch.tensor([0.0], dtype=torch.float64)}
    reduce = peers_mean(lambda t: t + 2.0**-40)
    new = avgfn.average(params, reduce)
    assert new["d"].item() == 2.0**-41  # computed in float64, kept in float64
    assert new["h"].dtype == torch.float16


def test_tree_shapes_and_passthrough():
    w = torch.randn(3)
    idx = torch.arange(4)
    params = {"layers": [w, (torch.tensor(1.5), torch.empty(0))], "idx": idx, "name": "x", "n": 3}
    reduce = RecordingReduce(lambda t: t * 0 + 7)
    new = avgfn.average(params, reduce)
    assert new["idx"] is idx and new["name"] == "x" and new["n"] == 3
    assert torch.equal(new["layers"][0], torch.full((3,), 7.0))
    assert new["layers"][1][0].shape == () and new["layers"][1][0].item() == 7.0
    assert new["layers"][1][1].shape == (0,)
    assert isinstance(new["layers"], list) and isinstance(new["layers"][1], tuple)
    assert reduce.inputs[0].numel() == 4


def test_nothing_selected_calls_no_reduce():
    params = {"idx": torch.arange(3), "n": 1}
    reduce = RecordingReduce()
    assert avgfn.average(params, reduce) is params
    assert reduce.calls == 0


def test_where_tree_and_callable():
    params = {"a": torch.ones(2), "b": torch.ones(3), "i": torch.arange(2)}
    reduce = RecordingReduce(lambda t: t * 2)
    new = avgfn.average(params, reduce, where={"a": False, "b": True, "i": True})
    assert new["a"] is params["a"]
    assert new["b"].tolist() == [2.0] * 3
    # integer leaves selected explicitly: mean in the default float dtype, cast back
    assert reduce.inputs[0].dtype == torch.float32 and new["i"].dtype == torch.int64
    assert new["i"].tolist() == [0, 2]
    new = avgfn.average(params, RecordingReduce(), where=lambda p: p.numel() == 2)
    assert new["b"] is params["b"] and new["a"] is not params["a"]


def test_where_matches_torch_grad_filter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0](torch.ones(1, 2)).sum().backward()
    params = dict(model.named_parameters())
    reduce = RecordingReduce()
    new = avgfn.average(params, reduce, where=lambda p: p.grad is not None)
    assert new["1.weight"] is params["1.weight"] and new["1.bias"] is params["1.bias"]
    assert new["0.weight"] is not params["0.weight"]
    assert reduce.inputs[0].numel() == 6


def test_live_parameters_keep_requires_grad_and_graph_is_cut():
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    new = avgfn.average(params, peers_mean(lambda t: t + 1))
    for k, p in params.items():
        assert new[k].requires_grad and new[k].grad_fn is None
        assert not isinstance(new[k], torch.nn.Parameter)
        assert torch.allclose(new[k], p.detach() + 0.5)


def test_reduce_result_is_checked():
    params = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="shaped like its input"):
        avgfn.average(params, lambda t: t[:1])
    with pytest.raises(TypeError, match="must return a Tensor"):
        avgfn.average(params, lambda t: t.tolist())


def _due(avg, steps):
    params = {"w": torch.zeros(1)}
    state = avg.init(params)
    due = []
    for step in range(steps):
        new, state = avg.update(params, state, step)
        if new is not params:
            due.append(step)
    return due, state


def _torch_periodic_schedule(period, warmup, steps):
    return [s for s in range(steps) if s >= warmup and (s - warmup) % period == 0]


@pytest.mark.parametrize("period,warmup", [(1, 0), (2, 0), (4, 13), (3, 5), (5, 0), (7, 2)])
def test_periodic_schedule(period, warmup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        avg = avgfn.periodic(period, reduce=lambda t: t, warmup_steps=warmup)
    due, state = _due(avg, 40)
    assert due == _torch_periodic_schedule(period, warmup, 40)
    assert int(state.rounds) == len(due)


def test_hierarchical_schedule_and_levels():
    reduces = [RecordingReduce() for _ in range(3)]
    avg = avgfn.hierarchical(OrderedDict(zip([2, 4, 8], reduces)), warmup_steps=5)
    due, state = _due(avg, 33)
    assert due == [6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]
    # largest dividing period wins, not offset by the warm-up
    assert [r.calls for r in reduces] == [7, 3, 4]  # 8 | {8,16,24,32}; 4 | {12,20,28}
    assert state.rounds.tolist() == [7, 3, 4]


def test_hierarchical_accepts_pairs():
    a, b = RecordingReduce(), RecordingReduce()
    avg = avgfn.hierarchical([(3, a), (6, b)], warmup_steps=7)
    due, _ = _due(avg, 20)
    assert due == [9, 12, 15, 18] and (a.calls, b.calls) == (2, 2)


def test_off_step_calls_nothing_and_returns_inputs():
    reduce = RecordingReduce()
    avg = avgfn.periodic(4, reduce=reduce, warmup_steps=2)
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    for step in (0, 1, 3, 4, 5, 7):
        new, new_state = avg.update(params, state, step)
        assert new is params and new_state is state
    assert reduce.calls == 0


def test_step_accepts_index_types_and_rejects_others():
    avg = avgfn.periodic(2, reduce=lambda t: t)
    params = {"w": torch.ones(1)}
    state = avg.init(params)
    avg.update(params, state, torch.tensor(2))  # a 0-d int tensor is an index
    with pytest.raises(TypeError, match="step must be an int, got float 1.0"):
        avg.update(params, state, 1.0)
    with pytest.raises(TypeError, match="step must be an int, got bool"):
        avg.update(params, state, True)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        avg.update(params, state, -1)


def test_state_type_is_checked():
    p = avgfn.periodic(2, reduce=lambda t: t)
    h = avgfn.hierarchical([(2, lambda t: t)])
    params = {"w": torch.ones(1)}
    with pytest.raises(TypeError, match="state must be a PeriodicState"):
        p.update(params, h.init(params), 0)
    with pytest.raises(TypeError, match="state must be a HierarchicalState"):
        h.update(params, p.init(params), 0)


def test_records_are_frozen_and_registered():
    import torch.utils._pytree as pytree

    state = avgfn.periodic(2, reduce=lambda t: t).init({"w": torch.zeros(1)})
    with pytest.raises(Exception):
        state.rounds = torch.ones(())
    paths = pytree.tree_flatten_with_path(state)[0]
    assert [pytree.keystr(p) for p, _ in paths] == [".rounds"]
    hstate = avgfn.hierarchical([(1, lambda t: t), (2, lambda t: t)]).init({"w": torch.zeros(1)})
    assert pytree.tree_map(lambda x: x + 1, hstate).rounds.tolist() == [1, 1]
    assert state.replace(rounds=torch.ones((), dtype=torch.int64)).rounds.item() == 1


def test_params_may_be_a_registered_record():
    import collections

    Layer = collections.namedtuple("Layer", ["weight", "bias"])  # registered by torch's pytree
    params = {"layers": [Layer(torch.ones(2, 2), torch.zeros(2))], "scale": torch.tensor(2.0)}
    avg = avgfn.periodic(2, reduce=peers_mean(lambda t: t + 2))
    new, state = avg.update(params, avg.init(params), 0)
    assert isinstance(new["layers"][0], Layer)
    assert torch.equal(new["layers"][0].weight, torch.full((2, 2), 2.0))
    assert torch.equal(new["layers"][0].bias, torch.ones(2))
    assert new["scale"].item() == 3.0
