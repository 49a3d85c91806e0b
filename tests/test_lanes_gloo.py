"""A Reduce over spare process groups (``all_reduce_mean(group, spare_groups=...)``) on real gloo.

One world of four processes runs every case, each on process groups of its
own: a pair (ranks 0 and 1), whose one buffer is split over the lanes, and
the group of four, where only buckets are spread. The pieces are made small
(``_PIECE``) so that small params are split.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import utils as torch_utils

import avgfn
from avgfn._round import buffers as _buffers

from _dist import run_world

_SIZES = [(37, 11), (1000,), (3, 5, 7), (2049,), (1,)]


def _params(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * seed + rank)
    return {f"p{i}": torch.randn(shape, generator=g) for i, shape in enumerate(_SIZES)}


class _Lanes(avgfn.ForwardingReduce):
    """Records the lane of every sum the engine starts."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.lanes_used: list[int] = []

    def start(self, tensor: torch.Tensor) -> Any:
        self.lanes_used.append(0)
        return super().start(tensor)

    def start_sum(self, tensor: torch.Tensor) -> Any:
        self.lanes_used.append(0)
        return super().start_sum(tensor)

    def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Any:
        self.lanes_used.append(lane)
        return super().start_sum_on(lane, tensor)


def _round(params: dict[str, torch.Tensor], reduce: Any, **options: Any) -> dict[str, torch.Tensor]:
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(**options))
    tree = {k: v.clone() for k, v in params.items()}
    out = tree
    for step in (0, 2):  # the second donated round runs on the storage the first one made
        out, _ = avg.update(out, avg.init(out), step)
    return {k: v.clone() for k, v in out.items()}


_OPTIONS = {
    "default": {},
    "donate": {"donate": True},
    "bf16": {"comm_dtype": torch.bfloat16},
    "bf16 donate": {"comm_dtype": torch.bfloat16, "donate": True},
    "buckets": {"bucket_bytes": 4096, "donate": True},
    "feedback": {"comm_dtype": torch.bfloat16, "error_feedback": True},
    "exclude": {"nonfinite": "exclude", "donate": True},
    "no agree": {"agree": False, "donate": True},
}


def _torch_mean(params: dict[str, torch.Tensor], group: Any) -> dict[str, torch.Tensor]:
    tensors = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for _ in range(2):
        torch_utils.average_parameters(iter(tensors), group)
    return {k: t.detach() for k, t in zip(params, tensors)}


def _cases(rank: int, world_size: int) -> dict[str, Any]:
    _buffers._PIECE = 64
    every = list(range(world_size))
    pair = [0, 1]
    # dist.new_group is a collective of the whole world: every rank makes every group
    groups = {name: dist.new_group(ranks) for name, ranks in [
        ("pair", pair), ("pair spare", pair), ("pair one lane", pair), ("pair mixed", pair),
        ("pair mixed spare", pair), ("pair in flight", pair), ("pair in flight spare", pair),
        ("all", every), ("all spare", every), ("all one lane", every),
        ("pair three", pair), ("pair three a", pair), ("pair three b", pair),
        ("pair order", pair), ("pair order a", pair), ("pair order b", pair),
        ("pair predicted", pair), ("pair predicted spare", pair),
        ("pair weighted", pair), ("pair weighted spare", pair),
    ]}  # fmt: skip
    out: dict[str, Any] = {}
    params = _params(rank)
    if rank in pair:
        lanes = _Lanes(avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=[groups["pair spare"]]))
        alone = avgfn.collectives.all_reduce_mean(groups["pair one lane"])
        for name, options in _OPTIONS.items():
            before = len(lanes.lanes_used)
            out[f"pair {name}"] = (_round(params, lanes, **options), _round(params, alone, **options))
            out[f"pair {name} lanes"] = sorted(set(lanes.lanes_used[before:]))
        out["pair torch"] = _torch_mean(params, groups["pair one lane"])
        # results in flight are not split: they stay on the wire until read
        held = _Lanes(
            avgfn.collectives.all_reduce_mean(
                groups["pair in flight"], spare_groups=[groups["pair in flight spare"]], in_flight=True
            )
        )
        out["in flight"] = _round(params, held)
        out["in flight lanes"] = sorted(set(held.lanes_used))
        # a replica whose Reduce has a spare group, beside one whose Reduce has none
        spare = [groups["pair mixed spare"]] if rank == 0 else []
        mixed = avgfn.collectives.all_reduce_mean(groups["pair mixed"], spare_groups=spare, timeout=20)
        avg = avgfn.periodic(2, reduce=mixed, round=avgfn.Round(donate=True))
        tree = {k: v.clone() for k, v in params.items()}
        try:
            avg.update(tree, avg.init(tree), 0)
            out["mixed"] = None
        except avgfn.ReplicaMismatchError as error:
            out["mixed"] = (str(error), error.differs, all(torch.equal(tree[k], params[k]) for k in params))
        out.update(_which_groups(rank, params, groups))
        out["order"] = _spare_order(rank, params, groups)
        out["predicted"] = _predicted_then_refused(rank, params, groups)
        out["weighted"] = _weighted_mixed(rank, params, groups)
    else:
        # a rank outside the group (new_group hands it a placeholder) gets its input back
        outside = avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=[groups["pair spare"]])
        out["outside"] = torch.equal(outside(torch.ones(3)), torch.ones(3))
    everyone = _Lanes(avgfn.collectives.all_reduce_mean(groups["all"], spare_groups=[groups["all spare"]]))
    one = avgfn.collectives.all_reduce_mean(groups["all one lane"])
    for name in ("default", "donate", "buckets"):
        before = len(everyone.lanes_used)
        out[f"all {name}"] = (_round(params, everyone, **_OPTIONS[name]), _round(params, one, **_OPTIONS[name]))
        out[f"all {name} lanes"] = sorted(set(everyone.lanes_used[before:]))
    out["all torch"] = _torch_mean(params, groups["all one lane"])
    out["errors"] = _errors(rank, groups)
    return out


