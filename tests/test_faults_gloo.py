"""Faults on real gloo groups: a peer killed or stalled mid-round, NaN, mismatched replicas.

Three worlds of three processes:

* ``bad input, then a stall``: non-finite params under the ``"raise"`` and
  ``"exclude"`` policies, replicas whose params differ in structure or in
  value at ``init``, and finally rank 2 stalling (sleeping) in the middle of a
  round, first against a Reduce with its own timeout, then against one that
  uses its group's timeout, then in the replica check of ``init``;
* ``kill``: a training run with a checkpoint every few steps, in which rank 2
  SIGKILLs itself between two buckets of an averaging round (and the
  survivors' next ``init`` sees the broken group at once);
* ``restart``: the same training run resumed from the last checkpoint of
  the killed world, next to the same run uninterrupted.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import avgfn
from _dist import run_world
from _faults import run_faulty_world

NAN = float("nan")
MARGIN = 2.0  # seconds a survivor may take past the timeout to raise


# --- helpers that run inside the ranks -------------------------------------------------


def _snapshot(tree: Any) -> list[tuple[int, Any]]:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return [(id(x), x.clone() if isinstance(x, torch.Tensor) else x) for x in leaves]


def _unchanged(tree: Any, snapshot: list[tuple[int, Any]]) -> bool:
    """The same leaf objects holding the same bits (NaN counts as equal to NaN)."""
    leaves = torch.utils._pytree.tree_leaves(tree)
    if len(leaves) != len(snapshot):
        return False
    for leaf, (ident, copy) in zip(leaves, snapshot):
        if id(leaf) != ident:
            return False
        if isinstance(leaf, torch.Tensor):
            if leaf.dtype != copy.dtype or leaf.shape != copy.shape:
                return False
            if not torch.equal(leaf.view(-1).view(torch.uint8), copy.view(-1).view(torch.uint8)):
                return False
        elif leaf != copy:
            return False
    return True


def _attempt(fn, *inputs, **options) -> dict[str, Any]:
    """Call ``fn(*inputs)``; report the error (if any), the time, and whether inputs survived."""
    snapshot = _snapshot(inputs)
    started = time.monotonic()
    try:
        value = fn(*inputs, **options)
        error = None
    except Exception as e:  # noqa: BLE001 - the error is the result
        value, error = None, e
    out = {
        "elapsed": time.monotonic() - started,
        "unchanged": _unchanged(inputs, snapshot),
        "value": value,
        "error": None if error is None else type(error).__name__,
        "message": None if error is None else str(error),
    }
    for name in ("step", "paths", "timeout", "group"):
        if error is not None and hasattr(error, name):
            out[name] = getattr(error, name)
    return out


class FaultyReduce(avgfn.ForwardingReduce):
    """A rank's Reduce that misbehaves at the ``at``-th data buffer once armed: dies or sleeps."""

    def __init__(self, inner: avgfn.collectives.GroupMean, fault: str, at: int = 2) -> None:
        super().__init__(inner)
        self.fault = fault
        self.at = at
        self.armed = False
        self.calls = 0

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        if self.armed:
            self.calls += 1
            if self.calls == self.at:
                if self.fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(300)  # "stall": the harness kills this rank


def _params(rank: int) -> dict[str, Any]:
    """The replicas differ (they took local steps), but share one structure."""
    return {
        "w": torch.arange(6.0).reshape(2, 3) * (rank + 1),
        "b": torch.tensor([0.5, -1.0], dtype=torch.float64) + rank,
        "n": torch.tensor(rank),  # an int leaf: never averaged
    }


# --- world 1: bad input, then a stalled peer ----------------------------------------------


