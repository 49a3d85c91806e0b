"""Streaming DiLoCo: the DiLoCo identity, the fragment schedule, overlap and mixing
against a reference written from the paper, the wire dtype, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import avgfn
from avgfn import optim, simulate
from avgfn import diloco
from avgfn import NonFiniteError
from avgfn import streaming_diloco
from avgfn._algorithms.streaming import split_fragments
from avgfn.testing import RecordingReduce

W = 3
LR = 0.1
SHAPES = {"a": (3,), "b": (2, 2), "c": (5,), "d": ()}


def start(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def batches(steps, world=W, dtype=torch.float32):
    g = torch.Generator().manual_seed(17)
    return torch.randn(steps, world, 4, generator=g).to(dtype)


def loss_fn(p, x):
    total = 0.0
    for k, v in p.items():
        total = total + ((v - x.mean() * (1 + len(k))) ** 2).sum() + (v.sum() * x[0]) ** 2
    return total


def local(p, x):
    g = grad(loss_fn)(p, x)
    return {k: v - LR * g[k] for k, v in p.items()}


def simulate_run(avg, steps, world=W, dtype=torch.float32):
    stacked = simulate.stack([start(dtype) for _ in range(world)])
    xs = batches(steps, world, dtype)
    state = vmap(avg.init)(stacked)
    run = vmap(lambda p, s, x, step: avg.update(local(p, x), s, step), in_dims=(0, 0, 0, None))
    history = []
    for step in range(steps):
        stacked, state = run(stacked, state, xs[step], step)
        history.append(stacked)
    return history, state


@pytest.mark.parametrize("period", [1, 2, 5])
@pytest.mark.parametrize("outer", [None, "adamw"])
def test_one_fragment_no_delay_no_mixing_is_diloco_bit_for_bit(period, outer):
    make = (lambda: None) if outer is None else (lambda: optim.adamw(0.02))
    mean = simulate.replica_mean()
    got, s1 = simulate_run(streaming_diloco(period, reduce=mean, outer_optimizer=make()), 11)
    want, s2 = simulate_run(diloco(period, reduce=mean, outer_optimizer=make()), 11)
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert all(torch.equal(x, y) for x, y in zip(s1.global_params, s2.global_params))
    assert torch.equal(s1.rounds[:, 0], s2.rounds)


def test_fragments_take_turns_and_start_delay_steps_early():
    reduce = RecordingReduce()
    avg = streaming_diloco(6, reduce=reduce, num_fragments=3, delay=1)
    params = start()
    state = avg.init(params)
    sizes = {}
    for step in range(14):
        calls = reduce.calls
        new, state = avg.update(params, state, step)
        if reduce.calls > calls:
            sizes[step] = reduce.inputs[-1].numel()
        applied = new is not params
        assert applied == ((step + 1) % 2 == 0), step  # one fragment applied every H / F steps
    # fragments by element count: [a] (3), [b] (4), [c, d] (6); each starts one step before it applies
    assert sizes == {0: 3, 2: 4, 4: 6, 6: 3, 8: 4, 10: 6, 12: 3}
    assert state.rounds.tolist() == [3, 2, 2]


def test_split_fragments_is_contiguous_balanced_and_never_empty():
    assert split_fragments([3, 4, 5, 1], 3) == [0, 1, 2, 2]  # sizes 3, 4, 6 (nearest boundaries)
    assert split_fragments([4096, 64, 4096, 64, 640, 10], 2) == [0, 0, 1, 1, 1, 1]
    assert split_fragments([100, 1, 1], 3) == [0, 1, 2]
    assert split_fragments([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert split_fragments([5], 1) == [0]


def _reference(period, num_fragments, delay, alpha, outer, steps, fragment_leaves):
    """Streaming DiLoCo written from the paper, one replica (a group of one)."""
    h = period // num_fragments
    params = start()
    xs = batches(steps, 1)
    glob = {k: v.clone() for k, v in params.items()}
    states = [outer.init(tuple(glob[k] for k in keys)) for keys in fragment_leaves]
    pending = {}
    history = []
    for step in range(steps):
        params = local(params, xs[step, 0])
        t = step + 1
        if (t + delay) % h == 0 and delay:
            k = ((t + delay) // h - 1) % num_fragments
            pending[k] = tuple(glob[n] - params[n] for n in fragment_leaves[k])
        if t % h == 0:
            k = (t // h - 1) % num_fragments
            keys = fragment_leaves[k]
            pg = pending.pop(k) if delay else tuple(glob[n] - params[n] for n in keys)
            new, states[k] = outer.update(pg, states[k], tuple(glob[n] for n in keys))
            for n, value in zip(keys, new):
                glob[n] = value
                params = {**params, n: (1 - alpha) * value + alpha * params[n] if alpha else value.clone()}
        history.append(params)
    return history


@pytest.mark.parametrize("delay, alpha", [(0, 0.0), (1, 0.0), (2, 0.5), (0, 1.0), (1, 0.25)])
def test_overlap_and_mixing_match_a_reference_written_from_the_paper(delay, alpha):
    outer = optim.sgd(0.7, momentum=0.9, nesterov=True)
    avg = streaming_diloco(6, reduce=lambda t: t, num_fragments=2, delay=delay, alpha=alpha, outer_optimizer=outer)
    steps = 15
    want = _reference(6, 2, delay, alpha, outer, steps, [("a", "b"), ("c", "d")])
    params = start()
    xs = batches(steps, 1)
    state = avg.init(params)
    for step in range(steps):
        params, state = avg.update(local(params, xs[step, 0]), state, step)
        for k in SHAPES:
            torch.testing.assert_close(params[k], want[step][k], rtol=1e-6, atol=1e-6)
    assert state.rounds.tolist() == [3, 2]
    assert (state.pending is None) == (delay == 0)


def test_explicit_fragments():
    reduce = RecordingReduce()
    fragment_of = {"a": 1, "b": 0, "c": 1, "d": 0}
    avg = streaming_diloco(2, reduce=reduce, num_fragments=2, fragment_of=fragment_of)
    params = start()
    state = avg.init(params)
    new, state = avg.update(params, state, 0)  # fragment 0: b and d
    assert reduce.inputs[-1].numel() == 5
    assert new["a"] is params["a"] and new["c"] is params["c"] and new["b"] is not params["b"]
    assert [len(tuple(s.momentum_buffer)) for s in state.outer] == [2, 2]


def test_wire_dtype_with_float32_accumulation():
    reduce = RecordingReduce()
    avg = streaming_diloco(4, reduce=reduce, num_fragments=2, delay=1, round=avgfn.Round(comm_dtype=torch.bfloat16))
    params = {k: v.to(torch.bfloat16) for k, v in start().items()}
    state = avg.init(params)
    assert {g.dtype for g in state.global_params} == {torch.float32}
    assert state.pending.dtype == torch.float32
    ref = streaming_diloco(4, reduce=lambda t: t, num_fragments=2, delay=1)
    ref_params = start()
    ref_state = ref.init(ref_params)
    xs = batches(8, 1)
    for step in range(8):
        params, state = avg.update(local(params, xs[step, 0]), state, step)
        ref_params, ref_state = ref.update(local(ref_params, xs[step, 0]), ref_state, step)
    assert reduce.calls == 4 and all(t.dtype == torch.bfloat16 for t in reduce.inputs)
    assert all(v.dtype == torch.bfloat16 for v in params.values())
    for g, r in zip(state.global_params, ref_state.global_params):
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05)


def test_nonfinite_in_one_fragment_leaves_the_other_alone():
    avg = streaming_diloco(2, reduce=lambda t: t, num_fragments=2, round=avgfn.Round(nonfinite="skip"), outer_optimizer=optim.sgd(1.0))
    params = start()
    state = avg.init(params)
    bad = {**params, "a": torch.full((3,), math.nan)}
    new, state = avg.update(bad, state, 0)  # fragment 0 (a, b): skipped
    assert torch.equal(new["a"], params["a"]) and int(state.skipped) == 1
    new, state = avg.update({**params, "c": params["c"] + 1}, state, 1)  # fragment 1: fine
    torch.testing.assert_close(new["c"], params["c"] + 1)
    assert state.rounds.tolist() == [1, 1] and int(state.skipped) == 1
    with pytest.raises(NonFiniteError, match="at step 2: streaming_diloco"):
        streaming_diloco(2, reduce=lambda t: t, num_fragments=2).update(bad, state, 2)


def test_bad_input():
    ok = {"reduce": lambda t: t}
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        streaming_diloco(0, **ok)
    with pytest.raises(ValueError, match="num_fragments must divide period"):
        streaming_diloco(6, num_fragments=4, **ok)
    with pytest.raises(ValueError, match="num_fragments must be >= 1"):
        streaming_diloco(6, num_fragments=0, **ok)
    with pytest.raises(ValueError, match="delay must be < period / num_fragments = 2"):
        streaming_diloco(6, num_fragments=3, delay=2, **ok)
    with pytest.raises(ValueError, match="delay must be >= 0"):
        streaming_diloco(6, delay=-1, **ok)
    for alpha in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
            streaming_diloco(6, alpha=alpha, **ok)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        streaming_diloco(6, alpha="0.5", **ok)
    with pytest.raises(TypeError, match="fragment_of must be a pytree of ints"):
        streaming_diloco(6, num_fragments=2, fragment_of={"a": 0.5}, **ok)
    avg = streaming_diloco(6, num_fragments=3, **ok)
    with pytest.raises(ValueError, match="num_fragments=3 but `where` selects only 2 leaves"):
        avg.init({"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        streaming_diloco(6, num_fragments=2, fragment_of={"a": 0, "b": 2}, **ok).init(
            {"a": torch.ones(1), "b": torch.ones(1)}
        )
    with pytest.raises(ValueError, match="without any selected leaf"):
        streaming_diloco(6, num_fragments=2, fragment_of={"a": 0, "b": 0}, **ok).init(
            {"a": torch.ones(1), "b": torch.ones(1)}
        )


def _overlapped():
    # h = 2: fragment k starts at step 2k (mod 6) and is applied one step later
    return streaming_diloco(6, reduce=lambda t: t, num_fragments=3, delay=1, outer_optimizer=optim.sgd(1.0))


def test_a_skipped_start_step_skips_its_fragment_instead_of_applying_a_stale_average():
    avg = _overlapped()
    params = start()
    drifted = {k: v + 1 for k, v in params.items()}
    state = avg.init(params)
    _, state = avg.update(drifted, state, 0)  # fragment 0 (a) starts
    assert state.in_flight.tolist() == [0, 0]
    new, state = avg.update(drifted, state, 1)  # and is applied: consumed
    assert torch.equal(new["a"], drifted["a"]) and state.in_flight.tolist() == [-1, -1]
    # step 2 (fragment 1's start) is not run, as after a NonFiniteError there
    globals_before = [g.clone() for g in state.global_params]
    new, state = avg.update(drifted, state, 3)
    assert state.rounds.tolist() == [1, 1, 0] and int(state.skipped) == 1  # a round, skipped
    assert all(torch.equal(g, b) for g, b in zip(state.global_params, globals_before))
    assert torch.equal(new["b"], params["b"])  # fragment 1 restarts from its global copy
    assert torch.equal(new["c"], drifted["c"])  # the others are left alone


def test_an_average_is_applied_once():
    avg = _overlapped()
    params = start()
    drifted = {k: v + 1 for k, v in params.items()}
    state = avg.init(params)
    _, state = avg.update(drifted, state, 0)
    once, state = avg.update(drifted, state, 1)
    twice, again = avg.update(once, state, 1)  # the new state handed back at the same step
    assert again.rounds.tolist() == [2, 0, 0] and int(again.skipped) == 1  # counted as skipped
    assert all(torch.equal(a, b) for a, b in zip(again.global_params, state.global_params))
    assert torch.equal(twice["a"], once["a"])


def test_a_stale_average_is_dropped_and_one_from_a_later_step_refused():
    avg = _overlapped()
    params = start()
    drifted = {k: v + 1 for k, v in params.items()}
    state = avg.init(params)
    _, state = avg.update(drifted, state, 0)  # fragment 0, started at step 0
    # steps 1 and 2 are not run: fragment 0's average is stale at step 3, where fragment 1
    # (started at step 2) is due; before, this raised ValueError and stopped the run
    before = [g.clone() for g in state.global_params]
    new, after = avg.update(drifted, state, 3)
    assert after.rounds.tolist() == [0, 1, 0] and int(after.skipped) == 1  # fragment 1's round, skipped
    assert all(torch.equal(g, b) for g, b in zip(after.global_params, before))
    assert torch.equal(new["b"], params["b"]) and new["a"] is drifted["a"]  # fragment 0's average not applied
    assert after.in_flight.tolist() == [-1, -1]  # dropped
    _, state = avg.update(params, state, 6)  # fragment 0 again, started at step 6
    with pytest.raises(ValueError, match="started at step 6"):
        avg.update(params, state, 1)  # fragment 0's apply step of the previous period


def test_under_vmap_a_round_without_its_average_keeps_the_global_copy():
    avg = _overlapped()
    stacked = simulate.stack([start() for _ in range(W)])
    state = vmap(avg.init)(stacked)
    run = vmap(avg.update, in_dims=(0, 0, None))
    drifted = {k: v + 1 for k, v in stacked.items()}
    _, state = run(drifted, state, 0)
    _, state = run(drifted, state, 1)
    before = [g.clone() for g in state.global_params]
    new, state = run(drifted, state, 3)  # step 2 was not run
    assert state.skipped.tolist() == [1] * W and state.rounds[:, 1].tolist() == [1] * W
    assert all(torch.equal(g, b) for g, b in zip(state.global_params, before))


def test_the_tag_travels_in_checkpoints():
    avg = _overlapped()
    params = start()
    state = avg.init(params)
    _, state = avg.update(params, state, 0)
    loaded = avgfn.load_state_dict(avg.init(params), avgfn.state_dict(state))
    assert loaded.in_flight.tolist() == [0, 0]
    a, _ = avg.update(params, state, 1)
    b, _ = avg.update(params, loaded, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
