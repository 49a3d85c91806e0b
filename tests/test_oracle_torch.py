"""Oracles: avgfn against torch's own model averaging on real gloo groups.

Each world runs torch's implementation and avgfn's side by side on identical
inputs and returns, per step, the parameters of both; the tests require them
to be exactly equal.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import averagers, utils
from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
    HierarchicalModelAverager,
)

import avgfn
from _dist import run_world


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.unused = torch.nn.Linear(2, 2)  # never in the forward pass: no grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _pair(rank: int) -> tuple[Net, Net]:
    torch.manual_seed(100 + rank)  # replicas start apart, so averaging matters
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train_step(model: Net, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x, y = _batch(rank, step)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _write_back(model: Net, new: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if new[name] is not p:
                p.copy_(new[name])


def _snapshot(model: Net) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _run_pair(rank: int, steps: int, torch_averager, avg: avgfn.Averager) -> list:
    ref, mine = _pair(rank)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9)
    state = avg.init(dict(mine.named_parameters()))
    trace = []
    for step in range(steps):
        _train_step(ref, opt_ref, rank, step)
        torch_averager.average_parameters(ref.parameters())
        _train_step(mine, opt_mine, rank, step)
        params = dict(mine.named_parameters())
        new, state = avg.update(params, state, step)
        _write_back(mine, new)
        trace.append((_snapshot(ref), _snapshot(mine)))
    return trace


GRAD_FILTER = staticmethod(lambda p: p.grad is not None)


def _average_parameters_case(rank: int, group=None) -> tuple[list, list]:
    """torch's average_parameters vs avgfn.average on mixed dtypes."""
    g = torch.Generator().manual_seed(rank)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float32]
    shapes = [(3, 4), (5,), (2, 2, 2), (), (0,)]
    values = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    ref = [torch.nn.Parameter(v.clone()) for v in values]
    utils.average_parameters(iter(ref), group)
    params = {f"p{i}": torch.nn.Parameter(v.clone()) for i, v in enumerate(values)}
    new = avgfn.average(params, avgfn.collectives.all_reduce_mean(group))
    return [p.detach() for p in ref], [new[f"p{i}"].detach() for i in range(len(values))]


def world_two(rank: int, world_size: int) -> dict:
    out = {"average": _average_parameters_case(rank), "periodic": {}}
    for warmup in (12, 13, 14, 15):
        out["periodic"][warmup] = _run_pair(
            rank,
            30,
            averagers.PeriodicModelAverager(period=4, warmup_steps=warmup),
            avgfn.periodic(
                4,
                reduce=avgfn.collectives.all_reduce_mean(),
                warmup_steps=warmup,
                where=lambda p: p.grad is not None,
            ),
        )
    return out


def world_four(rank: int, world_size: int) -> dict:
    out = {"average": _average_parameters_case(rank)}
    # A group that leaves ranks 2 and 3 out: they keep their values, as in torch.
    half = dist.new_group(ranks=[0, 1])
    out["outside"] = _average_parameters_case(rank, half)
    out["periodic"] = _run_pair(
        rank,
        30,
        averagers.PeriodicModelAverager(period=4, warmup_steps=13),
        avgfn.periodic(4, reduce=avgfn.collectives.all_reduce_mean(), warmup_steps=13,
                       where=lambda p: p.grad is not None),
    )
    cases = {
        "three_levels": (OrderedDict([(2, 1), (4, 2), (8, 4)]), 5),
        "no_divide": (OrderedDict([(3, 2), (6, 4)]), 7),
        "post_warmup_4": (OrderedDict([(2, 2), (4, 4)]), 5),
    }
    for name, (sizes, warmup) in cases.items():
        ref = HierarchicalModelAverager(sizes, warmup_steps=warmup)
        levels = avgfn.collectives.hierarchy(sizes)
        avg = avgfn.hierarchical(levels, warmup_steps=warmup, where=lambda p: p.grad is not None)
        out[name] = _run_pair(rank, 30, ref, avg)
    out["errors"] = _hierarchy_errors()
    return out


