"""Rounds a group's history predicts carry their agreement in the data, on real gloo groups.

Once a group's past rounds predict the next one (the same layout twice in a
row), a plain round in a group of two appends its agreement's check to the
data: one collective instead of two, with the bits of the round whose
agreement comes first. Replicas that disagree at such a round (another
selection, another step, other options, nothing to average) must still all
raise `ReplicaMismatchError` before any value reaches the caller, and the
group must go on working. Larger groups keep the agreement first.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import utils as torch_utils

import avgfn
from _dist import run_world
from _groups import Pair
from avgfn import collectives
from avgfn._round import predicted as _predicted


def _counted(fn: Any) -> tuple[Any, list[int]]:
    """Run ``fn``; also return the element counts of the all-reduces it started, in order."""
    sizes: list[int] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        out = fn()
    finally:
        dist.all_reduce = original
    return out, sizes


def _params(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {"w": torch.randn(40, 3, generator=g), "b": torch.randn(3, generator=g), "s": torch.randn((), generator=g)}


def _outcome(fn: Any, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    before = {k: v.clone() for k, v in params.items()}
    try:
        fn()
        error, message = None, ""
    except avgfn.AveragingError as exc:
        error, message = type(exc).__name__, str(exc)
    unchanged = all(torch.equal(params[k].view(torch.int32), before[k].view(torch.int32)) for k in params)  # bits: NaN too
    return {"error": error, "message": message, "unchanged": unchanged}


def _torch_mean(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    copies = [torch.nn.Parameter(v.clone()) for v in params.values()]
    torch_utils.average_parameters(iter(copies), None)
    return {k: c.detach() for k, c in zip(params, copies)}


def _healthy(rank: int, world: int) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    avg = avgfn.periodic(1, reduce=reduce)
    params = _params(rank)
    state = avg.init(params)
    calls, equal = [], []
    for step in range(6):
        (out, state), n = _counted(lambda: avg.update(params, state, step))
        calls.append("one" if n == [124 + _predicted.CHECK] else "agreement first" if n == [4, 124] else n)
        expected = _torch_mean(params)
        equal.append(all(torch.equal(out[k], expected[k]) for k in params))
        params = {k: v + (rank + 1) * 0.25 for k, v in out.items()}
    return {"calls": calls, "equal": equal}


@pytest.mark.parametrize("world", [2, 3])
def test_a_predicted_round_is_one_collective_with_the_bits_of_torch(world):
    for rank, got in enumerate(run_world(_healthy, world, timeout=240)):
        assert got["equal"] == [True] * 6, (rank, got)
        # three rounds to learn the layout, then one collective (a group of two only)
        expected = ["agreement first"] * 3 + (["one"] * 3 if world == 2 else ["agreement first"] * 3)
        assert got["calls"] == expected, (rank, got)


def _disagreements(rank: int, world: int) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    avg = avgfn.periodic(1, reduce=reduce)
    params = _params(rank)
    state = avg.init(params)
    found: dict[str, Any] = {}

    def warm() -> None:
        for step in range(4):
            avg.update(params, state, step)

    cases = {
        # a selection of another size (torch's filter, a parameter unused on one rank)
        "selection": lambda: avgfn.periodic(
            1, reduce=reduce, where=(lambda p: True) if rank == 0 else (lambda p: p.ndim > 0)
        ).update(params, state, 9),
        # the same number of elements, other leaves
        "same size": lambda: avgfn.average(
            {"x": params["w"][:, :2]} if rank == 0 else {"y": params["w"][:, 1:]}, reduce
        ),
        "step": lambda: avg.update(params, state, 9 + rank),
        # options that run other collectives (buckets); donation alone does not, up to the limit
        "options": lambda: avgfn.periodic(
            1, reduce=reduce, round=avgfn.Round(donate=True, bucket_bytes=256 if rank == 1 else None)
        ).update({k: v.clone() for k, v in params.items()}, state, 9),
        "nothing": lambda: avgfn.periodic(
            1, reduce=reduce, where=(lambda p: True) if rank == 0 else (lambda p: False)
        ).update(params, state, 9),
    }
    for name, case in cases.items():
        warm()
        _, before = _counted(lambda: avg.update(params, state, 5))
        found[name] = _outcome(case, params)
        found[name]["predicted before"] = before == [124 + _predicted.CHECK]
        # the group goes on: an agreed round after the refusal has the right mean
        out, _ = avg.update(params, state, 6)
        found[name]["after"] = all(torch.equal(out[k], _torch_mean(params)[k]) for k in params)
    return found


@pytest.fixture(scope="module")
def disagreements() -> list[dict[str, Any]]:
    return run_world(_disagreements, 2, timeout=300)


@pytest.mark.parametrize("case", ["selection", "same size", "step", "options", "nothing"])
def test_replicas_that_disagree_at_a_predicted_round_all_raise_and_nothing_changes(disagreements, case):
    for rank, found in enumerate(disagreements):
        got = found[case]
        assert got["predicted before"], (rank, got)
        assert got["error"] == "ReplicaMismatchError" and got["unchanged"] and got["after"], (rank, got)


def test_the_mismatch_message_names_what_differs(disagreements):
    assert "step 9, rank 1 at step 10" in disagreements[0]["step"]["message"]
    assert "rank 1 has no leaf ['w']" in disagreements[0]["selection"]["message"] or "['s']" in (
        disagreements[0]["selection"]["message"]
    )


def _alternating(rank: int, world: int) -> dict[str, Any]:
    """Two averagers of different sizes take turns on one group, another kind of round between."""
    reduce = collectives.all_reduce_mean(timeout=60)
    small, large = _params(rank), {"w": torch.randn(300, generator=torch.Generator().manual_seed(rank + 5))}
    avg = avgfn.periodic(1, reduce=reduce)
    weighted = avgfn.weighted(1, reduce=reduce, weight=float(rank + 1))
    s_state, l_state, w_state = avg.init(small), avg.init(large), weighted.init(small)
    calls, equal = [], []
    for step in range(8):
        for tree, state in ((small, s_state), (large, l_state)):
            (out, _), n = _counted(lambda: avg.update(tree, state, step))
            calls.append(len(n) == 1)  # one collective
            expected = _torch_mean(tree)
            equal.append(all(torch.equal(out[k], expected[k]) for k in tree))
        if step == 5:  # a weighted round between: its agreement takes part in the predicted collective
            out, w_state = weighted.update(small, w_state, step)
            weights = [float(r + 1) for r in range(world)]
            trees = [_params(r) for r in range(world)]
            for k in small:
                expected_w = sum(w * t[k] for w, t in zip(weights, trees)) / sum(weights)
                equal.append(torch.allclose(out[k], expected_w, atol=1e-6))
    return {"calls": calls, "equal": equal}


def test_rounds_that_take_turns_are_predicted_and_another_kind_of_round_between_is_taken_part_in():
    for rank, got in enumerate(run_world(_alternating, 2, timeout=240)):
        assert all(got["equal"]), (rank, got)
        assert got["calls"][:5] == [False] * 5 and all(got["calls"][5:12]), (rank, got)  # learned after three turns
        # after the weighted round the small tree's turn is relearned, the large one's is kept
        assert got["calls"][-4:] == [False, True, False, True], (rank, got)


def _nan(rank: int, world: int) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    avg = avgfn.periodic(1, reduce=reduce)
    params = _params(rank)
    state = avg.init(params)
    for step in range(4):
        avg.update(params, state, step)
    sick = {k: v.clone() for k, v in params.items()}
    if rank == 1:
        sick["b"][1] = float("nan")
    found = _outcome(lambda: avg.update(sick, state, 4), sick)
    out, _ = avg.update(params, state, 5)
    found["after"] = all(torch.equal(out[k], _torch_mean(params)[k]) for k in params)
    return found


def test_a_nan_at_a_predicted_round_raises_everywhere_naming_the_leaf():
    for rank, got in enumerate(run_world(_nan, 2, timeout=240)):
        assert got["error"] == "NonFiniteError" and "['b']" in got["message"], (rank, got)
        assert got["unchanged"] and got["after"], (rank, got)


def _vouched(rank: int, world: int) -> dict[str, Any]:
    from avgfn._round import health

    reads: list[int] = []
    original = health.Watch.add

    def counting(self: Any, buffer: torch.Tensor) -> None:
        reads.append(buffer.numel())
        original(self, buffer)

    health.Watch.add = counting  # type: ignore[method-assign]
    big = torch.finfo(torch.float32).max
    found: dict[str, Any] = {}
    for policy in ("raise", "skip"):
        avg = avgfn.periodic(1, reduce=collectives.all_reduce_mean(timeout=60), round=avgfn.Round(nonfinite=policy))
        params = _params(rank)
        state = avg.init(params)
        for step in range(4):  # learn the layout
            avg.update(params, state, step)
        cases = {
            "finite": {},
            # the largest finite value on both replicas: its halves sum to it, no overflow
            "largest": {"w": (0, big), "b": (1, -big)},
            "nan on rank 1": {"b": (1, float("nan"))} if rank == 1 else {},
            "inf and -inf": {"s": ((), float("inf") if rank == 0 else float("-inf"))},
            "inf on rank 0, nan on rank 1": {"s": ((), float("inf"))} if rank == 0 else {"w": (2, float("nan"))},
        }
        for name, changes in cases.items():
            sent = {k: v.clone() for k, v in params.items()}
            for key, (index, value) in changes.items():
                sent[key][index] = value
            del reads[:]
            before = {k: v.clone() for k, v in sent.items()}
            try:
                (out, _), calls = _counted(lambda: avg.update(sent, state, 4))
                got = {"error": None, "calls": calls, "out": out}
            except avgfn.AveragingError as exc:
                got = {"error": type(exc).__name__, "message": str(exc)}
            got["unchanged"] = all(torch.equal(sent[k].view(torch.int32), before[k].view(torch.int32)) for k in sent)
            got["mean read"] = bool(reads)
            found[(policy, name)] = got
        out, _ = avg.update(params, state, 5)
        found[(policy, "after")] = all(torch.equal(out[k], _torch_mean(params)[k]) for k in params)
    health.Watch.add = original  # type: ignore[method-assign]
    return found


def test_a_predicted_round_reads_its_values_as_it_divides_them_and_its_mean_only_when_a_replica_is_not_finite():
    for rank, got in enumerate(run_world(_vouched, 2, timeout=240)):
        for policy in ("raise", "skip"):
            finite = got[(policy, "finite")]
            assert finite["error"] is None and finite["calls"] == [124 + _predicted.CHECK], (rank, finite)
            assert not finite["mean read"], (rank, finite)  # both shares vouched finite: the mean is not read
            largest = got[(policy, "largest")]
            assert largest["error"] is None and not largest["mean read"], (rank, largest)
            big = torch.finfo(torch.float32).max
            assert largest["out"]["w"][0].eq(big).all() and largest["out"]["b"][1].eq(-big).all(), (rank, largest)
            for name in ("nan on rank 1", "inf and -inf", "inf on rank 0, nan on rank 1"):
                case = got[(policy, name)]
                assert case["unchanged"] and case["mean read"], (rank, name, case)
                if policy == "raise":
                    assert case["error"] == "NonFiniteError", (rank, name, case)
                else:
                    assert case["error"] is None and all(case["out"][k] is not None for k in case["out"]), case
                    assert case["calls"] == [124 + _predicted.CHECK], (rank, name, case)
            assert "['b']" in got[("raise", "nan on rank 1")]["message"], (rank, got)
            assert got[(policy, "after")], (rank, policy)
        skipped = got[("skip", "nan on rank 1")]["out"]
        assert all(torch.equal(skipped[k], v) for k, v in _params(rank).items() if k != "b"), (rank, skipped)


def test_the_history_predicts_a_layout_seen_twice_in_a_row():
    history = _predicted.History()
    cpu = torch.device("cpu")
    a, b = (10, torch.float32, cpu), (20, torch.float32, cpu)
    assert history.predicted() is None
    history.record(a)
    history.record(a)
    assert history.predicted() is None  # a -> a seen once
    history.record(a)
    assert history.predicted() == a
    history.record(b)  # a -> b breaks the streak
    history.record(a)
    assert history.predicted() is None
    history.record(None)  # a round of another kind
    history.record(None)
    history.record(None)
    assert history.predicted() is None  # such rounds are never predicted
    history.refused()
    assert history.predicted() is None
    history.forget()
    assert history.last is None and not history.successors




def test_the_check_passes_only_when_both_replicas_sent_the_same_digest():
    cpu = torch.device("cpu")
    digest = bytes([0, 1, 17, 200, 255, 3, 9, 128])
    mine = _predicted.block(digest, torch.float32, cpu)
    assert _predicted.passed(mine + mine, digest) == (True, False)
    other = bytes([0, 1, 17, 200, 255, 3, 9, 127])
    theirs = _predicted.block(other, torch.float32, cpu)
    assert not _predicted.passed(mine + theirs, digest)[0] and not _predicted.passed(mine + theirs, other)[0]
    # bytes off by +1 and -1 have the same sum; their squares tell them apart
    up, down, middle = bytes([5] * 8), bytes([3] * 8), bytes([4] * 8)
    pair = _predicted.block(up, torch.float32, cpu) + _predicted.block(down, torch.float32, cpu)
    assert not _predicted.passed(pair, middle)[0]
    declined = torch.zeros(_predicted.CHECK)
    declined[_predicted.MARKER] = 1
    assert not _predicted.passed(mine + declined, digest)[0]
    top = bytes([255] * 8)
    assert _predicted.passed(_predicted.block(top, torch.float32, cpu) * 2, top) == (True, False)


def test_the_mean_goes_unread_only_when_both_replicas_vouch_for_their_shares():
    cpu = torch.device("cpu")
    digest = bytes(range(8))
    vouching = _predicted.block(digest, torch.float64, cpu)
    vouching[_predicted.VOUCH] = 1
    silent = _predicted.block(digest, torch.float64, cpu)
    assert _predicted.passed(vouching + vouching, digest) == (True, True)
    assert _predicted.passed(vouching + silent, digest) == (True, False)  # one replica read nothing
    assert _predicted.passed(silent + silent, digest) == (True, False)


class _Watched(avgfn.ForwardingReduce):
    """A wrapper that sees every tensor and passes it on unchanged."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.seen: list[int] = []

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        self.seen.append(tensor.numel())


