"""The fast paths of a round: donation, buckets, reduced precision on the wire."""

from __future__ import annotations

import pytest
import torch

import avgfn
from avgfn._round.buffers import plan_buckets
from avgfn.testing import RecordingReduce, peers_mean
from _dist import run_world


def _params(seed=0, flat=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (), (0,), (4, 4, 2), (33,)]
    leaves = [torch.randn(s, generator=g) for s in shapes]
    if flat:  # all leaves views of one buffer, in order
        buf = torch.cat([t.reshape(-1) for t in leaves])
        out, o = [], 0
        for t in leaves:
            out.append(buf[o : o + t.numel()].view(t.shape))
            o += t.numel()
        leaves = out
    return {f"p{i}": t for i, t in enumerate(leaves)} | {"idx": torch.arange(3)}


PEER = lambda t: t * 3.0 - 1.0  # noqa: E731  (what a fake peer holds)


def test_plan_buckets_splits_and_keeps_order():
    assert plan_buckets([3, 0, 5], None) == [[(0, 0, 3), (1, 0, 0), (2, 0, 5)]]
    assert plan_buckets([3, 0, 5], 4) == [[(0, 0, 3), (1, 0, 0), (2, 0, 1)], [(2, 1, 5)]]
    assert plan_buckets([9], 4) == [[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 9)]]


