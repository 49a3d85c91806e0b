"""A mean held in flight across steps, on a real 2-process gloo group.

The Reduce here is torch's functional all-reduce (its result is an
``AsyncCollectiveTensor``, a tensor that waits when first read). Overlapped
DiLoCo starts it at a sync step and reads it at the next one; these tests show,
without timing anything, that the steps in between do not wait on it (the
tensor in the returned state is still un-waited), that the values equal those
of a blocking all-reduce bit for bit, that a failure surfaces in the update
that reads the mean and leaves that update's inputs as they were, and that
``avgfn.state_dict`` waits for a mean in flight.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import avgfn
from _dist import run_world

H = 3


class FunctionalMean:
    """The mean over ``group`` as torch's functional all-reduce returns it: in flight until read."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(tensor / self.size, "sum", self.group)


class BlockingMean:
    """The same mean, waited for inside the call."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor / self.size
        dist.all_reduce(out)
        return out


def _in_flight(t: torch.Tensor) -> bool:
    return isinstance(t, funcol.AsyncCollectiveTensor) and not t.completed


def _params(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4096, generator=g), "b": torch.randn(7, generator=g)}


def _drift(rank: int, step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v - 0.01 * (rank + 1) * (step + 1) * torch.cos(v) for k, v in params.items()}


def _run(rank: int, world: int, reduce: Any, eager: bool) -> dict[str, Any]:
    avg = avgfn.overlapped_diloco(H, reduce=reduce, eager=eager, num_replicas=world)
    params = _params(rank)
    state = avg.init(params)
    history, held, checkpoint = [], [], None
    for step in range(3 * H):
        params, state = avg.update(_drift(rank, step, params), state, step)
        held.append(all(_in_flight(t) for t in state.pending))
        if step == H + 1:  # between two sync steps, with a mean in flight
            checkpoint = avgfn.state_dict(state)
        history.append({k: v.clone() for k, v in params.items()})
    settled = {k: type(v) is torch.Tensor for k, v in checkpoint.items()}
    return {"history": history, "held": held, "checkpoint": {k: v.clone() for k, v in checkpoint.items()},
            "settled": settled}  # fmt: skip


def _streaming(rank: int, world: int, reduce: Any) -> dict[str, Any]:
    # two fragments of 2048 elements, one every 4 steps, each started 2 steps before it is applied
    avg = avgfn.streaming_diloco(8, reduce=reduce, num_fragments=2, delay=2, alpha=0.5)
    params = {"a": _params(rank)["a"][:2048], "b": _params(rank)["a"][2048:]}
    state = avg.init(params)
    history, held = [], []
    for step in range(12):
        params, state = avg.update(_drift(rank, step, params), state, step)
        held.append(_in_flight(state.pending))
        history.append({k: v.clone() for k, v in params.items()})
    return {"history": history, "held": held}


def _world(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "streaming": {
            "functional": _streaming(rank, world, FunctionalMean(dist.group.WORLD, world)),
            "blocking": _streaming(rank, world, BlockingMean(world)),
        }
    }
    for eager in (True, False):
        out[eager] = {
            "functional": _run(rank, world, FunctionalMean(dist.group.WORLD, world), eager),
            "blocking": _run(rank, world, BlockingMean(world), eager),
        }
    return out


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return run_world(_world, 2)


@pytest.mark.parametrize("eager", [True, False])
def test_the_mean_stays_in_flight_until_the_next_sync_step_reads_it(world, eager):
    for rank in range(2):
        held = world[rank][eager]["functional"]["held"]
        # started at steps 2, 5, 8: the state each later step returns still holds it un-waited,
        # up to the sync step that reads it and starts the next
        assert held == [False, False, True, True, True, True, True, True, True], (rank, held)


@pytest.mark.parametrize("eager", [True, False])
def test_a_mean_held_in_flight_gives_the_bits_of_a_blocking_one(world, eager):
    for rank in range(2):
        got, want = world[rank][eager]["functional"], world[rank][eager]["blocking"]
        for step, (a, b) in enumerate(zip(got["history"], want["history"])):
            for k in a:
                assert torch.equal(a[k], b[k]), (rank, eager, step, k)
        assert all(got["settled"].values()), got["settled"]  # state_dict waited: plain tensors
        for k, v in want["checkpoint"].items():
            assert torch.equal(got["checkpoint"][k], v), k


def test_streaming_holds_a_fragment_in_flight_for_its_delay(world):
    for rank in range(2):
        got, want = world[rank]["streaming"]["functional"], world[rank]["streaming"]["blocking"]
        # fragments started at steps 1, 5, 9 and applied at 3, 7, 11: un-waited in between
        assert not got["held"][0]
        assert all(got["held"][s] for s in (1, 2, 5, 6, 9, 10)), (rank, got["held"])
        for step, (a, b) in enumerate(zip(got["history"], want["history"])):
            for k in a:
                assert torch.equal(a[k], b[k]), (rank, step, k)


def _failing_world(rank: int, world: int) -> dict[str, Any]:
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3))
    avg = avgfn.overlapped_diloco(H, reduce=FunctionalMean(group, world), num_replicas=world)
    params = _params(rank)
    state = avg.init(params)
    out: dict[str, Any] = {"started": False, "error_at": None, "unchanged": None}
    for step in range(2 * H):
        local = _drift(rank, step, params)
        if rank == 1 and step == H - 1:
            break  # this peer never joins the mean started at step 2
        before_p = {k: v.clone() for k, v in local.items()}
        before_g = [g.clone() for g in state.global_params]
        before_rounds = int(state.rounds)
        try:
            params, state = avg.update(local, state, step)
        except Exception as error:  # noqa: BLE001 - whatever the wait raises
            out["error_at"] = step
            out["error"] = type(error).__name__
            out["unchanged"] = (
                all(torch.equal(local[k], before_p[k]) for k in local)
                and all(torch.equal(g, b) for g, b in zip(state.global_params, before_g))
                and int(state.rounds) == before_rounds
                and int(state.in_flight) == H - 1
            )
            break
        if step == H - 1:
            out["started"] = all(_in_flight(t) for t in state.pending)  # no error at the start
    return out


def test_a_failure_surfaces_in_the_update_that_reads_the_mean_and_changes_nothing():
    results = run_world(_failing_world, 2)
    first = results[0]
    assert first["started"], first  # the start step returned with the mean in flight
    assert first["error_at"] == 2 * H - 1, first  # raised where the mean is read
    assert first["unchanged"], first