class _WatchedInData(_Watched):
    agree_in_data = True


def _wrapped(rank: int, world: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kind in (_Watched, _WatchedInData):
        reduce = kind(collectives.all_reduce_mean(timeout=60))
        avg = avgfn.periodic(1, reduce=reduce)
        params = _params(rank)
        state = avg.init(params)
        for step in range(5):
            (out, state), n = _counted(lambda: avg.update(params, state, step))
        found[kind.__name__] = {"last": n, "equal": all(torch.equal(out[k], _torch_mean(params)[k]) for k in params)}
    return found


def test_a_wrapper_keeps_the_check_first_unless_it_says_it_passes_tensors_on():
    for rank, got in enumerate(run_world(_wrapped, 2, timeout=240)):
        assert got["_Watched"] == {"last": [4, 124], "equal": True}, (rank, got)
        assert got["_WatchedInData"] == {"last": [124 + _predicted.CHECK], "equal": True}, (rank, got)


def _options_differ(rank: int, world: int, count: int) -> dict[str, Any]:
    # the replicas' rounds differ only in donation, under "ignore" (no health
    # exchange tells them apart). Up to the limit a donated round runs as the
    # pure one does (its check in its data): the replicas run the same
    # collectives and average. Past it, the donated round is a collective of
    # its own after its check and the pure one is not: they must refuse
    # together, not drift apart.
    reduce = collectives.all_reduce_mean(timeout=60)
    rnd = avgfn.Round(nonfinite="ignore", donate=rank == 1, verify=None)
    avg = avgfn.periodic(1, reduce=reduce, round=rnd)
    g = torch.Generator().manual_seed(rank)
    params = {"w": torch.randn(count, generator=g), "b": torch.randn(3, generator=g)}
    state = avg.init(params)
    outcomes, calls, equal = [], [], []
    for step in range(6):
        fresh = {k: v.clone() for k, v in params.items()}
        out: dict[str, Any] = {}

        def run() -> None:
            (out["params"], _), out["calls"] = _counted(lambda: avg.update(fresh, state, step))

        outcomes.append(_outcome(run, fresh))
        if "params" in out:
            calls.append(out["calls"])
            equal.append(all(torch.equal(out["params"][k], _torch_mean(params)[k]) for k in params))
    return {"outcomes": outcomes, "calls": calls, "equal": equal}


def test_replicas_that_differ_only_in_donation_average_alike_up_to_the_limit():
    count = 120
    for rank, got in enumerate(run_world(_options_differ, 2, count, timeout=120)):
        assert [o["error"] for o in got["outcomes"]] == [None] * 6, (rank, got["outcomes"])
        assert got["equal"] == [True] * 6, (rank, got)
        n = count + 3
        assert got["calls"] == [[4, n]] * 3 + [[n + _predicted.CHECK]] * 3, (rank, got["calls"])


def test_replicas_whose_rounds_run_other_collectives_refuse_every_round():
    for rank, got in enumerate(run_world(_options_differ, 2, _predicted.LIMIT, timeout=240)):
        for outcome in got["outcomes"]:
            assert outcome["error"] == "ReplicaMismatchError", (rank, outcome)
            assert "donate=False" in outcome["message"] and "donate=True" in outcome["message"]
            assert outcome["unchanged"], (rank, outcome)


def _donated(rank: int, world: int) -> dict[str, Any]:
    # a donated round in a group of two runs as the pure one: once its rounds
    # repeat, one collective with the check in its data; the donated params
    # are not written (a failed check would otherwise have mixed them)
    reduce = collectives.all_reduce_mean(timeout=60)
    avg = avgfn.periodic(1, reduce=reduce, round=avgfn.Round(donate=True))
    params = _params(rank)
    state = avg.init(params)
    calls, equal, untouched = [], [], []
    for step in range(6):
        donated = {k: v.clone() for k, v in params.items()}
        (out, state), n = _counted(lambda: avg.update(donated, state, step))
        calls.append(n)
        equal.append(all(torch.equal(out[k], _torch_mean(params)[k]) for k in params))
        untouched.append(all(torch.equal(donated[k], params[k]) for k in params))
    donated = {k: v.clone() for k, v in params.items()}
    if rank == 1:
        donated["w"][3, 1] = float("nan")
    nan = _outcome(lambda: avg.update(donated, state, 6), donated)
    return {"calls": calls, "equal": equal, "untouched": untouched, "nan": nan}


def test_a_donated_round_in_a_pair_is_one_collective_and_writes_nothing_it_may_refuse():
    for rank, got in enumerate(run_world(_donated, 2, timeout=120)):
        assert got["calls"] == [[4, 124]] * 3 + [[124 + _predicted.CHECK]] * 3, (rank, got)
        assert got["equal"] == [True] * 6 and got["untouched"] == [True] * 6, (rank, got)
        assert got["nan"]["error"] == "NonFiniteError" and got["nan"]["unchanged"], (rank, got)
        assert "restore" not in got["nan"]["message"], (rank, got)  # nothing was written


def _regrouped(rank: int, world: int, store: str) -> dict[str, Any]:
    # rank 0 keeps its Reduce across a new default group; rank 1 starts afresh,
    # as a process that was restarted does: rank 0's history must not outlive
    # the group it was learned on
    reduce = collectives.all_reduce_mean(timeout=60)
    params = _params(rank)
    avg = avgfn.periodic(1, reduce=reduce, round=avgfn.Round(verify=None))
    state = avg.init(params)
    for step in range(5):
        avg.update(params, state, step)
    dist.barrier()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if rank == 1:
        reduce = collectives.all_reduce_mean(timeout=60)
        avg = avgfn.periodic(1, reduce=reduce, round=avgfn.Round(verify=None))
    calls, equal = [], []
    for step in range(5, 10):
        (out, state), n = _counted(lambda: avg.update(params, state, step))
        calls.append(n)
        equal.append(all(torch.equal(out[k], _torch_mean(params)[k]) for k in params))
    return {"calls": calls, "equal": equal}


def test_a_history_restarts_with_a_new_default_group(tmp_path):
    for rank, got in enumerate(run_world(_regrouped, 2, str(tmp_path / "store"), timeout=120)):
        assert got["equal"] == [True] * 5, (rank, got)
        assert got["calls"] == [[4, 124]] * 3 + [[124 + _predicted.CHECK]] * 2, (rank, got)


class _Pair(Pair):
    """A fake group of two whose rounds may be predicted."""

    agree_in_data = True


def test_a_declined_or_failed_prediction_is_noted_alike_on_both_sides():
    cpu = torch.device("cpu")
    predicted, other = (10, torch.float32, cpu), (10, torch.float32, torch.device("meta"))
    for side in ("declines", "check failed"):
        pair = _Pair()
        history = _predicted.history(pair)
        assert history is not None
        for _ in range(3):
            history.record(predicted)
        assert history.predicted() == predicted
        if side == "declines":  # a round of the same digest but another layout
            gate = _predicted.start(pair, other, b"\x00" * 8, lambda: [], None)
            assert pair.sums == [10 + _predicted.CHECK]  # it took part in the predicted collective
        else:  # the predicted round whose check did not pass; the agreement then passed
            gate = _predicted.Predicted(history, predicted, b"\x00" * 8, lambda: []).fallback(pair)
        gate.wait()
        assert history.last == _predicted._OTHER, side


def _hierarchy(rank: int, world: int) -> dict[str, Any]:
    from collections import OrderedDict

    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager,
    )

    sizes = OrderedDict([(2, 2), (4, 4)])
    ref = HierarchicalModelAverager(sizes, warmup_steps=0)
    avg = avgfn.hierarchical(collectives.hierarchy(sizes), warmup_steps=0)
    params = _params(rank)
    copies = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p in copies:
        p.grad = torch.zeros_like(p)  # torch's filter averages the params with a gradient
    state = avg.init(params)
    calls, equal = [], []
    for step in range(1, 17):
        (out, state), n = _counted(lambda: avg.update(params, state, step))
        ref.step = step
        ref.average_parameters(iter(copies))
        calls.append(n)
        equal.append(all(torch.equal(out[k], c.detach()) for k, c in zip(params, copies)))
        params = {k: v + 0.25 * (rank + 1) for k, v in out.items()}
        with torch.no_grad():
            for c in copies:
                c.add_(0.25 * (rank + 1))
    return {"calls": calls, "equal": equal}


def test_a_group_of_two_inside_a_hierarchy_predicts_its_rounds_with_torchs_bits():
    for rank, got in enumerate(run_world(_hierarchy, 4, timeout=240)):
        assert got["equal"] == [True] * 16, (rank, got)
        # the pairs' rounds (steps 2, 6, 10, 14): the fourth is one collective; the
        # world of four (steps 4, 8, 12, 16) keeps its check first
        pairs = [got["calls"][step - 1] for step in (2, 6, 10, 14)]
        assert pairs == [[4, 124]] * 3 + [[124 + _predicted.CHECK]], (rank, got)
        assert all(got["calls"][step - 1] == [4, 124] for step in (4, 8, 12, 16)), (rank, got)
