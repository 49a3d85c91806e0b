"""A replica that refuses its inputs at a due step tells its peers, on real gloo groups.

At a step whose round its peers run, a replica whose own inputs cannot be
averaged (params that are a generator, a state of another averager, a
``where`` that selects a non-tensor or yields a non-bool, a global copy
that no longer fits its params) raises its own ``TypeError`` /
``ValueError``; its peers raise `avgfn.ReplicaMismatchError` naming the
refusing rank and its error at once, instead of waiting out the timeout
for a collective that never comes (`avgfn.PeerError`), or pairing their
check with the refusing rank's next round. Nothing is changed on any rank,
and the next round, with good inputs everywhere, averages: the group is
still in step.

The timeouts are short (a few seconds): a rank that waits for its peer
fails the test with ``PeerError`` instead of ``ReplicaMismatchError``.
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import avgfn
from _faults import run_faulty_world

_TIMEOUT = 5.0
_SHORT = 2.5


def _params(rank: int) -> dict[str, Any]:
    return {"a": torch.full((6,), float(rank)), "b": torch.full((2, 3), float(rank))}


def _where_raises(leaf: Any) -> bool:
    raise RuntimeError("where boom")


def _weight_raises(params: Any, step: int) -> float:
    raise KeyError("no such sample count")


def _build(algo: str, reduce: avgfn.Reduce, where: Any = None, odd: bool = False) -> Any:
    """The averager; ``odd``: its weight (or slowmo's ``lr``) is not a number."""
    weight: Any = (lambda params, step: "heavy") if odd else 1.0
    if algo == "periodic":
        return avgfn.periodic(1, reduce=reduce, where=where)
    if algo == "hierarchical":
        return avgfn.hierarchical([(1, reduce)], where=where)
    if algo == "diloco":
        return avgfn.diloco(1, reduce=reduce, where=where)
    if algo == "overlapped":
        return avgfn.overlapped_diloco(1, reduce=reduce, eager=False, where=where)  # equal params after
    if algo == "streaming":
        return avgfn.streaming_diloco(1, reduce=reduce, num_fragments=1, where=where)
    if algo == "slowmo":
        return avgfn.slowmo(1, reduce=reduce, lr=(lambda step: "fast") if odd else 0.1, where=where)
    if algo == "weighted":
        return avgfn.weighted(1, reduce=reduce, weight=weight, where=where)
    if algo == "fedavgm":
        return avgfn.fedavgm(1, reduce=reduce, weight=weight, where=where)
    if algo == "gradients":
        return avgfn.post_local_gradients(100, global_reduce=reduce, local_reduce=None, where=where)
    if algo == "average":  # the functional round, as an averager without state
        return _Average(reduce, where)
    if algo == "chain":  # a temporal average first (no round of its own), then the round
        return avgfn.chain(avgfn.ema(0.5), avgfn.periodic(1, reduce=reduce, where=where))
    raise AssertionError(algo)


class _Average:
    def __init__(self, reduce: avgfn.Reduce, where: Any) -> None:
        self.reduce, self.where = reduce, where

    def init(self, params: Any) -> None:
        return None

    def update(self, params: Any, state: Any, step: int) -> tuple[Any, Any]:
        return avgfn.average(params, self.reduce, where=self.where), state


def _attempt(rank: int, fn: Callable[[], Any], params: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v.clone() for k, v in params.items() if isinstance(v, torch.Tensor)}
    try:
        fn()
        out: dict[str, Any] = {"error": None, "message": ""}
    except Exception as e:  # noqa: BLE001 - the outcome is the point
        out = {"error": type(e).__name__, "message": str(e), "refused_by": list(getattr(e, "refused_by", ()))}
    out["unchanged"] = all(torch.equal(kept[k], params[k]) for k in kept)
    return out


def _refusals(rank: int, algo: str, case: str, warm: int, group: Any) -> dict[str, Any]:
    warnings.simplefilter("ignore")  # period 1
    reduce = avgfn.collectives.all_reduce_mean(group, timeout=_TIMEOUT)
    avg = _build(algo, reduce)
    state = avg.init(_params(0))  # the same start everywhere (the global copy of the outer steps)
    good = _params(rank)
    for step in range(warm):  # rounds that agree: the group's history then predicts the next
        _, state = avg.update(dict(good), state, step)
    params: Any = dict(good)
    bad_state: Any = state
    refusing = avg
    if rank == 1:
        if case == "generator":
            params = (p for p in good.values())
        elif case == "state_of_another_averager":
            bad_state = avgfn.ema(0.5).init(good)  # its init does not communicate
        elif case == "chain_of_other_length":  # the chain's own check, not one of its averagers'
            bad_state = avgfn.ChainState(state.states[:1])
        elif case == "where_yields_a_non_bool":
            refusing = _build(algo, reduce, lambda leaf: "yes")
        elif case == "where_is_not_a_where":
            refusing = _Average(reduce, "yes")
        elif case == "selects_a_non_tensor":
            params = {**good, "n": 3}
            refusing = _build(algo, reduce, {"a": True, "b": True, "n": True})
        elif case == "drops_a_leaf":
            params = {"a": good["a"]}
        elif case == "holds_no_tensor":  # numbers where the tensors were
            params = {"a": 1.0, "b": [2, 3]}
        elif case == "weight_or_lr_is_not_a_number":
            refusing = _build(algo, reduce, odd=True)
        elif case == "where_raises":  # any error of the user's own callable, not only a check's
            refusing = _build(algo, reduce, _where_raises)
        elif case == "weight_raises":
            refusing = avgfn.fedavgm(1, reduce=reduce, weight=_weight_raises)
    refused = _attempt(rank, lambda: refusing.update(params, bad_state, warm), good)
    # the group is still in step: the next round, with good inputs everywhere, averages
    try:
        new, _ = avg.update(good, state, warm + 1)
        after: Any = new["a"].tolist()
    except Exception as e:  # noqa: BLE001
        after = f"{type(e).__name__}: {e}"
    return {"refused": refused, "after": after}


_CASES = [
    ("periodic", "generator", "TypeError", 0),
    ("periodic", "generator", "TypeError", 4),  # its check travels in the data collective
    ("periodic", "state_of_another_averager", "TypeError", 0),
    ("periodic", "where_yields_a_non_bool", "TypeError", 4),
    ("periodic", "selects_a_non_tensor", "TypeError", 0),
    ("hierarchical", "generator", "TypeError", 0),
    ("average", "generator", "TypeError", 4),
    ("average", "where_is_not_a_where", "TypeError", 0),
    ("gradients", "generator", "TypeError", 4),
    ("diloco", "state_of_another_averager", "TypeError", 0),
    ("diloco", "drops_a_leaf", "ValueError", 0),
    ("diloco", "drops_a_leaf", "ValueError", 4),
    ("overlapped", "state_of_another_averager", "TypeError", 2),
    ("streaming", "generator", "TypeError", 0),
    ("slowmo", "drops_a_leaf", "ValueError", 0),
    ("slowmo", "generator", "TypeError", 0),
    ("slowmo", "weight_or_lr_is_not_a_number", "TypeError", 2),
    ("weighted", "where_yields_a_non_bool", "TypeError", 0),
    ("weighted", "weight_or_lr_is_not_a_number", "TypeError", 2),
    ("fedavgm", "state_of_another_averager", "TypeError", 0),
    ("fedavgm", "weight_or_lr_is_not_a_number", "TypeError", 2),
    ("periodic", "where_raises", "RuntimeError", 4),
    ("fedavgm", "weight_raises", "KeyError", 2),
    ("chain", "state_of_another_averager", "TypeError", 0),
    ("chain", "chain_of_other_length", "ValueError", 2),
    ("chain", "generator", "TypeError", 0),
    ("periodic", "holds_no_tensor", "TypeError", 0),
    ("periodic", "holds_no_tensor", "TypeError", 4),
    ("diloco", "holds_no_tensor", "TypeError", 0),  # (hierarchical, overlapped: tests/test_seams.py)
    ("streaming", "holds_no_tensor", "TypeError", 0),
    ("slowmo", "holds_no_tensor", "TypeError", 0),
    ("weighted", "holds_no_tensor", "TypeError", 0),
]


def _every_refusal(rank: int, world_size: int) -> dict[Any, Any]:
    # every case in one world, one after the other: each on a process group of its own
    # (a fresh history: the rounds of a case are predicted only after its own warm-up)
    results: dict[Any, Any] = {}
    for algo, case, _, warm in _CASES:
        group = dist.new_group([0, 1])
        try:
            results[(algo, case, warm)] = _refusals(rank, algo, case, warm, group)
        except Exception:  # noqa: BLE001 - reported by the case's test
            results[(algo, case, warm)] = {"crashed": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def refusals() -> Any:
    return run_faulty_world(_every_refusal, 2, deadline=240)


@pytest.mark.parametrize("algo, case, raised, warm", _CASES)
def test_a_replica_that_refuses_its_inputs_at_a_due_step_is_named_by_its_peer_at_once(
    refusals, algo, case, raised, warm
):
    assert refusals.exitcodes == {0: 0, 1: 0}, refusals
    got0, got1 = refusals.results[0][(algo, case, warm)], refusals.results[1][(algo, case, warm)]
    assert "crashed" not in got0 and "crashed" not in got1, (got0, got1)
    r0, r1 = got0["refused"], got1["refused"]
    assert r1["error"] == raised, r1
    assert r0["error"] == "ReplicaMismatchError", r0
    assert "rank 1 refused the round" in r0["message"] and raised in r0["message"], r0["message"]
    assert "fix the inputs of rank 1" in r0["message"], r0["message"]
    assert r0["refused_by"] == [1], r0
    assert r0["unchanged"] and r1["unchanged"], (r0, r1)
    after0, after1 = got0["after"], got1["after"]
    assert isinstance(after0, list) and after0 == after1, (after0, after1)


def _not_forwarded(rank: int, world_size: int, case: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    reduce = avgfn.collectives.all_reduce_mean(timeout=2.0)
    if case == "agree_off":  # no check to meet: the peer waits for the data, then times out
        avg: Any = avgfn.periodic(1, reduce=reduce, round=avgfn.Round(agree=False))
        step = 0
    else:  # "apply_only": a step that communicates nothing, on every rank
        avg = avgfn.streaming_diloco(4, reduce=reduce, num_fragments=2, delay=1)
        step = 1  # applies fragment 0, whose average started at step 0
    good = _params(0)
    state = avg.init(good)
    for s in range(step):
        _, state = avg.update(dict(good), state, s)
    params: Any = (p for p in good.values()) if rank == 1 else dict(good)
    return _attempt(rank, lambda: avg.update(params, state, step), good)


@pytest.mark.parametrize("case, peer", [("agree_off", "PeerError"), ("apply_only", None)])
def test_a_refusal_is_not_forwarded_where_the_peers_run_no_check(case, peer):
    # Round(agree=False): the peers run no check, so a forwarded one would meet their data
    # collective; an apply-only step of streaming_diloco runs no collective at all
    outcome = run_faulty_world(_not_forwarded, 2, case, deadline=60)
    assert outcome.exitcodes == {0: 0, 1: 0}, outcome
    r0, r1 = outcome.results[0], outcome.results[1]
    assert r1["error"] == "TypeError", r1
    assert r0["error"] == peer and r0["unchanged"], r0


def _sharded_refusal(rank: int, world_size: int, pause: float, algo: str) -> dict[str, Any]:
    # a 2x2 mesh: replicas along "replicate", each holding its params in two shards
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    # a pause past the timeout: a shorter one, so that the test waits less
    reduce = avgfn.collectives.all_reduce_mean(mesh["replicate"].get_group(), timeout=_SHORT if pause else _TIMEOUT)
    avg = {
        "periodic": lambda: avgfn.periodic(1, reduce=reduce),
        "diloco": lambda: avgfn.diloco(1, reduce=reduce),
        "slowmo": lambda: avgfn.slowmo(1, reduce=reduce, lr=0.1),
        "weighted": lambda: avgfn.weighted(1, reduce=reduce, weight=1.0),
    }[algo]()

    def sharded(offset: float) -> dict[str, Any]:
        full = {"a": torch.arange(6.0) + offset, "b": torch.arange(12.0).reshape(4, 3) + offset}
        return {k: distribute_tensor(v, mesh["shard"], [Shard(0)], src_data_rank=None) for k, v in full.items()}

    state = avg.init(sharded(0.0))  # the same global copy on both replicas
    good = sharded(10.0 * (rank // 2))
    kept = {k: v.to_local().clone() for k, v in good.items()}
    params: Any = (p for p in good.values()) if rank == 0 else good  # replica 0, its first shard
    try:
        out = avg.update(params, state, 0)[0]
        result: dict[str, Any] = {"error": None, "message": ""}
        result["returned"] = all(isinstance(v, DTensor) for v in out.values())
    except Exception as e:  # noqa: BLE001
        result = {"error": type(e).__name__, "message": str(e)}
    result["unchanged"] = all(torch.equal(kept[k], good[k].to_local()) for k in kept)
    if rank in (0, 2):  # the ranks that raised at once go on to the next step: their shards' peers meet it
        time.sleep(pause)
        try:
            avg.update(good, state, 1)
            result["next"] = None
        except Exception as e:  # noqa: BLE001
            result["next"] = type(e).__name__
    return result


@pytest.mark.parametrize(
    "pause, algo",
    [(0.0, "periodic"), (0.0, "diloco")] + [(2 * _SHORT, a) for a in ("periodic", "diloco", "slowmo", "weighted")],
)
def test_in_a_sharded_world_no_rank_takes_a_refused_round_for_a_good_one(pause, algo):
    # rank 0 refuses: its replica peer (rank 2) learns it from the round's check; the ranks
    # holding the other shards (1 and 3) ran their round, and their shard check meets the
    # next round of rank 0 and 2: they raise, naming both steps, instead of returning
    # half a replica averaged; if that next round comes later than the Reduce's timeout,
    # they raise PeerError within it
    # (diloco's shard-wide verdict is its outer step's: the pseudo-gradient is averaged
    # with nonfinite="ignore", its mean then judged over the shards, within the Reduce's
    # timeout too; slowmo's is its slow step's, weighted's its mean's)
    outcome = run_faulty_world(_sharded_refusal, 4, pause, algo, deadline=120)
    assert all(code == 0 for code in outcome.exitcodes.values()), outcome
    r = outcome.results
    assert r[0]["error"] == "TypeError" and r[2]["error"] == "ReplicaMismatchError", r
    for rank in (1, 3):
        if pause:
            assert r[rank]["error"] == "PeerError", r[rank]
            assert "other shards of this replica" in r[rank]["message"], r[rank]["message"]
        else:
            assert r[rank]["error"] == "ReplicaMismatchError", r[rank]
            assert "shards of this replica are at different rounds (step 0 and step 1)" in r[rank]["message"]
    assert all(r[rank]["unchanged"] for rank in range(4)), r
    if not pause:
        assert r[0]["next"] == r[2]["next"] == "ReplicaMismatchError", r