@pytest.mark.parametrize("bucket_bytes", [16, 40, 100, 10_000])
@pytest.mark.parametrize("donate", [False, True])
def test_buckets_and_donation_equal_the_default_exactly(bucket_bytes, donate):
    expected = avgfn.average(_params(), peers_mean(PEER))
    params = _params()
    snapshot = {k: v.clone() for k, v in params.items()}
    reduce = RecordingReduce(peers_mean(PEER))
    out = avgfn.average(params, reduce, round=avgfn.Round(donate=donate, bucket_bytes=bucket_bytes))
    for k in expected:
        assert torch.equal(out[k], expected[k]), k
        if k == "idx":
            assert out[k] is params[k]
        elif donate:
            assert out[k] is params[k]  # staged per bucket and written back in place
        else:
            assert torch.equal(params[k], snapshot[k])  # inputs untouched
    numel = sum(v.numel() for k, v in params.items() if k != "idx")
    data = reduce.inputs[1:] if donate else reduce.inputs  # a donating round exchanges health first
    if donate:
        assert reduce.inputs[0].tolist() == [0.0, 1.0, 0.0]  # [unhealthy, healthy, no room to sum]
    assert sum(t.numel() for t in data) == numel
    assert max(t.numel() * 4 for t in data) <= max(bucket_bytes // 2, 4)


def test_donation_of_tiled_params_reduces_their_storage_directly():
    params = _params(flat=True)
    storage = params["p0"].untyped_storage().data_ptr()
    seen = []

    def reduce(t):
        seen.append(t.untyped_storage().data_ptr())
        return t.mul_(0.5)

    expected = avgfn.average(_params(flat=True), lambda t: t * 0.5)
    out = avgfn.average(params, reduce, round=avgfn.Round(donate=True, nonfinite="ignore"))
    assert seen == [storage]  # no staging buffer: the params' own storage
    for k in expected:
        assert torch.equal(out[k], expected[k])


def test_default_round_outputs_tile_one_buffer_so_the_next_donation_is_free():
    out = avgfn.average(_params(), lambda t: t)
    seen = []
    avgfn.average(out, lambda t: seen.append(t.untyped_storage().data_ptr()) or t, round=avgfn.Round(donate=True, nonfinite="ignore"))
    assert seen == [out["p0"].untyped_storage().data_ptr()]


def test_donation_refuses_shared_memory():
    t = torch.ones(4)
    with pytest.raises(ValueError, match=r"leaves at \['a'\] and \['b'\] share memory"):
        avgfn.average({"a": t, "b": t}, lambda x: x, round=avgfn.Round(donate=True))
    base = torch.ones(6)
    with pytest.raises(ValueError, match="share memory"):
        avgfn.average({"a": base[:4], "b": base[2:]}, lambda x: x, round=avgfn.Round(donate=True))
    # an unselected leaf that aliases a selected one would change too
    with pytest.raises(ValueError, match="share memory"):
        avgfn.average({"a": base, "b": base.view(2, 3)}, lambda x: x, round=avgfn.Round(donate=True))
    with pytest.raises(ValueError, match="overlaps itself"):
        avgfn.average({"a": torch.ones(1).expand(3)}, lambda x: x, round=avgfn.Round(donate=True))
    # disjoint views of one buffer are fine
    avgfn.average({"a": base[:3], "b": base[3:]}, lambda x: x, round=avgfn.Round(donate=True))


def test_donation_without_buckets_rehomes_scattered_params():
    params = _params()
    out = avgfn.average(params, lambda t: t * 2, round=avgfn.Round(donate=True))
    assert out["p0"] is not params["p0"]
    assert out["p0"].untyped_storage().data_ptr() == out["p5"].untyped_storage().data_ptr()
    again = avgfn.average(out, lambda t: t * 2, round=avgfn.Round(donate=True))
    assert all(again[k] is out[k] for k in out)  # tiled now: in place, no copy


def test_donation_handles_non_contiguous_and_grad_leaves():
    w = torch.randn(3, 4).t()  # non-contiguous
    p = torch.nn.Parameter(torch.randn(5))
    expected = avgfn.average({"w": w.clone(), "p": p.detach().clone()}, peers_mean(PEER))
    out = avgfn.average({"w": w, "p": p}, peers_mean(PEER), round=avgfn.Round(donate=True, bucket_bytes=32))
    assert out["w"] is w and out["p"] is p
    assert torch.equal(w, expected["w"]) and torch.equal(p.detach(), expected["p"])


def test_bf16_on_the_wire():
    params = _params()
    reduce = RecordingReduce(peers_mean(PEER))
    out = avgfn.average(params, reduce, round=avgfn.Round(comm_dtype=torch.bfloat16))
    exact = avgfn.average(params, peers_mean(PEER))
    assert reduce.inputs[0].dtype == torch.bfloat16
    for k in exact:
        assert out[k].dtype == params[k].dtype
        assert torch.allclose(out[k], exact[k], rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_donation_on_a_narrower_wire_writes_back_into_the_donated_leaves(wire):
    # the leaves can never be a buffer of the wire dtype: the round writes the
    # mean into them (no fresh fp32 outputs each round), with the bits of the
    # pure round on the same wire
    expected = avgfn.average(_params(), peers_mean(PEER), round=avgfn.Round(comm_dtype=wire))
    for params in (_params(), _params(flat=True)):
        out = avgfn.average(params, peers_mean(PEER), round=avgfn.Round(comm_dtype=wire, donate=True))
        for k in expected:
            assert out[k] is params[k], k
            assert torch.equal(out[k], expected[k]), k


def test_error_feedback_keeps_what_rounding_lost():
    avg = avgfn.periodic(2, reduce=lambda t: t, round=avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True))
    params = {"w": torch.full((4,), 1.0 + 2.0**-12), "i": torch.arange(2)}
    state = avg.init(params)
    assert len(state.residual) == 1 and torch.equal(state.residual[0], torch.zeros(4))
    new, state2 = avg.update(params, state, 0)
    # a group of one: what is sent plus what is kept is what the replica had
    assert torch.equal(new["w"] + state2.residual[0], params["w"])
    assert new["w"][0].item() == 1.0 and state2.residual[0][0].item() == 2.0**-12
    # the state round-trips through a checkpoint
    sd = avgfn.state_dict(state2)
    assert sorted(sd) == [".residual[0]", ".rounds"]
    again = avgfn.load_state_dict(avg.init(params), sd)
    assert torch.equal(again.residual[0], state2.residual[0])


def test_error_feedback_on_leaves_of_any_shape():
    avg = avgfn.periodic(2, reduce=lambda t: t, round=avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True, bucket_bytes=16))
    params = {"w": torch.randn(4, 3) + 1, "s": torch.tensor(1.0 + 2.0**-12), "e": torch.ones(0, 2)}
    new, state = avg.update(params, avg.init(params), 0)
    assert [r.shape for r in state.residual] == [p.shape for p in params.values()]
    for k, r in zip(params, state.residual):
        assert torch.equal(new[k] + r, params[k])


