"""Lanes of a group-backed Reduce, in one process: which sums the engine starts on which lane."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import avgfn
from avgfn._core import types as _types
from avgfn._round import buffers as _buffers
from avgfn._round import engine as _engine


class _Pair:
    """A group of two whose peer holds the same values, with ``lanes`` lanes; it records each sum's lane."""

    size = 2

    def __init__(self, lanes: int = 2, in_flight: bool = False) -> None:
        self.lanes = lanes
        self.in_flight = in_flight
        self.used: list[tuple[int, int]] = []  # (lane, elements)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def divisor(self) -> int:
        return 2

    def start(self, tensor: torch.Tensor) -> Any:
        return _types.Done(tensor.clone())

    def start_sum(self, tensor: torch.Tensor) -> Any:
        return self.start_sum_on(0, tensor)

    def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Any:
        self.used.append((lane, tensor.numel()))
        return _types.Done(tensor * 2)

    def agree(self, digest: bytes, entries: Any) -> None:
        return None

    def commit(self) -> bool:
        return True


def _average(reduce: Any, **options: Any) -> dict[str, torch.Tensor]:
    params = {"a": torch.arange(300.0), "b": torch.ones(7, 9)}
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(**options))
    out, _ = avg.update(params, avg.init(params), 0)
    assert all(torch.equal(out[k], params[k]) for k in params)  # the mean of equal replicas
    return out


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(_buffers, "_PIECE", 16)


def test_a_pair_sends_its_one_buffer_in_one_piece_per_lane(small_pieces):
    pair = _Pair(lanes=3)
    _average(pair)
    assert [lane for lane, _ in pair.used] == [0, 1, 2]
    assert sum(n for _, n in pair.used) == 363


def test_buckets_go_round_the_lanes(small_pieces):
    pair = _Pair(lanes=2)
    _average(pair, bucket_bytes=400)  # 200 bytes a bucket: 50 float32
    lanes = [lane for lane, _ in pair.used]
    assert len(lanes) == 8 and lanes == [k % 2 for k in range(8)]


def test_a_buffer_below_a_piece_per_lane_is_not_split(monkeypatch):
    monkeypatch.setattr(_buffers, "_PIECE", 200)
    pair = _Pair(lanes=2)
    _average(pair)
    assert pair.used == [(0, 363)]


def test_results_in_flight_and_a_group_of_one_lane_are_not_split(small_pieces):
    for pair in (_Pair(lanes=2, in_flight=True), _Pair(lanes=1)):
        _average(pair)
        assert pair.used == [(0, 363)]


def test_a_forwarding_reduce_forwards_the_lanes(small_pieces):
    seen: list[bool] = []

    class Watch(avgfn.ForwardingReduce):
        def observe(self, tensor: torch.Tensor, divided: bool) -> None:
            seen.append(divided)

    pair = _Pair(lanes=2)
    wrapped = Watch(pair)
    assert wrapped.lanes == 2 and _types.lanes(wrapped) == 2
    _average(wrapped)
    assert [lane for lane, _ in pair.used] == [0, 1] and seen == [True, True]
    assert Watch(lambda t: t).lanes == 1


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2", None])
def test_a_group_that_says_no_usable_lanes_has_one(value):
    pair = _Pair()
    pair.lanes = value  # type: ignore[assignment]
    assert _types.lanes(pair) == 1


def test_a_plain_reduce_has_one_lane():
    assert _types.lanes(lambda t: t) == 1


def test_spare_groups_before_init_process_group_are_refused():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="spare_groups.*init_process_group"):
        avgfn.collectives.all_reduce_mean(spare_groups=[dist.GroupMember.NON_GROUP_MEMBER])
    with pytest.raises(TypeError, match="spare_groups must be a sequence"):
        avgfn.collectives.all_reduce_mean(spare_groups=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"spare_groups\[1\] must be a ProcessGroup"):
        avgfn.collectives.all_reduce_mean(spare_groups=[dist.GroupMember.NON_GROUP_MEMBER, "lo"])
    reduce = avgfn.collectives.all_reduce_mean()
    assert reduce.lanes == 1 and reduce.spare_groups == ()


def test_start_sum_on_refuses_a_lane_it_does_not_have():
    reduce = avgfn.collectives.all_reduce_mean()
    for lane in (1, -1):
        with pytest.raises(ValueError, match=r"lane must be in \[0, 1\)"):
            reduce.start_sum_on(lane, torch.ones(2))
    for lane in (True, 0.0, "0"):
        with pytest.raises(TypeError, match="lane must be an int"):
            reduce.start_sum_on(lane, torch.ones(2))  # type: ignore[arg-type]
    assert avgfn.collectives.all_reduce_mean(spare_groups=None).lanes == 1


class _Predicting(_Pair):
    """A pair whose rounds may carry their check in their data (`avgfn._round.predicted`)."""

    agree_in_data = True

    def history_token(self) -> Any:
        return self


def test_a_predicted_round_stays_whole_as_the_round_a_peer_declines_it_with(small_pieces):
    pair = _Predicting(lanes=2)
    avg = avgfn.periodic(2, reduce=pair)
    params = {"w": torch.ones(1000)}
    state = avg.init(params)
    for step in range(0, 12, 2):
        pair.used.clear()
        params, state = avg.update(params, state, step)
    # the check travels in the data (18 numbers more), on the group itself, whole
    assert pair.used == [(0, 1018)]
    pair.used.clear()
    _engine.refuse(pair, 12, ValueError("this replica's inputs"))  # what a declining peer sends
    assert pair.used == [(0, 1018)]


def test_a_forwarding_reduce_that_overrides_start_sum_alone_has_one_lane(small_pieces):
    class Zeroing(avgfn.ForwardingReduce):
        def start_sum(self, tensor: torch.Tensor) -> Any:
            tensor.zero_()
            return super().start_sum(tensor)

    class Both(Zeroing):
        def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Any:
            tensor.zero_()
            return super().start_sum_on(lane, tensor)

    for kind, lanes in ((Zeroing, 1), (Both, 2)):
        pair = _Pair(lanes=2)
        wrapped = kind(pair)
        assert wrapped.lanes == lanes
        params = {"w": torch.ones(100)}
        avg = avgfn.periodic(2, reduce=wrapped, round=avgfn.Round(nonfinite="ignore"))
        out, _ = avg.update(params, avg.init(params), 0)
        assert torch.equal(out["w"], torch.zeros(100))  # the override saw every piece
        assert [lane for lane, _ in pair.used] == list(range(lanes))


def test_a_forwarding_reduce_that_overrides_start_sum_on_alone_sees_every_piece(small_pieces):
    seen: list[int] = []

    class On(avgfn.ForwardingReduce):
        def start_sum_on(self, lane: int, tensor: torch.Tensor) -> Any:
            seen.append(tensor.numel())
            return super().start_sum_on(lane, tensor)

    pair = _Pair(lanes=2)
    _average(On(pair))
    assert sum(seen) == 363 and [lane for lane, _ in pair.used] == [0, 1]


def test_a_round_without_its_agreement_keeps_to_the_group(small_pieces):
    # nothing compared the lanes: replicas built with other spare groups must still meet
    pair = _Pair(lanes=2)
    _average(pair, agree=False)
    assert pair.used == [(0, 363)]
