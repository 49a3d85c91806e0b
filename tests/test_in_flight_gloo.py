"""A mean held in flight across steps, on a real 2-process gloo group.

Two Reduces whose results wait when first read: avgfn's own
``collectives.all_reduce_mean(in_flight=True)`` (a ``MeanInFlight``, which
honours the Reduce's timeout and raises ``PeerError``) and torch's functional
all-reduce (an ``AsyncCollectiveTensor``). Overlapped
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
from avgfn import collectives

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
    kinds = (funcol.AsyncCollectiveTensor, collectives.MeanInFlight)
    return isinstance(t, kinds) and not t.completed


HELD = ("functional", "avgfn")


def _held(kind: str, group: Any, world: int, timeout: float = 60) -> Any:
    if kind == "functional":
        return FunctionalMean(dist.group.WORLD if group is None else group, world)
    return collectives.all_reduce_mean(group, timeout=timeout, in_flight=True)


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


def _streaming(rank: int, world: int, reduce: Any, cut: int = 2048) -> dict[str, Any]:
    # two fragments (of 2048 elements each by default), one every 4 steps, each started 2 steps
    # before it is applied
    avg = avgfn.streaming_diloco(8, reduce=reduce, num_fragments=2, delay=2, alpha=0.5)
    params = {"a": _params(rank)["a"][:cut], "b": _params(rank)["a"][cut:]}
    state = avg.init(params)
    history, held = [], []
    for step in range(12):
        params, state = avg.update(_drift(rank, step, params), state, step)
        held.append(_in_flight(state.pending))
        history.append({k: v.clone() for k, v in params.items()})
    return {"history": history, "held": held}


def _buckets(rank: int, world: int) -> dict[str, Any]:
    """One round in buckets of about one leaf each: every bucket's mean stays in flight."""
    params = {k: v * (rank + 1) for k, v in {"a": torch.randn(4096), "b": torch.randn(4096),
                                             "c": torch.randn(3000)}.items()}  # fmt: skip
    # nonfinite="ignore": the default "raise" checks the mean inside the round, which reads it
    rnd = avgfn.Round(bucket_bytes=2 * 4096 * 4, nonfinite="ignore")  # two buffers of 4096 floats
    held = avgfn.average(params, collectives.all_reduce_mean(in_flight=True), round=rnd)
    in_flight = {k: _in_flight(v) for k, v in held.items()}
    blocking = avgfn.average(params, collectives.all_reduce_mean(), round=rnd)
    return {"in flight": in_flight, "equal": {k: torch.equal(held[k], blocking[k]) for k in params}}


def _world(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {"buckets": _buckets(rank, world)}
    out["streaming"] = {"blocking": _streaming(rank, world, BlockingMean(world))}
    for kind in HELD:
        out["streaming"][kind] = _streaming(rank, world, _held(kind, None, world))
    # unequal fragments (1500 and 2596 elements): a Reduce that says its results are in flight
    # gets the smaller one padded on the wire, so it stays in flight too
    out["unequal"] = {
        "avgfn": _streaming(rank, world, _held("avgfn", None, world), cut=1500),
        "blocking": _streaming(rank, world, BlockingMean(world), cut=1500),
    }
    for eager in (True, False):
        out[eager] = {"blocking": _run(rank, world, BlockingMean(world), eager)}
        for kind in HELD:
            out[eager][kind] = _run(rank, world, _held(kind, None, world), eager)
    return out


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return run_world(_world, 2)


@pytest.mark.parametrize("kind", HELD)
@pytest.mark.parametrize("eager", [True, False])
def test_the_mean_stays_in_flight_until_the_next_sync_step_reads_it(world, eager, kind):
    for rank in range(2):
        held = world[rank][eager][kind]["held"]
        # started at steps 2, 5, 8: the state each later step returns still holds it un-waited,
        # up to the sync step that reads it and starts the next
        assert held == [False, False, True, True, True, True, True, True, True], (rank, held)


@pytest.mark.parametrize("kind", HELD)
@pytest.mark.parametrize("eager", [True, False])
def test_a_mean_held_in_flight_gives_the_bits_of_a_blocking_one(world, eager, kind):
    for rank in range(2):
        got, want = world[rank][eager][kind], world[rank][eager]["blocking"]
        for step, (a, b) in enumerate(zip(got["history"], want["history"])):
            for k in a:
                assert torch.equal(a[k], b[k]), (rank, eager, step, k)
        assert all(got["settled"].values()), got["settled"]  # state_dict waited: plain tensors
        for k, v in want["checkpoint"].items():
            assert torch.equal(got["checkpoint"][k], v), k


@pytest.mark.parametrize("kind", HELD + ("unequal",))
def test_streaming_holds_a_fragment_in_flight_for_its_delay(world, kind):
    for rank in range(2):
        runs = world[rank]["unequal"] if kind == "unequal" else world[rank]["streaming"]
        got, want = runs["avgfn" if kind == "unequal" else kind], runs["blocking"]
        # fragments started at steps 1, 5, 9 and applied at 3, 7, 11: un-waited in between
        assert not got["held"][0]
        assert all(got["held"][s] for s in (1, 2, 5, 6, 9, 10)), (rank, got["held"])
        for step, (a, b) in enumerate(zip(got["history"], want["history"])):
            for k in a:
                assert torch.equal(a[k], b[k]), (rank, step, k)


def _failing_world(rank: int, world: int, kind: str) -> dict[str, Any]:
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3))
    # No per-round agreement nor first-round check: they are collectives that the start step
    # waits for, so a peer missing there fails the start step itself (tests/test_seams_gloo.py);
    # here the peer is missing from the mean only, which fails where the mean is read.
    rnd = avgfn.Round(agree=False, verify=None)
    avg = avgfn.overlapped_diloco(H, reduce=_held(kind, group, world, timeout=3), num_replicas=world, round=rnd)
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


