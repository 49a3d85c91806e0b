"""A donated round whose sum may overflow is checked before anything is written, on 3 gloo processes.

In a group of three each replica divides by 3 before the sum, and a share
may round up: 65504 / 3 in float16 is 21840, and three of them sum to
infinity, although every value and the true mean are finite. A donated
round writes its sum into the params as it reduces, so when a replica
holds values past half the wire's range (the round's health flags say so,
on every replica alike) it runs as the plain round: the mean is checked
first and written into the donated tensors only when it is finite.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import avgfn
from _dist import run_world
from avgfn import collectives


def _case(value: float, dtype: torch.dtype, rnd: avgfn.Round) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    w = torch.full((8,), value, dtype=dtype)
    kept = w.clone()
    try:
        out = avgfn.average({"w": w}, reduce, round=rnd)  # one leaf: the wire is its dtype
        got: dict[str, Any] = {"error": None, "same": out["w"] is w, "w": out["w"].tolist()}
    except avgfn.NonFiniteError as error:
        got = {"error": type(error).__name__, "message": str(error)}
    got["written"] = not torch.equal(w, kept) if got["error"] else None
    got["finite"] = bool(torch.isfinite(w).all())
    return got


def _world(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for policy in ("raise", "skip", "exclude"):
        results[("fp16 leaf", policy)] = _case(65504.0, torch.float16, avgfn.Round(donate=True, nonfinite=policy))
        results[("fp16 wire", policy)] = _case(
            65497.45, torch.float32, avgfn.Round(donate=True, nonfinite=policy, comm_dtype=torch.float16)
        )
    # past half the range, but the sum of the shares fits: averaged, into the donated tensors
    results[("crowded", "raise")] = _case(40000.0, torch.float16, avgfn.Round(donate=True))
    pure = avgfn.average({"w": torch.full((8,), 40000.0, dtype=torch.float16)}, collectives.all_reduce_mean(timeout=60))
    results["pure"] = pure["w"].tolist()
    return results


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return run_world(_world, 3, timeout=240)


@pytest.mark.parametrize("case", ["fp16 leaf", "fp16 wire"])
def test_a_donated_sum_that_overflows_writes_nothing(world, case):
    for rank in range(3):
        raised = world[rank][(case, "raise")]
        assert raised["error"] == "NonFiniteError" and raised["finite"], (rank, raised)
        assert raised["written"] is False, (rank, raised)
        assert "nothing was averaged" in raised["message"], raised["message"]
        skipped = world[rank][(case, "skip")]  # the round is skipped: the params come back unchanged
        assert skipped["error"] is None and skipped["finite"] and skipped["same"], (rank, skipped)
        excluded = world[rank][(case, "exclude")]  # every replica is healthy: the mean itself overflows
        assert excluded["error"] == "NonFiniteError" and excluded["written"] is False and excluded["finite"]


def test_a_crowded_donated_round_that_fits_writes_the_mean_into_the_donated_tensors(world):
    for rank in range(3):
        got = world[rank][("crowded", "raise")]
        assert got["error"] is None and got["same"], (rank, got)
        assert got["w"] == world[rank]["pure"], (rank, got)