def _bad_input_then_stall(
    rank: int, world: int, own_timeout: float, group_timeout: float, folder: str
) -> dict:
    out: dict[str, Any] = {}
    slow_group = dist.new_group(timeout=datetime.timedelta(seconds=group_timeout))
    mean = avgfn.collectives.all_reduce_mean(timeout=30)

    # Non-finite params on rank 1, default policy: every rank raises, nothing changes.
    params = _params(rank)
    if rank == 1:
        params["b"] = torch.tensor([0.5, NAN], dtype=torch.float64)
    averagers = {
        "periodic": avgfn.periodic(2, reduce=mean),
        "buckets": avgfn.periodic(2, reduce=mean, round=avgfn.Round(bucket_bytes=32)),
        "donate": avgfn.periodic(2, reduce=mean, round=avgfn.Round(donate=True)),
        "hierarchical": avgfn.hierarchical([(2, mean), (4, mean)]),
    }
    for name, avg in averagers.items():
        state = avg.init(params)
        out[f"raise/{name}"] = _attempt(avg.update, params, state, 4)
    out["raise/average"] = _attempt(avgfn.average, params, mean)

    # ...under "exclude", ranks 0 and 2 average among themselves, and rank 1 gets that mean.
    for name, kwargs in {"periodic": {}, "buckets": {"bucket_bytes": 32}}.items():
        avg = avgfn.periodic(2, reduce=mean, round=avgfn.Round(nonfinite="exclude", **kwargs))
        bad = _params(rank)
        if rank == 1:
            bad["w"] = bad["w"].clone()
            bad["w"][0, 1] = -math.inf
        out[f"exclude/{name}"] = _attempt(avg.update, bad, avg.init(bad), 2)
    everywhere = {"w": torch.full((3,), NAN)}
    out["exclude/all-bad"] = _attempt(avgfn.average, everywhere, mean, round=avgfn.Round(nonfinite="exclude"))

    # Replicas that differ in structure: init raises on every rank (and the group lives on).
    mismatches = {
        "shape": lambda p: {**p, "w": torch.zeros(2, 4)} if rank == 2 else p,
        "dtype": lambda p: {**p, "b": p["b"].float()} if rank == 1 else p,
        "missing": lambda p: {k: v for k, v in p.items() if k != "b"} if rank == 0 else p,
    }
    for name, change in mismatches.items():
        p = change(_params(0))
        out[f"mismatch/{name}"] = _attempt(avgfn.periodic(2, reduce=mean).init, p)
    p = mismatches["shape"](_params(0))
    out["mismatch/hierarchical"] = _attempt(avgfn.hierarchical([(2, mean), (4, mean)]).init, p)
    out["mismatch/unchecked"] = _attempt(avgfn.periodic(2, reduce=mean, round=avgfn.Round(verify=None)).init, p)
    # verify="values": identical starting values pass; different ones do not.
    out["values/same"] = _attempt(avgfn.periodic(2, reduce=mean, round=avgfn.Round(verify="values")).init, _params(0))
    out["values/different"] = _attempt(
        avgfn.periodic(2, reduce=mean, round=avgfn.Round(verify="values")).init, _params(rank)
    )
    # The group still works after all that.
    out["after"] = avgfn.average({"x": torch.tensor([float(rank)])}, mean)["x"].item()

    # Rank 2 will not return: it leaves its results so far in a file.
    torch.save(out, os.path.join(folder, f"bad-input{rank}.pt"))

    # Rank 2 stalls between two buckets of a round; ranks 0 and 1 must not wait past the timeout.
    fast = avgfn.collectives.all_reduce_mean(timeout=own_timeout)
    reduce = FaultyReduce(fast, "stall") if rank == 2 else fast
    avg = avgfn.periodic(3, reduce=reduce, round=avgfn.Round(bucket_bytes=32))
    params = _params(rank)
    state = avg.init(params)
    if rank == 2:
        reduce.armed = True
    out["stall/own"] = _attempt(avg.update, params, state, 6)
    # A Reduce without its own timeout waits as long as its group's timeout.
    out["stall/group"] = _attempt(avgfn.average, params, avgfn.collectives.all_reduce_mean(slow_group))
    # The replica check of init is a collective too, and keeps to the same timeout.
    check = avgfn.periodic(3, reduce=avgfn.collectives.all_reduce_mean(timeout=1.0))
    out["stall/init"] = _attempt(check.init, params)
    return out


