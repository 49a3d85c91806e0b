"""Every bad input named in the contract raises with a message naming it."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import avgfn

R = lambda t: t  # noqa: E731


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"period": 0}, ValueError, "period must be >= 1, got 0"),
        ({"period": -3}, ValueError, "period must be >= 1, got -3"),
        ({"period": 2.0}, TypeError, "period must be an int, got float 2.0"),
        ({"period": True}, TypeError, "period must be an int, got bool True"),
        ({"period": 2, "warmup_steps": -1}, ValueError, "warmup_steps must be >= 0, got -1"),
        ({"period": 2, "warmup_steps": "3"}, TypeError, "warmup_steps must be an int, got str '3'"),
        ({"period": 2, "reduce": None}, TypeError, "reduce must be a callable"),
        ({"period": 2, "where": {"a": 1}}, TypeError, "it holds int 1"),
    ],
)
def test_periodic_arguments(kwargs, exc, message):
    kwargs.setdefault("reduce", R)
    period = kwargs.pop("period")
    with pytest.raises(exc, match=re.escape(message)):
        avgfn.periodic(period, **kwargs)


def test_period_one_warns_like_torch():
    with pytest.warns(UserWarning, match="period is 1"):
        avgfn.periodic(1, reduce=R)
    with pytest.warns(UserWarning, match="largest period of levels is 1"):
        avgfn.hierarchical([(1, R)])


@pytest.mark.parametrize(
    "levels,exc,message",
    [
        ([], ValueError, "levels must not be empty, got []"),
        ({}, ValueError, "levels must not be empty, got {}"),
        ([(0, R), (2, R)], ValueError, "the first period of levels must be > 0, got 0 in [0, 2]"),
        ([(-2, R)], ValueError, "the first period of levels must be > 0, got -2"),
        ([(4, R), (2, R)], ValueError, "strictly increasing, got [4, 2]"),
        ([(2, R), (2, R)], ValueError, "strictly increasing, got [2, 2]"),
        ([(2.5, R)], TypeError, "the periods of levels must be ints, got 2.5"),
        ([(2, None)], TypeError, "the reduce of the level with period 2 must be a callable"),
        ([2, 4], TypeError, "levels must hold (period, value) pairs, got 2"),
        (5, TypeError, "levels must be a sequence of (period, value) pairs"),
    ],
)
def test_hierarchical_levels(levels, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        avgfn.hierarchical(levels)


def test_hierarchical_warmup():
    with pytest.raises(ValueError, match=re.escape("warmup_steps must be >= 0, got -5")):
        avgfn.hierarchical([(2, R)], warmup_steps=-5)


def test_where_tree_must_match_params():
    params = {"a": torch.ones(1), "b": [torch.ones(1)]}
    with pytest.raises(ValueError, match="where must be a pytree of bools with the structure of params"):
        avgfn.average(params, R, where={"a": True, "b": True})
    avg = avgfn.periodic(2, reduce=R, where={"a": True})
    with pytest.raises(ValueError, match="structure of params"):
        avg.update(params, avg.init(params), 0)


def test_non_tensor_leaf_selected():
    params = {"a": torch.ones(1), "n": 3}
    with pytest.raises(TypeError, match=re.escape("where selects the leaf at ['n'] for averaging, but it is int 3")):
        avgfn.average(params, R, where={"a": True, "n": True})
    with pytest.raises(TypeError, match=re.escape("['n']")):
        avgfn.average(params, R, where=lambda leaf: True)


def test_where_callable_must_return_bool():
    params = {"a": torch.ones(2)}
    with pytest.raises(TypeError, match=re.escape("where(leaf) must return a bool, got Tensor")):
        avgfn.average(params, R, where=lambda p: p > 0)


def test_errors_leave_inputs_untouched():
    params = {"a": torch.ones(2), "n": 3}
    before = params["a"].clone()
    with pytest.raises(TypeError):
        avgfn.average(params, R, where={"a": True, "n": True})
    assert torch.equal(params["a"], before) and params["n"] == 3


def test_no_warning_for_valid_periods():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        avgfn.periodic(2, reduce=R)
        avgfn.hierarchical([(1, R), (4, R)])