def _which_groups(rank: int, params: dict[str, torch.Tensor], groups: dict[str, Any]) -> dict[str, Any]:
    """The process group of every all-reduce of a round over a Reduce with two spare groups."""
    names = {groups[k].group_name: k for k in ("pair three", "pair three a", "pair three b")}
    three = avgfn.collectives.all_reduce_mean(
        groups["pair three"], spare_groups=[groups["pair three a"], groups["pair three b"]]
    )
    seen: list[str] = []
    real = dist.all_reduce

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        seen.append(names.get(getattr(group, "group_name", None), "other"))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = recording  # type: ignore[assignment]
    try:
        result = _round(params, three, donate=True)
    finally:
        dist.all_reduce = real
    return {"three": result, "three groups": seen}


def _spare_order(rank: int, params: dict[str, torch.Tensor], groups: dict[str, Any]) -> Any:
    """Replicas that pass the same spare groups in another order."""
    spare = [groups["pair order a"], groups["pair order b"]]
    reduce = avgfn.collectives.all_reduce_mean(
        groups["pair order"], spare_groups=spare if rank == 0 else spare[::-1], timeout=20
    )
    tree = {k: v.clone() for k, v in params.items()}
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(donate=True))
    try:
        avg.update(tree, avg.init(tree), 0)
        return None
    except avgfn.ReplicaMismatchError as error:
        return (str(error), error.differs, all(torch.equal(tree[k], params[k]) for k in params))


def _predicted_then_refused(rank: int, params: dict[str, torch.Tensor], groups: dict[str, Any]) -> Any:
    """Rounds the pair predicts (their check in their data), then one that rank 1 refuses."""
    reduce = avgfn.collectives.all_reduce_mean(
        groups["pair predicted"], spare_groups=[groups["pair predicted spare"]], timeout=20
    )
    avg = avgfn.periodic(2, reduce=reduce)
    tree = {k: v.clone() for k, v in params.items()}
    state = avg.init(tree)
    for step in range(0, 10, 2):
        tree, state = avg.update(tree, state, step)
    given: Any = tree if rank == 0 else iter(tree.values())  # a generator: refused
    try:
        avg.update(given, state, 10)
        return None
    except (avgfn.ReplicaMismatchError, TypeError) as error:
        return (type(error).__name__, str(error))


def _weighted_mixed(rank: int, params: dict[str, torch.Tensor], groups: dict[str, Any]) -> Any:
    """fedavg (a weighted round, which runs its own check) with a spare group on rank 0 only."""
    spare = [groups["pair weighted spare"]] if rank == 0 else []
    reduce = avgfn.collectives.all_reduce_mean(groups["pair weighted"], spare_groups=spare, timeout=20)
    avg = avgfn.fedavg(2, reduce=reduce, weight=1.0 + rank)
    tree = {k: v.clone() for k, v in params.items()}
    try:
        avg.update(tree, avg.init(tree), 1)  # fedavg's first round ends the first period
        return None
    except avgfn.ReplicaMismatchError as error:
        return (str(error), error.differs, all(torch.equal(tree[k], params[k]) for k in params))