@pytest.fixture(scope="module")
def bad_input_world(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bad-input"))
    outcome = run_faulty_world(_bad_input_then_stall, 3, 2.0, 3.0, folder, stragglers=[2], deadline=90)
    assert not outcome.errors, outcome.errors
    assert sorted(outcome.results) == [0, 1], outcome
    assert outcome.exitcodes[2] == -signal.SIGKILL  # the straggler was still asleep
    results = dict(outcome.results)
    results[2] = torch.load(os.path.join(folder, "bad-input2.pt"), weights_only=False)
    return results


def test_nan_default_policy_raises_on_every_rank_and_changes_nothing(bad_input_world):
    for name in ("periodic", "buckets", "donate", "hierarchical", "average"):
        for rank in (0, 1, 2):
            r = bad_input_world[rank][f"raise/{name}"]
            assert r["error"] == "NonFiniteError", (name, rank, r)
            assert r["unchanged"], (name, rank)
            if name != "average":
                assert r["step"] == 4 and r["message"].startswith("at step 4: ")
        local = bad_input_world[1][f"raise/{name}"]
        assert local["paths"] == ("['b']",)
        assert "this replica holds non-finite values at ['b']; nothing was averaged" in local["message"]
        for peer in (bad_input_world[0][f"raise/{name}"], bad_input_world[2][f"raise/{name}"]):
            assert peer["paths"] == ()
            if name == "donate":  # the health flags move first; the data never does
                assert "a peer replica holds non-finite values; nothing was averaged" in peer["message"]
            else:  # the mean is checked: it names the leaf that went non-finite
                assert "the group's mean is non-finite at ['b']" in peer["message"], peer


def test_nan_exclude_policy_averages_the_healthy_replicas(bad_input_world):
    for name in ("periodic", "buckets"):
        results = [bad_input_world[rank][f"exclude/{name}"] for rank in (0, 1, 2)]
        for r in results:
            assert r["error"] is None and r["unchanged"], r
        healthy = [_params(0), _params(2)]  # rank 1 holds -inf in w
        for key in ("w", "b"):
            by_hand = (healthy[0][key] + healthy[1][key]) / 2
            for r in results:
                torch.testing.assert_close(r["value"][0][key], by_hand, rtol=1e-12, atol=1e-6)
                assert r["value"][0][key].dtype == by_hand.dtype
            for r in results[1:]:  # one mean, bit for bit, on every rank (rank 1 too)
                assert torch.equal(r["value"][0][key], results[0]["value"][0][key])
        assert [int(r["value"][0]["n"]) for r in results] == [0, 1, 2]  # int leaves are left alone
        assert [int(r["value"][1].rounds) for r in results] == [1, 1, 1]
    for rank in (0, 1, 2):
        r = bad_input_world[rank]["exclude/all-bad"]
        assert r["error"] == "NonFiniteError" and r["unchanged"], r


def test_mismatched_replicas_fail_at_init_on_every_rank(bad_input_world):
    expected = {
        "shape": "rank 0 has ['w']: (2, 3) torch.float32, rank 2 has ['w']: (2, 4) torch.float32",
        "dtype": "rank 0 has ['b']: (2,) torch.float64, rank 1 has ['b']: (2,) torch.float32",
        "missing": "rank 0 has no leaf ['b'], rank 1 has ['b']: (2,) torch.float64",
        "hierarchical": "rank 2 has ['w']: (2, 4) torch.float32",
    }
    for name, text in expected.items():
        for rank in (0, 1, 2):
            r = bad_input_world[rank][f"mismatch/{name}"]
            assert r["error"] == "ReplicaMismatchError", (name, r)
            assert "the replicas of the default group of 3 ranks hold params that differ" in r["message"]
            assert text in r["message"], (name, r["message"])
            assert "Round(verify=None) skips this check at init" in r["message"]
            assert r["unchanged"]
    for rank in (0, 1, 2):
        assert bad_input_world[rank]["mismatch/unchecked"]["error"] is None
        assert bad_input_world[rank]["values/same"]["error"] is None
        r = bad_input_world[rank]["values/different"]
        assert r["error"] == "ReplicaMismatchError"
        assert "rank 0 and rank 1 start from different values" in r["message"], r["message"]
        assert bad_input_world[rank]["after"] == pytest.approx(1.0)  # mean of 0, 1, 2


def test_stalled_peer_raises_within_the_timeout(bad_input_world):
    for rank in (0, 1):
        r = bad_input_world[rank]["stall/own"]
        assert r["error"] == "PeerError", r
        assert 2.0 - 0.05 <= r["elapsed"] <= 2.0 + MARGIN, r["elapsed"]
        assert r["unchanged"]  # the first bucket came back, but the params were not touched
        assert r["step"] == 6 and r["timeout"] == 2.0
        assert r["message"].startswith("at step 6: all_reduce_mean over the default group of 3 ranks")
        assert "(timeout 2s)" in r["message"] and "are unchanged" in r["message"]

        r = bad_input_world[rank]["stall/group"]
        assert r["error"] == "PeerError", r
        assert 3.0 - 0.05 <= r["elapsed"] <= 3.0 + MARGIN, r["elapsed"]
        assert r["unchanged"] and r["timeout"] is None
        assert "over the group of ranks [0, 1, 2]" in r["message"]
        assert "(the group's timeout)" in r["message"]

        r = bad_input_world[rank]["stall/init"]
        assert r["error"] == "PeerError" and r["timeout"] == 1.0, r
        assert r["elapsed"] <= 1.0 + MARGIN, r["elapsed"]
        assert r["unchanged"]


# --- worlds 2 and 3: a rank killed mid-run, then a restart from the last checkpoint -------------

STEPS, PERIOD, EVERY, KILL_AT, TIMEOUT = 32, 4, 6, 20, 5.0


def _local_step(params: dict, rank: int, step: int) -> dict:
    """A deterministic stand-in for a training step on this rank's data."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "w": params["w"] * 0.9 + 0.1 * torch.randn(params["w"].shape, generator=g),
        "b": params["b"] - 0.05 * torch.randn(params["b"].shape, generator=g, dtype=torch.float64),
    }


def _start() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4, dtype=torch.float64)}


def _save(folder: str, rank: int, next_step: int, params: dict, state: Any) -> None:
    path = os.path.join(folder, f"rank{rank}-step{next_step}.pt")
    checkpoint = {"step": next_step, "params": params, "averager": avgfn.state_dict(state)}
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # a process killed while saving leaves no torn file


def _train(rank, avg, params, state, start, folder=None, on_round=None):
    for step in range(start, STEPS):
        params = _local_step(params, rank, step)
        if on_round is not None and step % PERIOD == 0:
            on_round(step, params, state)
        params, state = avg.update(params, state, step)
        if folder is not None and (step + 1) % EVERY == 0:
            _save(folder, rank, step + 1, params, state)
    return params, state


class _Stop(Exception):
    pass


def _killed_run(rank: int, world: int, folder: str) -> dict:
    mean = avgfn.collectives.all_reduce_mean(timeout=TIMEOUT)
    reduce = FaultyReduce(mean, "kill") if rank == 2 else mean
    avg = avgfn.periodic(PERIOD, reduce=reduce, round=avgfn.Round(bucket_bytes=64))
    params = _start()
    state = avg.init(params)  # the structure check: a collective
    out: dict[str, Any] = {}

    def on_round(step, params, state):
        if step == KILL_AT:
            if rank == 2:
                reduce.armed = True  # rank 2 dies at its second bucket of this round
            out.update(_attempt(avg.update, params, state, step))
            out["before"] = params
            # The group is broken now: the replica check of a new averager says so at once.
            out["init"] = _attempt(avgfn.periodic(PERIOD, reduce=reduce).init, params)
            raise _Stop

    try:
        _train(rank, avg, params, state, 0, folder, on_round)
    except _Stop:
        return out
    raise AssertionError("the round at KILL_AT did not fail")


def _restart_and_reference(rank: int, world: int, folder: str) -> dict:
    mean = avgfn.collectives.all_reduce_mean(timeout=TIMEOUT)
    avg = avgfn.periodic(PERIOD, reduce=mean, round=avgfn.Round(bucket_bytes=64))
    out: dict[str, Any] = {}

    def on_round(step, params, state):
        if step == KILL_AT:
            out["reference_before"] = params

    # The run that never failed.
    start = _start()
    reference, reference_state = _train(rank, avg, start, avg.init(start), 0, None, on_round)
    # The restart: the newest checkpoint that every rank has.
    steps = [int(n.split("step")[1][:-3]) for n in os.listdir(folder) if n.startswith(f"rank{rank}-")]
    newest = torch.tensor(max(steps))
    dist.all_reduce(newest, op=dist.ReduceOp.MIN)
    checkpoint = torch.load(os.path.join(folder, f"rank{rank}-step{int(newest)}.pt"), weights_only=True)
    params = checkpoint["params"]
    state = avgfn.load_state_dict(avg.init(params), checkpoint["averager"])
    resumed, resumed_state = _train(rank, avg, params, state, checkpoint["step"])
    out.update(
        resumed_from=checkpoint["step"],
        reference=reference,
        reference_rounds=int(reference_state.rounds),
        resumed=resumed,
        resumed_rounds=int(resumed_state.rounds),
    )
    return out


def test_killed_peer_survivors_raise_at_once_and_a_restart_recovers(tmp_path):
    folder = str(tmp_path)
    outcome = run_faulty_world(_killed_run, 3, folder, deadline=90)
    assert not outcome.errors, outcome.errors
    assert outcome.exitcodes == {0: 0, 1: 0, 2: -signal.SIGKILL}, outcome
    for rank in (0, 1):
        r = outcome.results[rank]
        assert r["error"] == "PeerError", r
        assert r["elapsed"] <= TIMEOUT + MARGIN, r["elapsed"]  # gloo sees the reset at once
        assert r["unchanged"], "a survivor's params or state changed in the failed round"
        assert r["step"] == KILL_AT and r["timeout"] == TIMEOUT
        prefix = f"at step {KILL_AT}: all_reduce_mean over the default group of 3 ranks"
        assert r["message"].startswith(prefix)
        assert "(timeout 5s)" in r["message"]
        assert r["init"]["error"] == "PeerError" and r["init"]["elapsed"] <= TIMEOUT + MARGIN, r["init"]
    # Every rank wrote the same checkpoints before the failure, the killed one included.
    names = sorted(os.listdir(folder))
    expected = sorted(f"rank{r}-step{s}.pt" for r in range(3) for s in range(EVERY, KILL_AT + 1, EVERY))
    assert names == expected, names

    results = run_world(_restart_and_reference, 3, folder, timeout=90)
    for rank, r in enumerate(results):
        assert r["resumed_from"] == 18
        for key in ("w", "b"):
            assert torch.equal(r["resumed"][key], r["reference"][key]), (rank, key)
        assert r["resumed_rounds"] == r["reference_rounds"] == STEPS // PERIOD
    # Before the failed round, the survivors held what the uninterrupted run held there.
    for rank in (0, 1):
        for key in ("w", "b"):
            before = outcome.results[rank]["before"][key]
            assert torch.equal(before, results[rank]["reference_before"][key]), (rank, key)
