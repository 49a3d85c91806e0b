"""A donated round's health flags travel with the per-round agreement, on 2 gloo processes.

(Rounds here hold more than ``avgfn._round.predicted.LIMIT`` elements: a smaller donated
round in a group of two runs as the pure round does, its check in its data, and writes
nothing into the donated params; see tests/test_predicted_gloo.py.)

Before, a donated round (``Round(donate=True)``) with ``nonfinite="raise"`` or ``"skip"``
ran three collectives: the agreement, an all-reduce of its health flags, then the data.
The flags now ride in the agreement's all-reduce (MAX of "not finite" and "no room on
the wire"): two collectives, and the same decisions: a NaN on one replica makes every
replica skip, or raise, before anything is written.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import avgfn
from _dist import run_world
from avgfn import collectives
from avgfn._round import predicted as _predicted


def _counted(fn: Any) -> tuple[Any, int]:
    calls = [0]
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        out = fn()
    finally:
        dist.all_reduce = original
    return out, calls[0]


def _world(rank: int, world: int) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    found: dict[str, Any] = {}
    for policy in ("raise", "skip"):
        for sick in (False, True):
            params = {"a": torch.full((_predicted.LIMIT,), float(rank + 1)), "b": torch.ones(7) * (rank + 1)}
            if sick and rank == 1:
                params["a"][3] = float("nan")
            before = {k: v.clone() for k, v in params.items()}
            rnd = avgfn.Round(donate=True, nonfinite=policy)
            try:
                out, calls = _counted(lambda: avgfn.average(params, reduce, round=rnd))
                outcome = "averaged" if torch.equal(out["b"], torch.full((7,), 1.5)) else "kept"
            except avgfn.NonFiniteError as error:
                outcome, calls = "raised " + ",".join(error.paths), None
            kept = all(torch.equal(params[k], before[k]) or torch.isnan(before[k]).any() for k in params)
            found[(policy, sick)] = {"outcome": outcome, "calls": calls, "unchanged": kept}
    return found


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return run_world(_world, 2, timeout=300)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_healthy_donated_round_takes_two_collectives(world, policy):
    for rank in range(2):
        got = world[rank][(policy, False)]
        assert got["outcome"] == "averaged" and got["calls"] == 2, (rank, got)


def test_a_nan_on_one_replica_skips_the_round_everywhere_with_one_collective(world):
    for rank in range(2):
        got = world[rank][("skip", True)]
        assert got == {"outcome": "kept", "calls": 1, "unchanged": True}, (rank, got)


def test_a_nan_on_one_replica_raises_everywhere_before_anything_is_written(world):
    assert world[1][("raise", True)]["outcome"] == "raised ['a']"  # the replica that holds it names it
    assert world[0][("raise", True)]["outcome"] == "raised "
    assert all(world[rank][("raise", True)]["unchanged"] for rank in range(2))