class _Compressing(avgfn.collectives.GroupMean):
    def start_sum(self, tensor: torch.Tensor) -> Any:
        return super().start_sum(tensor)


def _errors(rank: int, groups: dict[str, Any]) -> dict[str, str]:
    cases = {
        "itself": lambda: avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=[groups["pair"]]),
        "twice": lambda: avgfn.collectives.all_reduce_mean(
            groups["pair"], spare_groups=[groups["pair spare"], groups["pair spare"]]
        ),
        "other ranks": lambda: avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=[groups["all"]]),
        "not a sequence": lambda: avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=groups["all"]),
        "not a group": lambda: avgfn.collectives.all_reduce_mean(groups["pair"], spare_groups=[None]),
    }
    found = {"subclass lanes": str(_Compressing(groups["pair"], spare_groups=[groups["pair spare"]]).lanes)}
    for name, build in cases.items():
        try:
            build()
            found[name] = "accepted"
        except (TypeError, ValueError) as error:
            found[name] = f"{type(error).__name__}: {error}"
    return found


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return run_world(_cases, 4)


@pytest.mark.parametrize("name", list(_OPTIONS))
def test_a_pair_splits_its_round_over_the_lanes_with_the_bits_of_one_group(world, name):
    for rank in (0, 1):
        spread, alone = world[rank][f"pair {name}"]
        assert _same(spread, alone), name
    lanes = world[0][f"pair {name} lanes"]
    # every round went over both groups (buckets too); error feedback divides as it packs, and a
    # round without the agreement that compares the lanes keeps to the group: one lane
    assert lanes == ([0] if name in ("feedback", "no agree") else [0, 1]), lanes


def test_a_split_pair_round_is_torchs_average(world):
    for rank in (0, 1):
        assert _same(world[rank]["pair default"][0], world[rank]["pair torch"])
        assert _same(world[rank]["pair donate"][0], world[rank]["pair torch"])


def test_results_in_flight_stay_on_one_lane(world):
    assert world[0]["in flight lanes"] == [0]
    assert _same(world[0]["in flight"], world[0]["pair torch"])


def test_with_more_replicas_only_buckets_are_spread_and_the_bits_stay_those_of_one_group(world):
    for rank in range(4):
        for name in ("default", "donate", "buckets"):
            spread, alone = world[rank][f"all {name}"]
            assert _same(spread, alone), (rank, name)
        assert _same(world[rank]["all default"][0], world[rank]["all torch"])
    assert world[0]["all default lanes"] == [0]
    assert world[0]["all donate lanes"] == [0]
    assert world[0]["all buckets lanes"] == [0, 1]


@pytest.mark.parametrize(
    "case, lanes",
    [("mixed", "lanes=2"), ("order", "lanes=3"), ("weighted", "lanes=2")],
    ids=["a spare group beside none", "the same spare groups in another order", "fedavg's own check"],
)
def test_replicas_whose_lanes_differ_all_raise_before_anything_moves(world, case, lanes):
    for rank in (0, 1):
        found = world[rank][case]
        assert found is not None, f"{case}: the replicas ran the round"
        message, differs, unchanged = found
        assert differs == "round" and lanes in message, message
        assert unchanged  # donated params untouched


def test_a_rank_outside_the_group_gets_its_input_back(world):
    assert world[2]["outside"] and world[3]["outside"]


def test_spare_groups_that_cannot_be_lanes_are_refused(world):
    errors = world[0]["errors"]
    assert errors["itself"].startswith("ValueError") and "spare_groups[0]" in errors["itself"]
    assert errors["twice"].startswith("ValueError") and "spare_groups[1]" in errors["twice"]
    assert errors["other ranks"].startswith("ValueError") and "[0, 1, 2, 3]" in errors["other ranks"]
    assert errors["not a sequence"].startswith("TypeError")
    assert errors["not a group"].startswith("TypeError") and "spare_groups[0]" in errors["not a group"]
    # a subclass whose start_sum changes what is sent keeps every sum on its start_sum: one lane
    assert errors["subclass lanes"] == "1"


def test_each_piece_goes_over_its_own_group(world):
    for rank in (0, 1):
        spread, alone = world[rank]["three"], world[rank]["pair donate"][1]
        assert _same(spread, alone)
        used = world[rank]["three groups"]
        assert set(used) == {"pair three", "pair three a", "pair three b"}, used


def test_a_predicted_round_that_a_peer_refuses_is_refused_on_both_not_aborted(world):
    assert world[0]["predicted"][0] == "ReplicaMismatchError" and "rank 1" in world[0]["predicted"][1]
    assert world[1]["predicted"][0] == "TypeError"
