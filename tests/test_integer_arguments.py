"""What docs/periodic.md says of integer arguments holds for every averager.

A ``step`` (like ``period``, ``warmup_steps``, ``start_step``) is an integer: a
Python int, or anything ``operator.index`` turns into one (an integer tensor of
one element). A float, a bool, a float or bool tensor or a string raises
``TypeError`` naming the argument; a negative step, or one past int64, raises
``ValueError``; and nothing is changed when they do.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import avgfn
from test_conformance import ALONE, NAMES, REGISTRY, initial_params

NOT_INTEGERS = [2.0, True, torch.tensor(2.0), torch.tensor(True), "2", None]


def _same(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb)
    )


def _clone(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


@pytest.mark.parametrize("name", NAMES)
def test_an_int_tensor_step_is_that_step(name):
    avg = REGISTRY[name].make(ALONE)
    params = initial_params(0)
    state = avg.init(params)
    for step in range(6):
        by_int = avg.update(params, state, step)
        by_tensor = avg.update(params, state, torch.tensor(step))
        assert _same(by_int, by_tensor), (name, step)
        params, state = by_int


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", NOT_INTEGERS, ids=repr)
def test_a_step_that_is_not_an_integer_raises_type_error_and_changes_nothing(name, bad):
    avg = REGISTRY[name].make(ALONE)
    params = initial_params(0)
    state = avg.init(params)
    before = _clone((params, state))
    with pytest.raises(TypeError, match="step must be an int, got"):
        avg.update(params, state, bad)
    assert _same((params, state), before)


@pytest.mark.parametrize("name", NAMES)
def test_a_negative_step_raises_value_error(name):
    avg = REGISTRY[name].make(ALONE)
    params = initial_params(0)
    state = avg.init(params)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        avg.update(params, state, -1)
    with pytest.raises(ValueError, match="step must be >= 0, got -3"):
        avg.update(params, state, torch.tensor(-3))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_past_int64_raises_value_error_and_changes_nothing(name):
    # the averagers keep steps in int64 tensors (overlapped_diloco's tag of its round in flight)
    avg = REGISTRY[name].make(ALONE)
    params = initial_params(0)
    state = avg.init(params)
    before = _clone((params, state))
    for step in (1 << 63, (1 << 70) - 1):
        with pytest.raises(ValueError, match=r"step must be at most 2\*\*63 - 1 \(an int64\), got"):
            avg.update(params, state, step)
    assert _same((params, state), before)
    avg.update(params, state, (1 << 63) - 1)  # the largest step is a step


def test_the_training_wrappers_take_the_same_steps():
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 0.5)}
    train = avgfn.with_averaging(avgfn.optim.sgd(0.1), avgfn.periodic(2, reduce=lambda t: t))
    state = train.init(params)
    assert _same(train.update(grads, state, params, 2), train.update(grads, state, params, torch.tensor(2)))
    for bad in NOT_INTEGERS:
        with pytest.raises(TypeError, match="step must be an int"):
            train.update(grads, state, params, bad)

    schedule = avgfn.post_local_gradients(2, global_reduce=lambda t: t, local_reduce=None)
    g_state = schedule.init(grads)
    assert _same(schedule.update(grads, g_state, 1), schedule.update(grads, g_state, torch.tensor(1)))
    with pytest.raises(TypeError, match="step must be an int, got a bool tensor"):
        schedule.update(grads, g_state, torch.tensor(True))

    model = torch.nn.Linear(2, 1)
    module = avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=lambda t: t))
    module.step(torch.tensor(0))
    with pytest.raises(TypeError, match="step must be an int, got float"):
        module.step(1.0)


def test_integer_hyperparameters_take_int_tensors_and_refuse_bools():
    reduce = lambda t: t  # noqa: E731
    a, b = avgfn.periodic(3, reduce=reduce, warmup_steps=1), avgfn.periodic(
        torch.tensor(3), reduce=reduce, warmup_steps=torch.tensor(1)
    )
    params = {"w": torch.zeros(1)}
    sa, sb = a.init(params), b.init(params)
    due_a, due_b = [], []
    for step in range(10):
        new_a, sa = a.update(params, sa, step)
        new_b, sb = b.update(params, sb, step)
        due_a.append(new_a is not params)
        due_b.append(new_b is not params)
    assert due_a == due_b == [s >= 1 and (s - 1) % 3 == 0 for s in range(10)]

    for bad in (True, torch.tensor(True), 3.0, torch.tensor(3.0)):
        with pytest.raises(TypeError, match="period must be an int"):
            avgfn.periodic(bad, reduce=reduce)
        with pytest.raises(TypeError, match="warmup_steps must be an int"):
            avgfn.periodic(2, reduce=reduce, warmup_steps=bad)
        with pytest.raises(TypeError, match="start_step must be an int"):
            avgfn.post_local_sgd(bad, global_reduce=reduce, local_reduce=None, period=2)
        with pytest.raises(TypeError, match="period must be an int"):
            avgfn.diloco(bad, reduce=reduce)
