"""Replicas whose Reduce objects differ, on real gloo groups: an error on every rank, never an abort.

Which collectives a round runs depends on the Reduce as well as on the
Round: a group of two whose ``all_reduce_mean`` has a history of its rounds
carries the check in the data collective, and a group whose check carries
the health flags spares a collective. So:

* two averagers over one process group, each with its own
  ``all_reduce_mean()``, share one history of that group's rounds (one
  sequence of collectives): a replica that runs the other averager's round
  is caught by the check, as with one shared Reduce;
* a replica that wraps its Reduce in an `avgfn.ForwardingReduce` that says
  it passes tensors on unchanged (``agree_in_data = True``) runs the same
  collectives as one that does not wrap it;
* a replica whose Reduce cannot do what its peers' can (a wrapper that does
  not say so, or that watches ``agree()``) is caught at its first round by
  the check, which names the difference;
* the weighted averagers (``weighted``, ``fedavg``, ``fedavgm``) check their
  replicas before the weights' collective and run the data round without a
  check of its own: that first check covers the data round's options too;
* a replica that checks its replicas (``init``, an outer-step averager's
  first round) while its peer runs a round the group's history predicts
  takes part in that round first, then meets its peer's check.

A rank that aborts inside gloo (collectives of other sizes) shows as exit
code -6 in the faulty-world harness: every test requires all ranks to exit
normally.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import avgfn
from _faults import run_faulty_world


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        value = fn()
        return {"error": None, "value": value}
    except Exception as e:  # noqa: BLE001 - the outcome is the point
        return {"error": type(e).__name__, "message": str(e)}


def _outcome_on(params: dict[str, torch.Tensor], fn: Any) -> dict[str, Any]:
    """`_outcome()` of ``fn``, and whether ``params`` hold the same values after it."""
    kept = {k: v.clone() for k, v in params.items()}
    out = _outcome(fn)
    out["unchanged"] = all(torch.equal(kept[k], params[k]) for k in params)
    return out


def _two_reduce_objects(rank: int, world_size: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")  # period 1
    C = avgfn.collectives
    first = avgfn.periodic(1, reduce=C.all_reduce_mean(timeout=10), where={"a": True, "b": False})
    second = avgfn.periodic(1, reduce=C.all_reduce_mean(timeout=10), where={"a": False, "b": True})
    params = {"a": torch.full((8,), float(rank)), "b": torch.full((3, 2), float(rank))}
    s1, s2 = first.init(params), second.init(params)
    for step in range(6):  # the rounds take turns: the group's history predicts them
        params, s1 = first.update(params, s1, step)
        params, s2 = second.update(params, s2, step)
    # rank 1 runs the second averager's round where the first one's is due
    return _outcome_on(params, lambda: (first if rank == 0 else second).update(params, s1 if rank == 0 else s2, 6))


def test_two_reduce_objects_over_one_group_share_its_history_and_catch_a_replica_out_of_turn():
    outcome = run_faulty_world(_two_reduce_objects, 2, deadline=90)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    for rank in (0, 1):
        r = outcome.results[rank]
        assert r["error"] == "ReplicaMismatchError", (rank, r)
        assert "hold params that differ" in r["message"] and r["unchanged"], r


class _Bytes(avgfn.ForwardingReduce):
    sent = 0

    def observe(self, tensor: torch.Tensor, divided: bool) -> None:
        self.sent += tensor.numel() * tensor.element_size()


class _BytesInData(_Bytes):
    agree_in_data = True


class _WatchesAgree(avgfn.ForwardingReduce):
    checks = 0

    def agree(self, digest: bytes, entries: Any) -> None:
        self.checks += 1
        super().agree(digest, entries)


def _one_rank_wraps(rank: int, world_size: int, wrapper: str, donate: bool) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    base = avgfn.collectives.all_reduce_mean(timeout=10)
    kinds = {"bytes": _Bytes, "bytes_in_data": _BytesInData, "watches_agree": _WatchesAgree}
    reduce = kinds[wrapper](base) if rank == 0 else base
    avg = avgfn.periodic(1, reduce=reduce, round=avgfn.Round(donate=donate))
    params = {"a": torch.full((8,), float(rank)), "b": torch.full((3, 2), float(rank))}
    state = avg.init(params)

    def run() -> list[float]:
        p = params
        for step in range(6):
            p = avg.update({k: v.clone() for k, v in p.items()}, state, step)[0]
        return p["a"].tolist()

    out = _outcome(run)
    out["sent"] = getattr(reduce, "sent", None)
    return out


def test_a_replica_whose_reduce_is_a_forwarding_wrapper_runs_the_same_collectives_as_its_peer():
    outcome = run_faulty_world(_one_rank_wraps, 2, "bytes_in_data", False, deadline=90)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    r0, r1 = outcome.results[0], outcome.results[1]
    assert r0["error"] is None and r1["error"] is None, outcome.results
    assert r0["value"] == r1["value"] == [0.5] * 8
    assert r0["sent"] > 0  # the wrapper saw the buffers


@pytest.mark.parametrize("wrapper", ["bytes", "watches_agree"])
def test_a_replica_whose_reduce_cannot_carry_the_check_in_its_data_is_named_at_the_first_round(wrapper):
    outcome = run_faulty_world(_one_rank_wraps, 2, wrapper, False, deadline=90)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    for rank in (0, 1):
        r = outcome.results[rank]
        assert r["error"] == "ReplicaMismatchError", (rank, r)
        assert "at step 0" in r["message"], r["message"]
        assert "predicts=True" in r["message"] and "predicts=False" in r["message"], r["message"]


def test_a_replica_whose_reduce_cannot_carry_the_health_flags_is_caught_not_aborted():
    # three ranks, donated: the plain ranks carry the health flags in the check, the
    # wrapped one (which watches agree()) would run a health collective of its own
    outcome = run_faulty_world(_one_rank_wraps, 3, "watches_agree", True, deadline=120)
    assert outcome.exitcodes == {0: 0, 1: 0, 2: 0}, outcome
    for rank in (0, 1, 2):
        r = outcome.results[rank]
        assert r["error"] == "ReplicaMismatchError", (rank, r)
        assert "flags in check=" in r["message"], r["message"]


def _weighted_options_differ(rank: int, world_size: int, algo: str, option: str) -> dict[str, Any]:
    other = avgfn.Round(bucket_bytes=16) if option == "bucket" else avgfn.Round(comm_dtype=torch.bfloat16)
    rnd = other if rank == 0 else avgfn.Round()
    reduce = avgfn.collectives.all_reduce_mean(timeout=10)
    avg = getattr(avgfn, algo)(1, reduce=reduce, weight=1.0 + rank, round=rnd)
    state = avg.init({"a": torch.ones(64), "b": torch.ones(3, 2)})
    params = {"a": torch.full((64,), float(rank + 2)), "b": torch.full((3, 2), float(rank + 2))}
    return _outcome_on(params, lambda: avg.update(params, state, 0))


@pytest.mark.parametrize("algo, option", [("weighted", "bucket"), ("fedavg", "comm"), ("fedavgm", "bucket")])
def test_weighted_replicas_built_with_other_round_options_all_raise_instead_of_aborting(algo, option):
    # the weights' round runs before the data's: its check must cover the data's options
    outcome = run_faulty_world(_weighted_options_differ, 2, algo, option, deadline=90)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    for rank in (0, 1):
        r = outcome.results[rank]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        who = "fedavgm" if algo == "fedavgm" else "weighted"  # fedavg is weighted by sample counts
        assert f"runs its rounds as {who}:" in r["message"], r["message"]


def _init_against_a_predicted_round(rank: int, world_size: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    avg = avgfn.periodic(1, reduce=avgfn.collectives.all_reduce_mean(timeout=10))
    params = {"a": torch.full((8,), float(rank)), "b": torch.ones(3, 2)}
    state = avg.init(params)
    for step in range(5):  # the group's history now predicts the next round
        params, state = avg.update(params, state, step)
    # rank 1 builds its state again (init checks the replicas) while rank 0 goes on
    return _outcome_on(params, lambda: avg.update(params, state, 5) if rank == 0 else avg.init(params))


def test_a_replica_that_checks_its_replicas_while_its_peer_runs_a_predicted_round_is_caught_not_aborted():
    # init's check (and the outer-step averagers' first-round check) takes part in the
    # round its peer's history predicts, as a round of another kind, then meets its check
    outcome = run_faulty_world(_init_against_a_predicted_round, 2, deadline=90)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    for rank in (0, 1):
        r = outcome.results[rank]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
