"""The seams on real gloo groups: replicas that disagree, and a wire that overflows.

Each scenario runs on every rank of one 2-process world; every rank must
raise the same error, and nothing it passed in may be written.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch

import avgfn
from _dist import run_world

SEL_DIFF = "rank 0 has ['a']"


def _outcome(fn: Callable[[], Any], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    before = {k: v.detach().clone() for k, v in inputs.items()}
    differs = None
    try:
        fn()
        error, message = None, ""
    except Exception as e:  # noqa: BLE001 - the test compares the type by name
        error, message, differs = type(e).__name__, str(e), getattr(e, "differs", None)
    unchanged = all(_same(before[k], inputs[k]) for k in inputs)
    return {"error": error, "message": message, "unchanged": unchanged, "differs": differs}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, a NaN where the other holds a NaN included."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _torch_filter(rank: int, reduce: Any) -> dict[str, Any]:
    # torch's own filter, with a layer that only rank 1 used this step
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 1)})
    model["a"](torch.ones(1, 2)).sum().backward()
    if rank == 1:
        model["b"](torch.ones(1, 2)).sum().backward()
    params = dict(model.named_parameters())
    avg = avgfn.periodic(2, reduce=reduce, where=lambda p: p.grad is not None)
    state = avg.init(params)
    return _outcome(lambda: avg.update(params, state, 0), params)


def _sizes(rank: int, reduce: Any) -> dict[str, Any]:
    # different selections of different sizes: gloo would abort the process
    params = {"a": torch.full((3,), float(rank)), "b": torch.full((5,), float(rank))}
    where = {"a": rank == 0, "b": rank == 1}
    return _outcome(lambda: avgfn.average(params, reduce, where=where), params)


def _nothing_selected(rank: int, reduce: Any) -> dict[str, Any]:
    # rank 0 selects no leaf at all: it must still meet its peer's check, not return early
    params = {"a": torch.full((3,), float(rank))}
    return _outcome(lambda: avgfn.average(params, reduce, where={"a": rank == 1}), params)


def _desync(rank: int, reduce: Any) -> dict[str, Any]:
    params = {"w": torch.full((4,), float(rank))}
    avg = avgfn.periodic(2, reduce=reduce)
    state = avg.init(params)
    step = 4 if rank == 0 else 6  # both due, but not the same round
    return _outcome(lambda: avg.update(params, state, step), params)


def _diloco_selection(rank: int, reduce: Any) -> dict[str, Any]:
    params = {"a": torch.ones(3), "b": torch.ones(3)}
    avg = avgfn.diloco(2, reduce=reduce, where={"a": True, "b": rank == 0},
                       round=avgfn.Round(verify=None))
    state = avg.init(params)
    return _outcome(lambda: avg.update(params, state, 1), params)


def _opt_out(rank: int, reduce: Any) -> dict[str, Any]:
    params = {"w": torch.full((4,), float(rank))}
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(agree=False))
    state = avg.init(params)
    out = {}

    def run():
        out["w"] = avg.update(params, state, 2)[0]["w"]

    result = _outcome(run, params)
    result["mean"] = out["w"].tolist()
    return result


def _overflow(rank: int, reduce: Any, nonfinite: str, bucket_bytes: Any) -> dict[str, Any]:
    # fp32 params whose share does not fit an fp16 wire on rank 0
    value = 1e6 if rank == 0 else 1.0
    params = {"a": torch.full((8,), value), "b": torch.ones(8)}
    rnd = avgfn.Round(donate=True, comm_dtype=torch.float16, bucket_bytes=bucket_bytes, nonfinite=nonfinite)
    out = {}

    def run():
        out["p"] = avgfn.average(params, reduce, round=rnd)

    result = _outcome(run, params)
    if "p" in out:
        result["finite"] = all(bool(torch.isfinite(v).all()) for v in out["p"].values())
        result["a"] = out["p"]["a"].tolist()
    return result


def _narrow_band(rank: int, reduce: Any, kind: str, peer: float) -> dict[str, Any]:
    # 70000 on rank 0: past fp16's largest value (65504), its share 35000 is not
    rnd = {
        "plain": avgfn.Round(comm_dtype=torch.float16),
        "donate": avgfn.Round(comm_dtype=torch.float16, donate=True),
        "exclude": avgfn.Round(comm_dtype=torch.float16, nonfinite="exclude"),
    }[kind]
    params = {"w": torch.tensor([70000.0 if rank == 0 else peer, 1.0])}
    out = {}

    def run():
        out["w"] = avgfn.average(params, reduce, round=rnd)["w"].tolist()

    result = _outcome(run, params)
    result["w"] = out.get("w")
    return result


def _kind(name: str, reduce: Any, rnd: Any, warmup: int) -> Any:
    if name == "periodic":
        return avgfn.periodic(2, reduce=reduce, warmup_steps=warmup, round=rnd)
    if name == "hierarchical":  # due where step % 2 == 0, as periodic without warm-up
        return avgfn.hierarchical([(2, reduce)], round=rnd)
    if name == "weighted":
        return avgfn.weighted(2, reduce=reduce, weight=1.0, warmup_steps=1, round=rnd)
    if name == "fedavgm":
        return avgfn.fedavgm(2, reduce=reduce, weight=1.0, round=rnd)
    if name == "overlapped_diloco":
        return avgfn.overlapped_diloco(2, reduce=reduce, eager=False, round=rnd)
    return avgfn.diloco(2, reduce=reduce, round=rnd)


def _other_kind(rank: int, reduce: Any, kinds: tuple[str, str]) -> dict[str, Any]:
    # the same leaves, step and Round, but rank 0 runs one averager and rank 1 another
    # (params against pseudo-gradients, or the same numbers averaged by another algorithm)
    params = {"w": torch.full((4,), float(rank))}
    rnd = avgfn.Round(verify=None)  # no check at init, nor at diloco's first round
    # a step where both are due: 2 for periodic without warm-up and hierarchical, else 1
    step = 2 if "hierarchical" in kinds else 1
    avg = _kind(kinds[rank], reduce, rnd, step % 2)
    state = avg.init({"w": torch.zeros(4)})
    return _outcome(lambda: avg.update(params, state, step), params)


def _streaming_carried_on(rank: int, reduce: Any, failed: int) -> dict[str, Any]:
    # delay=1: each odd step applies a fragment's average (started the step before) and
    # talks to no peer. Rank 1 fails at step ``failed`` alone and carries on with the
    # state it had: its global copy lacks that outer step. Its next round must not mix
    # the two global copies.
    avg = avgfn.streaming_diloco(4, reduce=reduce, num_fragments=2, delay=1)
    params = {"a": torch.full((6,), 1.0), "b": torch.full((2, 3), 1.0)}
    state = avg.init(params)
    moved = params
    for step in range(failed + 1):
        moved = {k: v - 0.5 * (rank + 1) for k, v in moved.items()}
        before = state
        try:
            sent = (v for v in moved.values()) if rank == 1 and step == failed else dict(moved)
            moved, state = avg.update(sent, state, step)
        except TypeError:
            state = before  # rank 1 carries on without that step's result
    return _outcome(lambda: avg.update(dict(moved), state, failed + 1), moved)


def _other_round(rank: int, reduce: Any, option: dict[str, Any]) -> dict[str, Any]:
    # the same leaves and step, but rank 0 sends another wire: bytes that do not match
    params = {"w": torch.full((6,), float(rank))}
    rnd = avgfn.Round(**option) if rank == 0 else avgfn.Round()
    return _outcome(lambda: avgfn.average(params, reduce, round=rnd), params)


def _other_policy(rank: int, reduce: Any, kind: str, policy: str) -> dict[str, Any]:
    # rank 0 judges non-finite values by another policy, and holds a NaN: averaged, the
    # replicas would part ways (one raises, the other returns the NaN mixed in)
    rnd = avgfn.Round(nonfinite=policy, verify=None) if rank == 0 else avgfn.Round(verify=None)
    params = {"w": torch.full((4,), float(rank))}
    if rank == 0:
        params["w"][0] = float("nan")
    avg = _kind(kind, reduce, rnd, 0)
    state = avg.init({"w": torch.zeros(4)})
    return _outcome(lambda: avg.update(params, state, 1 if kind == "diloco" else 0), params)


def _other_settings(rank: int, reduce: Any, kind: str) -> dict[str, Any]:
    # the same averager, leaves, step and Round, but rank 0 applies another outer step:
    # the pseudo-gradients would be averaged alike and applied differently, the global
    # copies drifting apart without an error
    rnd = avgfn.Round(verify=None)
    first = rank == 0
    if kind == "diloco":
        avg: Any = avgfn.diloco(1, reduce=reduce, round=rnd, outer_optimizer=avgfn.optim.sgd(0.7 if first else 0.5))
    elif kind == "streaming":
        avg = avgfn.streaming_diloco(1, reduce=reduce, round=rnd, alpha=0.5 if first else 0.0)
    elif kind == "overlapped":
        avg = avgfn.overlapped_diloco(1, reduce=reduce, round=rnd, eager=first, num_replicas=2)
    elif kind == "slowmo":
        avg = avgfn.slowmo(1, reduce=reduce, round=rnd, lr=0.1, momentum=0.9 if first else 0.5)
    else:
        avg = avgfn.fedavgm(1, reduce=reduce, round=rnd, weight=1.0, server_momentum=0.9 if first else 0.0)
    params = {"w": torch.full((4,), float(rank))}
    state = avg.init({"w": torch.zeros(4)})
    return _outcome(lambda: avg.update(params, state, 0), params)


def _local_refusal(rank: int, reduce: Any) -> dict[str, Any]:
    # rank 0 alone donates two leaves that share memory: it refuses, and its peer
    # must learn it from the agreement instead of waiting out the timeout
    base = torch.full((6,), float(rank))
    params = {"a": base[:4], "b": base[2:]} if rank == 0 else {"a": base[:4], "b": base[2:].clone()}
    started = time.monotonic()
    result = _outcome(lambda: avgfn.average(params, reduce, round=avgfn.Round(donate=True)), params)
    result["seconds"] = time.monotonic() - started
    return result


def _diloco_refusal(rank: int, reduce: Any) -> dict[str, Any]:
    # rank 0's global copy does not fit its params any more (a parameter left the
    # selection, as one without a .grad does under ModuleAverager's torch filter)
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    avg = avgfn.diloco(2, reduce=reduce, round=avgfn.Round(verify=None))
    state = avg.init(params)
    now = {"a": params["a"]} if rank == 0 else params
    started = time.monotonic()
    result = _outcome(lambda: avg.update(now, state, 1), now)
    result["seconds"] = time.monotonic() - started
    return result


def _world(rank: int, world_size: int) -> dict[str, Any]:
    reduce = avgfn.collectives.all_reduce_mean(timeout=30)
    results = {
        "torch_filter": _torch_filter(rank, reduce),
        "sizes": _sizes(rank, reduce),
        "nothing": _nothing_selected(rank, reduce),
        "desync": _desync(rank, reduce),
        "diloco": _diloco_selection(rank, reduce),
        "opt_out": _opt_out(rank, reduce),
        "round/comm_dtype": _other_round(rank, reduce, {"comm_dtype": torch.bfloat16}),
        "round/buckets": _other_round(rank, reduce, {"bucket_bytes": 16}),
        "round/exclude": _other_round(rank, reduce, {"nonfinite": "exclude"}),
        "round/ignore": _other_policy(rank, reduce, "periodic", "ignore"),
        "round/skip": _other_policy(rank, reduce, "periodic", "skip"),
        "round/diloco_skip": _other_policy(rank, reduce, "diloco", "skip"),
        **{f"settings/{kind}": _other_settings(rank, reduce, kind) for kind in _SETTINGS},
        "kind": _other_kind(rank, reduce, ("periodic", "diloco")),
        "kind/weighted": _other_kind(rank, reduce, ("weighted", "fedavgm")),
        "kind/hierarchical": _other_kind(rank, reduce, ("periodic", "hierarchical")),
        "kind/overlapped": _other_kind(rank, reduce, ("diloco", "overlapped_diloco")),
        "streaming_carried_on/1": _streaming_carried_on(rank, reduce, 1),
        "streaming_carried_on/5": _streaming_carried_on(rank, reduce, 5),
        "refusal": _local_refusal(rank, reduce),
        "diloco_refusal": _diloco_refusal(rank, reduce),
    }
    for policy in ("raise", "exclude", "skip"):
        for bucket in (None, 32):
            results[f"overflow/{policy}/{bucket}"] = _overflow(rank, reduce, policy, bucket)
    for kind in ("plain", "donate", "exclude"):
        results[f"band/{kind}"] = _narrow_band(rank, reduce, kind, 0.0)
    results["band/both"] = _narrow_band(rank, reduce, "plain", 70000.0)
    results["after"] = avgfn.average({"w": torch.full((2,), float(rank))}, reduce)["w"].tolist()
    return results


@pytest.fixture(scope="module")
def world():
    return run_world(_world, 2, timeout=240)


@pytest.mark.parametrize("name", ["torch_filter", "sizes", "diloco", "nothing"])
def test_replicas_that_select_other_leaves_all_raise_before_anything_is_mixed(world, name):
    for rank in (0, 1):
        r = world[rank][name]
        assert r["error"] == "ReplicaMismatchError", (name, rank, r)
        assert r["unchanged"], (name, rank)
        assert "hold params that differ" in r["message"]
    assert "rank 0 has no leaf ['b.bias'], rank 1 has ['b.bias']" in world[0]["torch_filter"]["message"] \
        or "rank 1 has ['b" in world[0]["torch_filter"]["message"]
    assert SEL_DIFF in world[0]["sizes"]["message"]


def test_a_replica_that_selects_nothing_is_named_as_such(world):
    # not as a difference of Round options: its empty round runs on no device
    for rank in (0, 1):
        message = world[rank]["nothing"]["message"]
        assert "rank 0 averages no leaf in this round (its selection is empty), rank 1 averages 1 " \
            "(the first: ['a']: (3,) torch.float32)" in message, message
        assert "build every replica's averager with the same Round" not in message


def test_replicas_out_of_step_all_raise_naming_the_steps(world):
    for rank in (0, 1):
        r = world[rank]["desync"]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], r
        assert "rank 0 averages at step 4, rank 1 at step 6" in r["message"], r["message"]
        assert r["message"].startswith("at step")


def test_the_agreement_can_be_turned_off(world):
    for rank in (0, 1):
        r = world[rank]["opt_out"]
        assert r["error"] is None and r["mean"] == [0.5] * 4


@pytest.mark.parametrize("bucket", [None, 32])
def test_a_wire_overflow_is_refused_and_never_written_into_donated_params(world, bucket):
    for rank in (0, 1):
        r = world[rank][f"overflow/raise/{bucket}"]
        assert r["error"] == "NonFiniteError" and r["unchanged"], r
        r = world[rank][f"overflow/skip/{bucket}"]
        assert r["error"] is None and r["unchanged"] and r["finite"], r
        r = world[rank][f"overflow/exclude/{bucket}"]
        assert r["error"] is None and r["finite"], r
        assert r["a"] == [1.0] * 8  # rank 1's values only: rank 0 overflowed the wire
    assert "['a']" in world[0]["overflow/raise/None"]["message"]


def test_on_a_narrow_wire_a_plain_round_checks_the_mean_and_a_donated_one_each_value(world):
    # docs/round.md: the plain round divides before the cast and checks the mean it gets
    # back; a round that writes in place (or excludes) decides from each replica's values
    for rank in (0, 1):
        plain = world[rank]["band/plain"]
        assert plain["error"] is None and plain["w"] == [35008.0, 1.0], plain  # 35000 in fp16
        for kind in ("donate", "exclude"):
            r = world[rank][f"band/{kind}"]
            if kind == "exclude":  # the healthy replica's values only
                assert r["error"] is None and r["w"] == [0.0, 1.0], r
            else:
                assert r["error"] == "NonFiniteError" and r["unchanged"], r
        both = world[rank]["band/both"]  # the mean itself overflows: every replica raises
        assert both["error"] == "NonFiniteError" and both["unchanged"], both


def test_a_replica_that_averages_params_where_its_peer_averages_pseudo_gradients_is_named(world):
    # periodic on one rank, diloco on the other: the same leaves at the same step, but
    # not the same numbers (params against pseudo-gradients)
    for rank in (0, 1):
        for kind in ("kind", "kind/weighted"):  # periodic against diloco, weighted against fedavgm
            r = world[rank][kind]
            assert r["error"] == "ReplicaMismatchError" and r["unchanged"], r
            assert "averages=params" in r["message"] and "averages=pseudo-gradients" in r["message"], r


@pytest.mark.parametrize(
    "kind, names",
    [
        ("kind/hierarchical", ("periodic", "hierarchical")),
        ("kind/overlapped", ("diloco", "overlapped_diloco")),
    ],
)
def test_replicas_that_run_averagers_of_another_kind_on_the_same_numbers_are_named(world, kind, names):
    # the same leaves, step, Round and numbers (params, or pseudo-gradients), but another
    # algorithm on each rank: their results would drift apart silently
    for rank in (0, 1):
        r = world[rank][kind]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        assert all(f" of {name}," in r["message"] for name in names), (rank, r["message"])
        assert r["differs"] == "round", (rank, r)


def test_a_streaming_replica_that_carried_on_from_a_step_it_failed_alone_is_refused(world):
    # rank 1's global copy lacks fragment 0's outer step of step 5: fragment 1's round at
    # step 6 is refused on both ranks instead of averaging two global copies that differ
    for rank in (0, 1):
        r = world[rank]["streaming_carried_on/5"]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        assert "outer rounds done [2, 1]" in r["message"] and "outer rounds done [1, 1]" in r["message"], r
        assert r["differs"] == "round", (rank, r)
    # at step 1, before any outer step: rank 1 still checks the global copies of the first
    # round, which rank 0 is past; neither says that init was given different params
    for rank in (0, 1):
        r = world[rank]["streaming_carried_on/1"]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        assert "init was given" not in r["message"] and "out of step" in r["message"], (rank, r)
        assert "in a check of its params outside any round" in r["message"], (rank, r)
        assert r["differs"] == "step", (rank, r)


def test_the_group_still_works_after_every_refusal(world):
    assert world[0]["after"] == world[1]["after"] == [0.5, 0.5]


_SETTINGS = {
    "diloco": "outer sgd(lr=0.7",
    "streaming": "alpha=0.5",
    "overlapped": "eager=True",
    "slowmo": "momentum=0.9",
    "fedavgm": "outer sgd(lr=1.0, momentum=0.9",
}


@pytest.mark.parametrize("kind", sorted(_SETTINGS))
def test_replicas_built_with_another_outer_step_are_refused(world, kind):
    for rank in (0, 1):
        r = world[rank][f"settings/{kind}"]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        assert r["differs"] == "round" and _SETTINGS[kind] in r["message"], (rank, r)


@pytest.mark.parametrize("option", ["comm_dtype", "buckets", "exclude", "ignore", "skip", "diloco_skip"])
def test_replicas_built_with_other_round_options_all_raise(world, option):
    for rank in (0, 1):
        r = world[rank][f"round/{option}"]
        assert r["error"] == "ReplicaMismatchError" and r["unchanged"], (rank, r)
        assert "runs its rounds as" in r["message"] and "the same Round" in r["message"], r["message"]
        assert r["differs"] == "round", (rank, r)
    if option in ("ignore", "skip", "diloco_skip"):  # the policies are named
        message = world[0][f"round/{option}"]["message"]
        assert "nonfinite=raise" in message and f"nonfinite={option.split('_')[-1]}" in message, message


def test_a_replica_that_refuses_a_round_tells_its_peers(world):
    mine, peer = world[0]["refusal"], world[1]["refusal"]
    assert mine["error"] == "ValueError" and "share memory" in mine["message"], mine
    assert peer["error"] == "ReplicaMismatchError", peer
    assert "rank 0 refused the round (ValueError: donate=True: the leaves at" in peer["message"], peer
    assert mine["unchanged"] and peer["unchanged"]
    assert peer["seconds"] < 15, peer  # not the 30 s timeout: the agreement said it at once


def test_a_diloco_replica_whose_state_does_not_fit_tells_its_peers(world):
    mine, peer = world[0]["diloco_refusal"], world[1]["diloco_refusal"]
    assert mine["error"] == "ValueError" and "global copy of 2 leaves" in mine["message"], mine
    assert peer["error"] == "ReplicaMismatchError" and "rank 0 refused the round" in peer["message"], peer
    assert mine["unchanged"] and peer["unchanged"] and peer["seconds"] < 15, peer
