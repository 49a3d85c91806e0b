"""Training steps that end in ``avg.update`` compile with ``fullgraph=True`` on a real gloo group.

``collectives.all_reduce_mean()`` traces as torch's functional all-reduce while
``torch.compile`` traces (eagerly it stays the c10d path that honours its
timeout), so a step ``local SGD step, then avg.update(params, state, step)``
compiles into one graph per schedule branch, collective included. One 2-process
world runs every averager of the conformance registry a few steps eagerly and
compiled (dynamo, then the graph run op by op: ``backend="eager"``), side by side
from the same params; the compiled params must equal the eager ones bit for bit
at every step. Compiling is slow on a loaded 2-core machine, so the params are
the conformance suite's tiny MLP, the local step is SGD-like with a closed-form
gradient, and every averager runs only the steps that reach its first rounds.

The same world checks the Reduce alone under compile (a functional all-reduce in
the graph, torch's ``average_parameters`` bits, a non-member's input back) and,
last, what a stalled peer does to a compiled step: the graph's wait raises
torch's ``RuntimeError`` after the process group's own timeout (the Reduce's
``timeout`` and ``PeerError`` are the eager path's).
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import test_conformance as conformance
from _dist import run_world
from avgfn import collectives

WORLD = 2
STEPS = 6  # every registered averager averages at least once in 6 steps
# `step` symbolic from the first call: one graph fewer per averager (dynamo would
# specialize the first int it sees, then recompile it as symbolic at step 1).
DYNAMIC_STEP = "L['step']"
LR = 0.2


def _comm(world: int) -> conformance.Comm:
    mean = collectives.all_reduce_mean(timeout=60)

    def levels(spec: dict[int, int]) -> list:
        # the registry's levels are for 4 replicas; on 2 the pairs become groups of one
        return collectives.hierarchy({p: max(1, g * world // 4) for p, g in spec.items()}, timeout=60)

    return conformance.Comm(mean, levels, world)


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _make_step(avg):
    """An SGD-like local step (a closed-form gradient: tracing ``torch.func.grad`` is slow), then ``avg.update``."""

    def step_fn(params, state, x, y, step):
        scale = x.mean() + 0.01 * y.float().mean()
        local = {k: params[k] - LR * (params[k] * scale + 0.05) for k in conformance.FLOAT_KEYS}
        local["n"] = params["n"]
        return avg.update(local, state, step)

    return step_fn


def _compare_averager(rank: int, world: int, name: str) -> list[str]:
    """Eager and compiled runs of one averager; the differences found (none: equal)."""
    avg = conformance.REGISTRY[name].make(_comm(world))
    step_fn = _make_step(avg)
    torch._dynamo.reset()
    compiled = torch.compile(step_fn, fullgraph=True, backend="eager")
    params = conformance.initial_params(rank)
    xs, ys = conformance.data(rank)
    eager_p, eager_s = params, avg.init(params)
    comp_p, comp_s = params, avg.init(params)
    problems = []
    for step in range(STEPS):
        eager_p, eager_s = step_fn(eager_p, eager_s, xs[step], ys[step], step)
        comp_p, comp_s = compiled(comp_p, comp_s, xs[step], ys[step], step)
        for key in eager_p:
            if not _bits(eager_p[key], comp_p[key]):
                gap = (eager_p[key].double() - comp_p[key].double()).abs().max().item()
                problems.append(f"step {step} params[{key!r}] differs by {gap:.3g}")
        e_leaves = torch.utils._pytree.tree_leaves(eager_s)
        c_leaves = torch.utils._pytree.tree_leaves(comp_s)
        if len(e_leaves) != len(c_leaves):
            problems.append(f"step {step}: the states have {len(e_leaves)} and {len(c_leaves)} leaves")
        for k, (e, c) in enumerate(zip(e_leaves, c_leaves)):
            if isinstance(e, torch.Tensor) and not _bits(e, torch.as_tensor(c)):
                problems.append(f"step {step}: state leaf {k} differs")
    moved = any(not _bits(comp_p[k], params[k]) for k in conformance.FLOAT_KEYS)
    if not moved:
        problems.append("the compiled run never changed the params")
    return problems


def _reduce_checks(rank: int, world: int) -> dict[str, object]:
    """The Reduce itself under compile: in the graph, torch's bits, a non-member's input back."""
    reduce = collectives.all_reduce_mean(timeout=60)
    x = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1) + 0.1
    graphs: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(str(gm.graph))
        return gm.forward

    mean = torch.compile(lambda t: reduce(t.clone()), fullgraph=True, backend=backend)
    got = mean(x)
    # torch's average_parameters: divide by the world size, then all-reduce a sum
    expected = x / world
    dist.all_reduce(expected)
    only_zero = dist.new_group([0])
    outside = collectives.all_reduce_mean(only_zero)
    kept = torch.compile(lambda t: outside(t.clone()), fullgraph=True, backend="eager")(x)
    return {
        "equal": _bits(got, expected),
        "functional": any("all_reduce" in g for g in graphs),
        "outside": _bits(kept, x),
    }


GROUP_TIMEOUT = 2.0  # seconds: the process group's own timeout, for the stall below
MARGIN = 3.0  # seconds a survivor may take past it to raise, on a loaded machine


def _stall(rank: int) -> object:
    """Rank 1 stalls in a compiled step: rank 0's graph raises after the group's own timeout."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    reduce = collectives.all_reduce_mean(group, timeout=60)  # not honoured in a graph
    mean = torch.compile(lambda t: reduce(t.clone()), fullgraph=True, backend="eager")
    x = torch.ones(4)
    mean(x)  # compiled on both ranks, and one round that completes
    if rank == 1:
        time.sleep(GROUP_TIMEOUT + MARGIN + 1)
        return None
    started = time.monotonic()
    try:
        mean(x)
    except RuntimeError as error:
        return (type(error).__name__, str(error)[:300], time.monotonic() - started)
    return ("no error", "", time.monotonic() - started)


def _world(rank: int, world: int) -> dict[str, object]:
    with torch.compiler.config.patch(dynamic_sources=DYNAMIC_STEP):
        results: dict[str, object] = {"<reduce>": _reduce_checks(rank, world)}
        for name in conformance.NAMES:
            try:
                results[name] = _compare_averager(rank, world, name)
            except Exception as error:  # reported per averager by the tests below
                results[name] = [f"{type(error).__name__}: {str(error)[:2000]}"]
        results["<stall>"] = _stall(rank)  # last: it leaves its group broken
    return results


@pytest.fixture(scope="module")
def world_results() -> list[dict[str, object]]:
    return run_world(_world, WORLD, timeout=600)


def test_reduce_traces_as_a_functional_collective_with_torchs_bits(world_results):
    for rank, results in enumerate(world_results):
        checks = results["<reduce>"]
        assert checks == {"equal": True, "functional": True, "outside": True}, (rank, checks)


def test_stalled_peer_fails_the_compiled_step_after_the_groups_timeout(world_results):
    # In a graph the wait is the functional collective's: torch's RuntimeError after the
    # process group's own timeout, not PeerError after the Reduce's (docs/collectives.md).
    kind, message, waited = world_results[0]["<stall>"]
    assert kind == "RuntimeError", (kind, message)
    assert GROUP_TIMEOUT * 0.9 <= waited <= GROUP_TIMEOUT + MARGIN, (waited, message)
    assert world_results[1]["<stall>"] is None


@pytest.mark.parametrize("name", conformance.NAMES)
def test_compiled_step_equals_eager(world_results, name):
    for rank, results in enumerate(world_results):
        assert results[name] == [], f"rank {rank}, {name}: {results[name]}"