def test_options_are_validated():
    with pytest.raises(TypeError, match="donate must be a bool"):
        avgfn.average({}, lambda t: t, round=avgfn.Round(donate=1))
    with pytest.raises(ValueError, match="bucket_bytes must be >= 16, got 8"):
        avgfn.periodic(2, reduce=lambda t: t, round=avgfn.Round(bucket_bytes=8))
    with pytest.raises(TypeError, match="comm_dtype must be None or one of"):
        avgfn.periodic(2, reduce=lambda t: t, round=avgfn.Round(comm_dtype=torch.int8))
    with pytest.raises(ValueError, match="error_feedback=True needs a comm_dtype"):
        avgfn.hierarchical([(2, lambda t: t)], round=avgfn.Round(error_feedback=True))


def _gloo_fast_paths(rank, world_size):
    reduce = avgfn.collectives.all_reduce_mean()
    params = _params(seed=rank)
    out = {"default": avgfn.average(params, reduce)}
    out["bucket"] = avgfn.average(params, reduce, round=avgfn.Round(bucket_bytes=64))
    out["bucket_donate"] = avgfn.average(_params(seed=rank), reduce, round=avgfn.Round(bucket_bytes=64, donate=True))
    out["donate_tiled"] = avgfn.average(_params(seed=rank, flat=True), reduce, round=avgfn.Round(donate=True))
    out["bf16"] = avgfn.average(params, reduce, round=avgfn.Round(comm_dtype=torch.bfloat16))
    out["fp16_bucket"] = avgfn.average(params, reduce, round=avgfn.Round(comm_dtype=torch.float16, bucket_bytes=48))
    return out


def test_fast_paths_on_gloo():
    results = run_world(_gloo_fast_paths, 2)
    for out in results:
        ref = out["default"]
        for name in ("bucket", "bucket_donate", "donate_tiled"):
            for k in ref:
                assert torch.equal(out[name][k], ref[k]), (name, k)
        for name in ("bf16", "fp16_bucket"):
            for k in ref:
                assert torch.allclose(out[name][k], ref[k], rtol=2**-7, atol=2**-7), (name, k)
    for k in results[0]["default"]:
        assert torch.equal(results[0]["bucket_donate"][k], results[1]["bucket_donate"][k])


@pytest.mark.parametrize("option", [{"donate": True}, {"bucket_bytes": 64}, {"comm_dtype": torch.bfloat16}])
def test_fast_paths_say_clearly_that_vmap_is_not_supported(option):
    from avgfn import simulate

    avg = avgfn.periodic(2, reduce=simulate.replica_mean(), **option)
    stacked = {"w": torch.ones(4, 3)}
    state = torch.func.vmap(avg.init)(stacked)
    with pytest.raises(ValueError, match="not supported under torch.func.vmap"):
        torch.func.vmap(avg.update, in_dims=(0, 0, None))(stacked, state, 0)


def test_a_device_s_share_of_a_mixed_dtype_round_comes_back_in_its_leaves_dtype():
    # on several devices each device's buffers take the mean in the dtype promoted
    # over all of them (float64 here) while this device's leaves are float32
    from _groups import Pair

    from avgfn._round.buffers import Buffers

    leaves = [torch.randn(300), torch.randn(4, 5)]
    for rnd in (avgfn.Round(comm_dtype=torch.bfloat16), avgfn.Round()):
        values, _ = Buffers(leaves, Pair(), rnd, torch.float64, None, None).run()
        for leaf, value in zip(leaves, values):
            assert value.dtype == leaf.dtype and value.shape == leaf.shape
            assert torch.allclose(value, leaf, rtol=2**-7, atol=0)
