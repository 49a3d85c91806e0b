"""Replicas out of step on a hierarchy of real gloo groups (4 processes).

The per-round check compares replicas that run a round over the same group.
In a hierarchy a replica out of step may run its round over another group
(the inner level while its peers run the outer one), or no round at all (an
off-step calls no collective): there is no common collective to compare in.
Then every replica that waits raises `avgfn.PeerError` within the Reduce's
timeout, says that a peer may be out of step, and leaves its params and
state as they were; nothing hangs.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

import avgfn
from _faults import run_faulty_world

TIMEOUT = 2.0
MARGIN = 3.0  # seconds a waiting rank may take past the timeout to raise


def _out_of_step(rank: int, world_size: int, case: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")  # the hierarchy's period-1 style warnings are not the point
    levels = avgfn.collectives.hierarchy({2: 2, 4: 4}, timeout=TIMEOUT)
    avg = avgfn.hierarchical(levels)
    params = {"a": torch.full((5,), float(rank)), "b": torch.full((3, 2), float(rank))}
    state = avg.init(params)
    for step in range(1, 5):  # rounds in step: both levels, with their checks
        params, state = avg.update(params, state, step)
    kept = {k: v.clone() for k, v in params.items()}
    kept_state = [t.clone() for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    if case == "other_group":
        step = 10 if rank == 3 else 12  # rank 3 at an inner round (ranks 2, 3), the rest at an outer one
    else:
        step = 9 if rank == 3 else 10  # rank 3 at an off-step: no collective; rank 2 waits for it
    started = time.monotonic()
    try:
        avg.update(params, state, step)
        error, message = None, ""
    except Exception as e:  # noqa: BLE001 - the outcome is the point
        error, message = type(e).__name__, str(e)
    now = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    return {
        "error": error,
        "message": message,
        "seconds": time.monotonic() - started,
        "unchanged": all(torch.equal(kept[k], params[k]) for k in params)
        and all(torch.equal(a, b) for a, b in zip(kept_state, now)),
    }


def test_a_replica_at_a_round_over_another_group_makes_every_waiting_rank_raise_within_the_timeout():
    outcome = run_faulty_world(_out_of_step, 4, "other_group", deadline=90)
    assert not outcome.errors, outcome
    for rank in range(4):
        r = outcome.results[rank]
        assert r["error"] == "PeerError", (rank, r)
        assert "out of step" in r["message"] and "are unchanged" in r["message"], r["message"]
        assert r["unchanged"], rank
        assert r["seconds"] < TIMEOUT + MARGIN, (rank, r["seconds"])


def test_a_replica_at_an_off_step_makes_its_waiting_peer_raise_and_runs_nothing_itself():
    outcome = run_faulty_world(_out_of_step, 4, "off_step", stragglers=[], deadline=90)
    assert not outcome.errors, outcome
    assert outcome.results[3]["error"] is None  # its step is not due: it calls no collective
    r = outcome.results[2]  # its inner-level peer waits for it
    assert r["error"] == "PeerError" and r["unchanged"], r
    assert "out of step" in r["message"], r["message"]
    assert r["seconds"] < TIMEOUT + MARGIN, r["seconds"]
