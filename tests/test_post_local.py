"""Post-local SGD in one process: the schedule, the one-spec constructor, the
combinator with an inner optimizer, skipped steps, the DDP hook's counter, bad input.

The multi-process oracle against torch is ``test_post_local_oracle.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import avgfn
import avgfn.optim as optim
from avgfn import testing
from avgfn import AveragingState, with_averaging
from avgfn import GradientScheduleState, post_local_gradients, post_local_sgd
from avgfn.collectives import ddp_comm_hook


def _params():
    return {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([0.5])}


def _grads(step):
    return {"w": torch.tensor([0.1, 0.2, -0.3]) * (step + 1), "b": torch.tensor([0.25])}


def _snapshot(*trees):
    return [t.clone() for t in pytree.tree_leaves(trees)]


def _unchanged(snapshot, *trees):
    leaves = pytree.tree_leaves(trees)
    return len(leaves) == len(snapshot) and all(torch.equal(a, b) for a, b in zip(snapshot, leaves))


# --- the gradient schedule -------------------------------------------------------------


def test_schedule_uses_global_then_local_reduce():
    world = testing.RecordingReduce(lambda t: t * 2)
    node = testing.RecordingReduce(lambda t: t * 3)
    sched = post_local_gradients(3, global_reduce=world, local_reduce=node)
    state = sched.init(_params())
    used = []
    for step in range(7):
        grads = _grads(step)
        new, state = sched.update(grads, state, step)
        factor = 2 if step < 3 else 3
        assert torch.equal(new["w"], grads["w"] * factor)
        used.append(sched.reduce_at(step))
    assert used == [world] * 3 + [node] * 4
    assert (world.calls, node.calls) == (3, 4)
    assert state.rounds.tolist() == [3, 4]


def test_schedule_without_local_reduce_leaves_gradients_alone():
    world = testing.RecordingReduce()
    sched = post_local_gradients(2, global_reduce=world, local_reduce=None)
    state = sched.init(_params())
    for step in range(5):
        grads = _grads(step)
        new, new_state = sched.update(grads, state, step)
        if step >= 2:
            assert new is grads and new_state is state and sched.reduce_at(step) is None
        state = new_state
    assert world.calls == 2 and state.rounds.tolist() == [2, 0]


def test_schedule_start_zero_is_local_from_the_first_step():
    world, node = testing.RecordingReduce(), testing.RecordingReduce()
    sched = post_local_gradients(0, global_reduce=world, local_reduce=node)
    sched.update(_grads(0), sched.init(_params()), 0)
    assert (world.calls, node.calls) == (0, 1)


def test_schedule_is_pure_and_where_selects():
    sched = post_local_gradients(
        5, global_reduce=lambda t: t * 0, local_reduce=None, where={"w": True, "b": False}
    )
    grads, state = _grads(0), sched.init(_params())
    snap = _snapshot(grads, state)
    new, _ = sched.update(grads, state, 0)
    assert _unchanged(snap, grads, state)
    assert torch.equal(new["w"], torch.zeros(3)) and new["b"] is grads["b"]


def test_schedule_state_checkpoints():
    sched = post_local_gradients(1, global_reduce=lambda t: t, local_reduce=lambda t: t)
    state = sched.init(_params())
    for step in range(3):
        _, state = sched.update(_grads(step), state, step)
    loaded = avgfn.load_state_dict(sched.init(_params()), avgfn.state_dict(state))
    assert isinstance(loaded, GradientScheduleState) and loaded.rounds.tolist() == [1, 2]


# --- one spec ---------------------------------------------------------------------------


def test_one_spec_one_switch_step_periodic():
    world, node = testing.RecordingReduce(), testing.RecordingReduce()
    algo = post_local_sgd(5, global_reduce=world, local_reduce=node, period=3)
    assert algo.start_step == algo.gradients.start_step == 5
    params = _params()
    a_state = algo.averager.init(params)
    averaged = []
    for step in range(15):
        new, a_state = algo.averager.update(params, a_state, step)
        if new is not params:
            averaged.append(step)
    # Parameter averaging starts exactly where the gradients go local.
    assert averaged == [5, 8, 11, 14]
    assert [algo.gradients.reduce_at(s) is node for s in range(15)] == [s >= 5 for s in range(15)]


def test_one_spec_hierarchical_levels():
    pair, world = testing.RecordingReduce(), testing.RecordingReduce()
    algo = post_local_sgd(5, global_reduce=world, local_reduce=None, levels=[(2, pair), (4, world)])
    params = _params()
    state = algo.averager.init(params)
    for step in range(13):
        params, state = algo.averager.update(params, state, step)
    # At steps >= 5: 6, 10 by the pairs; 8, 12 by the world (not offset by the warm-up, as torch).
    assert state.rounds.tolist() == [2, 2] and (pair.calls, world.calls) == (2, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"start_step": -1, "period": 2}, ValueError, "start_step must be >= 0, got -1"),
        ({"start_step": 1.5, "period": 2}, TypeError, "start_step must be an int"),
        ({"start_step": 2}, ValueError, "exactly one of period"),
        ({"start_step": 2, "period": 2, "levels": [(2, lambda t: t)]}, ValueError, "exactly one of period"),
        ({"start_step": 2, "period": 0}, ValueError, "period must be >= 1"),
        ({"start_step": 2, "levels": []}, ValueError, "levels must not be empty"),
        ({"start_step": 2, "period": 2, "local_reduce": 3}, TypeError, "local_reduce must be a callable"),
    ],
)
def test_spec_bad_input(kwargs, error, match):
    kwargs = {"global_reduce": lambda t: t, "local_reduce": None, **kwargs}
    start = kwargs.pop("start_step")
    with pytest.raises(error, match=match):
        post_local_sgd(start, **kwargs)


def test_averager_options_reach_the_averager():
    inf_peer = testing.peers_mean(lambda t: torch.full_like(t, float("inf")))
    params = _params()
    for options, raises in (({}, True), ({"nonfinite": "ignore"}, False)):
        algo = post_local_sgd(0, global_reduce=inf_peer, local_reduce=None, period=2, **options)
        state = algo.averager.init(params)
        if raises:
            with pytest.raises(Exception, match="finite"):
                algo.averager.update(params, state, 0)
        else:
            new, _ = algo.averager.update(params, state, 0)
            assert torch.isinf(new["w"]).all()
    with pytest.raises(TypeError):
        post_local_sgd(0, global_reduce=inf_peer, local_reduce=None, period=2, no_such_option=1)


def test_local_reduce_must_be_spelled_out():
    with pytest.raises(TypeError, match="local_reduce"):
        post_local_sgd(2, global_reduce=lambda t: t, period=2)  # type: ignore[call-arg]


def test_negative_step_is_refused():
    algo = post_local_sgd(2, global_reduce=lambda t: t, local_reduce=None, period=2)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        algo.gradients.reduce_at(-1)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        algo.gradients.update(_grads(0), algo.gradients.init(_params()), -1)


# --- the combinator ---------------------------------------------------------------------


def _peer_world():
    # A world of two: the peer's params are ours plus one; its gradients ours times two.
    return testing.peers_mean(lambda t: t + 1.0)


def test_with_averaging_is_the_composition_of_its_parts():
    world = _peer_world()
    node = testing.peers_mean(lambda t: t * 2.0)
    algo = post_local_sgd(3, global_reduce=world, local_reduce=node, period=2)
    inner = optim.sgd(0.1, momentum=0.9)
    train = with_averaging(inner, algo)
    params = _params()
    state = train.init(params)
    ref_params, g_state, o_state, a_state = (
        _params(), algo.gradients.init(params), inner.init(params), algo.averager.init(params)
    )
    for step in range(9):
        grads = _grads(step)
        snap = _snapshot(grads, state, params)
        new_params, new_state = train.update(grads, state, params, step)
        assert _unchanged(snap, grads, state, params), "with_averaging modified an input"
        g, g_state = algo.gradients.update(grads, g_state, step)
        ref_params, o_state = inner.update(g, o_state, ref_params)
        ref_params, a_state = algo.averager.update(ref_params, a_state, step)
        for k in params:
            assert torch.equal(new_params[k], ref_params[k])
        params, state = new_params, new_state
    assert isinstance(state, AveragingState)
    assert state.gradients.rounds.tolist() == [3, 6]
    assert int(state.optimizer.step) == 9 and int(state.averager.rounds) == 3


def test_skipped_step_skips_only_the_inner_optimizer():
    world = testing.RecordingReduce()
    node = testing.RecordingReduce()
    algo = post_local_sgd(2, global_reduce=world, local_reduce=node, period=2)
    inner = optim.adamw(0.1)
    train = with_averaging(inner, algo)
    params = _params()
    state = train.init(params)
    for step in range(4):
        params, state = train.update(_grads(step), state, params, step)
    calls = (world.calls, node.calls)
    # Step 4 is an averaging step (4 - 2) % 2 == 0, and it is skipped.
    new_params, new_state = train.update(_grads(4), state, params, 4, skip=True)
    assert (world.calls, node.calls) == (calls[0] + 1, calls[1] + 1), (
        "the gradient and parameter averaging still ran"
    )
    assert new_state.optimizer is state.optimizer  # the inner state is untouched
    assert int(new_state.averager.rounds) == int(state.averager.rounds) + 1
    assert new_state.gradients.rounds.tolist() == [2, 3]
    for k in params:  # params = the averaging of the unchanged params (identity Reduce)
        assert torch.equal(new_params[k], params[k])


def test_skip_as_a_tensor_or_a_check_on_the_averaged_gradients():
    inf_peer = testing.peers_mean(lambda t: torch.full_like(t, float("inf")))
    algo = post_local_sgd(10, global_reduce=inf_peer, local_reduce=None, period=2)
    train = with_averaging(optim.sgd(0.1, momentum=0.9), algo)
    params = _params()
    state = train.init(params)

    def nonfinite(grads):
        return ~torch.stack([torch.isfinite(g).all() for g in pytree.tree_leaves(grads)]).all()

    # Our own gradients are finite; the peer's inf reaches us through the
    # gradient average, so the check must see the averaged gradients.
    new_params, new_state = train.update(_grads(0), state, params, 0, skip=nonfinite)
    assert all(torch.equal(new_params[k], params[k]) for k in params)
    assert torch.equal(new_state.optimizer.step, state.optimizer.step)
    # The same with a tensor flag (no host synchronization), and a False flag.
    finite = with_averaging(optim.sgd(0.1, momentum=0.9), post_local_sgd(
        10, global_reduce=lambda t: t, local_reduce=None, period=2))
    s = finite.init(params)
    kept, s_kept = finite.update(_grads(0), s, params, 0, skip=torch.tensor(True))
    moved, s_moved = finite.update(_grads(0), s, params, 0, skip=torch.tensor(False))
    plain, s_plain = finite.update(_grads(0), s, params, 0)
    assert all(torch.equal(kept[k], params[k]) for k in params)
    assert all(torch.equal(moved[k], plain[k]) for k in params)
    assert int(s_kept.optimizer.step) == 0 and int(s_moved.optimizer.step) == 1


def test_skip_tensor_per_replica_under_vmap():
    algo = post_local_sgd(1, global_reduce=lambda t: t, local_reduce=None, period=2)
    train = with_averaging(optim.sgd(0.1, momentum=0.5), algo)
    stacked = {"w": torch.randn(3, 4)}
    state = torch.func.vmap(train.init)(stacked)

    def step_fn(grads, state, params, skip, step):
        return train.update(grads, state, params, step, skip=skip)

    grads = {"w": torch.ones(3, 4)}
    skip = torch.tensor([True, False, True])
    new, new_state = torch.func.vmap(step_fn, in_dims=(0, 0, 0, 0, None))(grads, state, stacked, skip, 0)
    assert [torch.equal(new["w"][i], stacked["w"][i]) for i in range(3)] == [True, False, True]
    assert new_state.optimizer.step.tolist() == [0, 1, 0]


def test_with_averaging_bad_input():
    algo = post_local_sgd(1, global_reduce=lambda t: t, local_reduce=None, period=2)
    with pytest.raises(TypeError, match="carries its own gradient schedule"):
        with_averaging(optim.sgd(0.1), algo, gradients=algo.gradients)
    with pytest.raises(TypeError, match="optimizer must be an avgfn.optim.Optimizer"):
        with_averaging(torch.optim.SGD, algo)
    with pytest.raises(TypeError, match="averager must be an avgfn.Averager"):
        with_averaging(optim.sgd(0.1), object())
    train = with_averaging(optim.sgd(0.1, momentum=0.9), algo)
    params = _params()
    state = train.init(params)
    snap = _snapshot(state, params)
    with pytest.raises(ValueError, match="step must be >= 0"):
        train.update(_grads(0), state, params, -1)
    with pytest.raises(TypeError, match="skip must be a bool"):
        train.update(_grads(0), state, params, 0, skip=torch.tensor([1.0]))
    # An optimizer state from another param tree.
    other = train.init({"w": torch.zeros(3), "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="another param tree"):
        train.update(_grads(0), other, params, 0)
    # A state of another composition.
    with pytest.raises(ValueError, match="without a gradient schedule"):
        train.update(_grads(0), with_averaging(optim.sgd(0.1, momentum=0.9), algo.averager).init(params),
                     params, 0)
    assert _unchanged(snap, state, params)


def test_checkpoint_from_another_algorithm_is_refused():
    algo_p = post_local_sgd(2, global_reduce=lambda t: t, local_reduce=None, period=2)
    algo_h = post_local_sgd(2, global_reduce=lambda t: t, local_reduce=None,
                            levels=[(2, lambda t: t), (4, lambda t: t)])
    params = _params()
    sgd_p = with_averaging(optim.sgd(0.1, momentum=0.9), algo_p)
    template = sgd_p.init(params)
    hierarchical = avgfn.state_dict(with_averaging(optim.sgd(0.1, momentum=0.9), algo_h).init(params))
    adamw = avgfn.state_dict(with_averaging(optim.adamw(), algo_p).init(params))
    with pytest.raises(ValueError, match=r"'.averager.rounds' must be a torch.int64 tensor of shape \(\)"):
        avgfn.load_state_dict(template, hierarchical)
    with pytest.raises(ValueError, match="missing keys"):
        avgfn.load_state_dict(template, adamw)


# --- the DDP hook's own counter (fake buckets, no process group) ------------------------


class FakeBucket:
    def __init__(self, values, last):
        self._buffer = torch.tensor(values)
        self._last = last

    def buffer(self):
        return self._buffer

    def is_last(self):
        return self._last


def test_hook_counts_iterations_like_torch():
    world = testing.RecordingReduce(lambda t: t * 2)
    node = testing.RecordingReduce(lambda t: t * 3)
    sched = post_local_gradients(2, global_reduce=world, local_reduce=node)
    state, hook = ddp_comm_hook(sched)
    results, counters = [], []
    for iteration in range(4):
        # Two buckets per backward pass; the last one advances the counter...
        for last in (False, True):
            results.append(hook(state, FakeBucket([1.0, 2.0], last)).wait())
        counters.append(state.iteration)
    assert counters == [1, 2, 2, 2]  # ...up to the switch step, where torch's stops too
    assert (world.calls, node.calls) == (4, 4)
    assert [r.tolist() for r in results] == [[2.0, 4.0]] * 4 + [[3.0, 6.0]] * 4


def test_hook_reads_an_external_step_and_refuses_where():
    world, node = testing.RecordingReduce(), testing.RecordingReduce()
    sched = post_local_gradients(5, global_reduce=world, local_reduce=node)
    counter = {"step": 7}
    state, hook = ddp_comm_hook(sched, step=lambda: counter["step"])
    hook(state, FakeBucket([1.0], True))
    assert (world.calls, node.calls) == (0, 1) and state.iteration == 0
    with pytest.raises(ValueError, match="where"):
        ddp_comm_hook(post_local_gradients(1, global_reduce=world, local_reduce=None, where=lambda t: True))
    with pytest.raises(TypeError, match="GradientSchedule"):
        ddp_comm_hook(avgfn.periodic(2, reduce=world))
    with pytest.raises(TypeError, match="step must be a callable"):
        ddp_comm_hook(sched, step=3)
