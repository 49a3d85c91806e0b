"""Host buffers the round engine uses again: never while anything still holds them."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

import avgfn
from _dist import run_world
from _groups import Pair
from avgfn import collectives
from avgfn._round import pool as _pool

BIG = _pool.SMALLEST // 4  # float32 elements of the smallest buffer kept


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _saved_for_backward(a: torch.Tensor) -> Any:
    w = torch.randn(a.numel(), requires_grad=True)
    return (w * a).sum()  # a (no grad of its own) is saved for the gradient of w


HOLDERS = {
    "a view": lambda a: a[10:20],
    "its storage object": lambda a: a.untyped_storage(),
    "a weak reference to its storage": lambda a: weakref.ref(a.untyped_storage()),
    "saved for backward": _saved_for_backward,
    "a tensor set on its storage": lambda a: torch.empty(0).set_(a.untyped_storage()),
}


@pytest.mark.parametrize("hold", HOLDERS.values(), ids=HOLDERS.keys())
def test_a_buffer_is_taken_again_only_once_nothing_holds_it(hold):
    pool = _pool.Pool(per_layout=8)
    a = pool.take(BIG, torch.float32, torch.device("cpu"))
    first = _storage(a)
    assert _storage(pool.take(BIG, torch.float32, torch.device("cpu"))) != first  # a is held
    holder = hold(a)
    del a
    assert _storage(pool.take(BIG, torch.float32, torch.device("cpu"))) != first  # the holder holds it
    del holder
    again = pool.take(BIG, torch.float32, torch.device("cpu"))
    assert _storage(again) == first
    assert again._base is None  # nothing leads from what is handed out to what is kept


def test_a_buffer_moved_to_shared_memory_is_dropped():
    # another process may hold it (torch.multiprocessing keeps no local reference)
    pool = _pool.Pool(per_layout=8)
    a = pool.take(BIG, torch.float32, torch.device("cpu"))
    a.share_memory_()
    del a
    again = pool.take(BIG, torch.float32, torch.device("cpu"))
    assert not again.untyped_storage().is_shared()
    assert all(not base.untyped_storage().is_shared() for base in pool.kept[(BIG, torch.float32)])


def test_nothing_is_kept_under_a_fake_or_tracing_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    pool = _pool.Pool()
    with FakeTensorMode():
        fake = pool.take(BIG, torch.float32, torch.device("cpu"))
    assert not pool.kept
    real = pool.take(BIG, torch.float32, torch.device("cpu"))
    assert type(real) is torch.Tensor and type(fake) is not torch.Tensor


def test_at_most_a_few_buffers_of_a_few_layouts_are_kept():
    pool = _pool.Pool(per_layout=2, layouts=2)
    held = [pool.take(BIG, torch.float32, torch.device("cpu")) for _ in range(3)]
    assert len(pool.kept[(BIG, torch.float32)]) == 2  # the most recent ones
    for n in (BIG + 1, BIG + 2):
        pool.take(n, torch.float32, torch.device("cpu"))
    assert list(pool.kept) == [(BIG + 1, torch.float32), (BIG + 2, torch.float32)]
    del held


def test_small_buffers_and_other_devices_are_not_kept():
    pool = _pool.Pool()
    pool.take(BIG - 1, torch.float32, torch.device("cpu"))
    pool.take(BIG, torch.float32, torch.device("meta"))
    assert not pool.kept
    assert pool.release() == 0


def test_release_drops_what_is_kept():
    pool = _pool.Pool()
    pool.take(BIG, torch.float32, torch.device("cpu"))
    pool.take(2 * BIG, torch.bfloat16, torch.device("cpu"))
    assert pool.release() == BIG * 4 + 2 * BIG * 2
    assert pool.release() == 0
    assert avgfn.release_buffers() >= 0


def _rounds(rnd: avgfn.Round, rounds: int = 8) -> tuple[list[Any], list[dict], set[int]]:
    # every other round's params are dropped (their memory may be used again),
    # the others are held to the end; the leaves are large enough to be kept
    avg = avgfn.periodic(1, reduce=Pair(), round=rnd)
    params = {"w": torch.randn(2 * BIG), "b": torch.randn(BIG + 3)}
    state = avg.init(params)
    outs: list[Any] = []
    copies: list[dict] = []
    storages: list[int] = []
    for step in range(rounds):
        out, state = avg.update(params, state, step)
        storages.append(_storage(out["w"]))
        params = {k: v + 1 for k, v in out.items()}
        outs.append(out if step % 2 else None)
        copies.append({k: v.clone() for k, v in out.items()})
    reused = {ptr for i, ptr in enumerate(storages) if ptr in storages[:i]}
    return outs, copies, reused


@pytest.mark.parametrize(
    "rnd",
    [avgfn.Round(), avgfn.Round(comm_dtype=torch.bfloat16), avgfn.Round(bucket_bytes=1 << 22)],
    ids=["pure", "bf16", "buckets"],
)
def test_results_the_caller_holds_are_never_written_by_later_rounds(rnd):
    outs, copies, reused = _rounds(rnd)
    assert reused  # memory of dropped rounds was used again
    for out, copy in zip(outs, copies):
        if out is not None:
            for k in out:
                assert torch.equal(out[k], copy[k]), k


def test_the_round_before_last_is_used_again_once_dropped():
    avgfn.release_buffers()
    avg = avgfn.periodic(1, reduce=Pair())
    params = {"w": torch.randn(BIG)}
    state = avg.init(params)
    seen = []
    for step in range(6):  # a training loop: only the current params are held
        params, state = avg.update(params, state, step)
        seen.append(_storage(params["w"]))
    assert len(set(seen)) == 2, seen  # two buffers, in turn: no fresh memory after the first rounds


def test_a_bf16_wire_gives_the_bits_of_casting_each_leaf():
    # (a leaf longer than the engine's division chunk too)
    params = {"w": torch.randn(BIG), "b": torch.randn(7, 3), "long": torch.randn((1 << 20) + 3)}
    one = avgfn.average(params, Pair(), round=avgfn.Round(comm_dtype=torch.bfloat16))
    staged = avgfn.average(params, Pair(), round=avgfn.Round(comm_dtype=torch.bfloat16, bucket_bytes=1 << 24))
    for k in params:
        assert one[k].dtype == torch.float32 and one[k].shape == params[k].shape
        assert torch.equal(one[k], staged[k]), k
        assert torch.equal(one[k], params[k].to(torch.bfloat16).to(torch.float32)), k


def _held(rank: int, world: int) -> dict[str, Any]:
    reduce = collectives.all_reduce_mean(timeout=60)
    avg = avgfn.periodic(1, reduce=reduce)
    g = torch.Generator().manual_seed(rank)
    params = {"w": torch.randn(BIG, generator=g), "b": torch.randn(5, generator=g)}
    state = avg.init(params)
    outs, copies = [], []
    for step in range(6):
        out, state = avg.update(params, state, step)
        outs.append(out)
        copies.append({k: v.clone() for k, v in out.items()})
        if step % 2:
            outs[-2] = None  # the caller drops some rounds: their memory may be used again
        params = {k: v * 0.5 + rank for k, v in out.items()}
    intact = all(torch.equal(o[k], c[k]) for o, c in zip(outs, copies) if o is not None for k in o)
    return {"intact": intact}


def test_results_held_on_a_real_group_stay_intact():
    for rank, got in enumerate(run_world(_held, 2, timeout=120)):
        assert got["intact"], rank