def _hierarchy_errors() -> dict:
    bad = {
        "not_dividing": {2: 3, 4: 4},
        "last_not_world": {2: 2, 4: 2},
        "empty": {},
        "decreasing": [(4, 2), (2, 4)],
        "zero_size": {2: 0, 4: 4},
    }
    messages = {}
    for name, sizes in bad.items():
        try:
            avgfn.collectives.hierarchy(sizes)
        except (ValueError, TypeError) as e:
            messages[name] = f"{type(e).__name__}: {e}"
    return messages


@pytest.fixture(scope="module")
def two():
    return run_world(world_two, 2)


@pytest.fixture(scope="module")
def four():
    return run_world(world_four, 4)


def _assert_identical(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, where
    assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"


def _assert_trace(trace: list, label: str) -> None:
    for step, (ref, mine) in enumerate(trace):
        for name in ref:
            _assert_identical(ref[name], mine[name], f"{label} step {step} {name}")


@pytest.mark.parametrize("world", ["two", "four"])
def test_average_matches_average_parameters_mixed_dtypes(world, request):
    results = request.getfixturevalue(world)
    for rank, out in enumerate(results):
        ref, mine = out["average"]
        for i, (a, b) in enumerate(zip(ref, mine)):
            _assert_identical(a, b, f"rank {rank} leaf {i}")
    # and the replicas really were averaged: equal across ranks
    first = results[0]["average"][1]
    for out in results[1:]:
        for a, b in zip(first, out["average"][1]):
            assert torch.equal(a, b)


def test_rank_outside_group_keeps_its_values(four):
    for rank, out in enumerate(four):
        ref, mine = out["outside"]
        for a, b in zip(ref, mine):
            _assert_identical(a, b, f"rank {rank}")
    # ranks 2 and 3 kept their own (differing) values
    assert not torch.equal(four[2]["outside"][1][0], four[3]["outside"][1][0])
    assert torch.equal(four[0]["outside"][1][0], four[1]["outside"][1][0])


@pytest.mark.parametrize("warmup", [12, 13, 14, 15])
def test_periodic_matches_torch_two_ranks(two, warmup):
    for rank, out in enumerate(two):
        _assert_trace(out["periodic"][warmup], f"rank {rank} warmup {warmup}")


def test_periodic_matches_torch_four_ranks(four):
    for rank, out in enumerate(four):
        _assert_trace(out["periodic"], f"rank {rank}")


@pytest.mark.parametrize("case", ["three_levels", "no_divide", "post_warmup_4"])
def test_hierarchical_matches_torch(four, case):
    for rank, out in enumerate(four):
        _assert_trace(out[case], f"rank {rank} {case}")


def test_parameters_without_grads_are_left_alone(two):
    # the unused layer never gets a grad: torch's filter skips it, and so does where
    for out in two:
        trace = out["periodic"][12]
        first, last = trace[0][1], trace[-1][1]
        assert torch.equal(first["unused.weight"], last["unused.weight"])
    assert not torch.equal(two[0]["periodic"][12][-1][1]["unused.weight"],
                           two[1]["periodic"][12][-1][1]["unused.weight"])


def test_collectives_hierarchy_errors(four):
    for out in four:
        errors = out["errors"]
        assert errors["not_dividing"] == (
            "ValueError: period_group_sizes: the group size 3 of period 2 does not divide "
            "the size of group, 4"
        )
        assert errors["last_not_world"] == (
            "ValueError: period_group_sizes: the last group size must equal the size of group, 4; got 2"
        )
        assert errors["empty"] == "ValueError: period_group_sizes must not be empty, got {}"
        assert "strictly increasing, got [4, 2]" in errors["decreasing"]
        assert "group size of period 2 must be an int >= 1, got 0" in errors["zero_size"]