@pytest.mark.parametrize("kind", HELD)
def test_a_failure_surfaces_in_the_update_that_reads_the_mean_and_changes_nothing(kind):
    results = run_world(_failing_world, 2, kind)
    first = results[0]
    assert first["started"], first  # the start step returned with the mean in flight
    assert first["error_at"] == 2 * H - 1, first  # raised where the mean is read
    assert first["unchanged"], first
    if kind == "avgfn":  # the Reduce's own failure: a PeerError, as from a blocking round
        assert first["error"] == "PeerError", first


def test_the_buckets_of_a_round_stay_in_flight_until_read(world):
    # with all_reduce_mean(in_flight=True) a bucketed round launches every bucket's all-reduce
    # and returns: each leaf is a view of its bucket's mean, still on the wire
    for rank in range(2):
        got = world[rank]["buckets"]
        assert got["in flight"] == {"a": True, "b": True, "c": True}, got
        assert all(got["equal"].values()), got


def test_a_forwarding_reduce_says_what_its_inner_reduce_says():
    class Counting(avgfn.ForwardingReduce):
        pass

    class Held:
        in_flight = True

        def __call__(self, tensor):
            return tensor

    assert Counting(Held()).in_flight is True
    assert Counting(lambda t: t).in_flight is False


def _ops_on_a_mean_in_flight(rank: int, world: int) -> dict[str, Any]:
    import copy
    import io

    held = collectives.all_reduce_mean(in_flight=True, timeout=30)
    fresh = lambda: held(torch.arange(4.0))  # noqa: E731
    buf = io.BytesIO()
    torch.save(fresh(), buf)
    buf.seek(0)
    view = fresh()[1:3]
    # params that are means still in flight (a round with nonfinite="ignore" returns them),
    # handed to a donated round: before, it failed on their missing storage
    params = avgfn.average({"a": torch.arange(5.0), "b": torch.ones(3)}, held, round=avgfn.Round(nonfinite="ignore"))
    donated = avgfn.average(params, held, round=avgfn.Round(donate=True))
    return {
        "donated": {k: (type(v).__name__, v.tolist()) for k, v in donated.items()},
        "view in flight": _in_flight(view),
        "tolist": fresh().tolist(),
        "deepcopy": copy.deepcopy(fresh()),
        "repr": repr(fresh()),
        "saved": torch.load(buf, weights_only=True),
        "stack": torch.stack([fresh(), torch.ones(4)]),
        "item": fresh()[2].item(),
        "plain results": type(fresh() + 1) is torch.Tensor and type(fresh().double()) is torch.Tensor,
        "view read": view.tolist(),
    }


def test_a_mean_in_flight_reads_as_a_tensor_through_every_kind_of_use():
    got = run_world(_ops_on_a_mean_in_flight, 1)[0]
    assert got["view in flight"] and got["plain results"]
    assert got["donated"] == {"a": ("Tensor", [0.0, 1.0, 2.0, 3.0, 4.0]), "b": ("Tensor", [1.0, 1.0, 1.0])}
    assert got["tolist"] == [0.0, 1.0, 2.0, 3.0] and got["view read"] == [1.0, 2.0]
    assert type(got["deepcopy"]) is torch.Tensor and torch.equal(got["deepcopy"], torch.arange(4.0))
    assert got["repr"] == "tensor([0., 1., 2., 3.])"
    assert torch.equal(got["saved"], torch.arange(4.0))
    assert torch.equal(got["stack"][0], torch.arange(4.0)) and got["item"] == 2.0


def _compiled_after_settling(rank: int, world: int) -> dict[str, Any]:
    held = collectives.all_reduce_mean(in_flight=True, timeout=30)
    avg = avgfn.streaming_diloco(4, reduce=held, num_fragments=2, delay=1, round=avgfn.Round(agree=False))
    params = {"a": torch.arange(4.0), "b": torch.arange(3.0)}
    state = avg.init(params)
    params, state = avg.update({k: v + 1 for k, v in params.items()}, state, 0)  # fragment a starts
    in_flight = _in_flight(state.pending)
    plain = collectives.settled(state)
    compiled = torch.compile(lambda p: p * 2, fullgraph=True, backend="eager")
    return {
        "in flight": in_flight,
        "plain": type(plain.pending) is torch.Tensor,
        "same rounds object": plain.rounds is state.rounds,
        "compiled": compiled(plain.pending),
        "want": state.pending * 2,
    }


def test_settled_hands_a_compiled_function_plain_tensors():
    got = run_world(_compiled_after_settling, 1)[0]
    assert got["in flight"] and got["plain"] and got["same rounds object"]
    assert torch.equal(got["compiled"], got["want"])
