"""avgfn.simulate: the vmap-aware Reduce, its hierarchy, stacking, and the averagers under vmap."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch.func import grad, vmap

import avgfn
from avgfn import simulate

ROOT = Path(__file__).resolve().parents[1]


def _replicas(num: int, *shape: int) -> torch.Tensor:
    # Replica r holds values r * 8 + k: small integers, so means over groups of
    # a power-of-two size are exact in float32 and can be compared with ==.
    per = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float32)
    return torch.stack([(r * 8 + per).reshape(shape) for r in range(num)])


def _expected(stacked: torch.Tensor, group: int) -> torch.Tensor:
    out = torch.empty_like(stacked)
    for start in range(0, stacked.shape[0], group):
        members = stacked[start : start + group]
        total = members[0] / group
        for m in members[1:]:
            total = total + m / group
        out[start : start + group] = total
    return out


# --- group semantics -------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 4, 8, None])
def test_means_over_consecutive_groups(group):
    stacked = _replicas(8, 3, 2)
    got = vmap(simulate.replica_mean(group))(stacked.clone())
    expected = _expected(stacked, 8 if group is None else group)
    assert torch.equal(got, expected)
    if group == 1:
        assert torch.equal(got, stacked)
    if group in (8, None):
        assert torch.equal(got, stacked.mean(0).expand_as(stacked))
    # the result is a fresh tensor: no memory shared with the input or between replicas
    assert got.is_contiguous() and got.stride(0) == 6
    assert got.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()


def test_groups_of_three_within_float32_rounding():
    torch.manual_seed(0)
    stacked = torch.randn(6, 50)
    got = vmap(simulate.replica_mean(3))(stacked)
    exact = stacked.double().reshape(2, 3, 50).mean(1, keepdim=True).expand(2, 3, 50).reshape(6, 50)
    torch.testing.assert_close(got, exact.float(), rtol=2e-7, atol=2e-7)
    torch.testing.assert_close(got, _expected(stacked, 3), rtol=2e-7, atol=0)
    # members of a group hold bitwise the same mean
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
    assert not torch.equal(got[2], got[3])


def test_outside_vmap_is_a_group_of_one():
    x = torch.tensor([1.0, -2.0, 3.5])
    for reduce in (simulate.replica_mean(), simulate.replica_mean(4)):
        out = reduce(x)
        assert torch.equal(out, x) and out is not x
    assert avgfn.average({"w": x}, simulate.replica_mean())["w"].tolist() == x.tolist()


def test_other_in_dims_and_out_dims():
    stacked = _replicas(4, 5)  # (W=4, 5)
    expected = _expected(stacked, 2)
    moved = stacked.t().contiguous()  # replicas along dim 1
    got = vmap(simulate.replica_mean(2), in_dims=1, out_dims=1)(moved)
    assert torch.equal(got, expected.t())
    got = vmap(simulate.replica_mean(2), in_dims=1)(moved)
    assert torch.equal(got, expected)
    # replicas along the last dim of a 3-d tensor, through avgfn.average
    cube = stacked.reshape(4, 1, 5).permute(1, 2, 0)  # (1, 5, W)
    out = vmap(lambda p: avgfn.average(p, simulate.replica_mean(2)), in_dims=2, out_dims=2)({"w": cube})
    assert torch.equal(out["w"], expected.reshape(4, 1, 5).permute(1, 2, 0))


def test_nested_vmap_reduces_the_innermost_level_that_maps_the_tensor():
    # outer: 2 independent worlds; inner: 4 replicas each.
    x = torch.arange(8.0).reshape(2, 4) * 2
    inner = vmap(vmap(simulate.replica_mean(2)))(x)
    assert inner.tolist() == [[1.0, 1.0, 5.0, 5.0], [9.0, 9.0, 13.0, 13.0]]
    everyone = vmap(vmap(simulate.replica_mean()))(x)
    assert everyone.tolist() == [[3.0] * 4, [11.0] * 4]
    # in_dims on the outer level: the worlds along dim 1
    swapped = vmap(vmap(simulate.replica_mean()), in_dims=1, out_dims=1)(x.t().contiguous())
    assert torch.equal(swapped, everyone.t())

    # An inner vmap that does not map the tensor (data only) is passed over:
    # the mean is over the outer level, the one that maps it.
    def inner_over_data(w):
        return vmap(lambda d: simulate.replica_mean()(w) + 0 * d)(torch.zeros(3))

    out = vmap(inner_over_data)(torch.tensor([1.0, 3.0]))
    assert out.tolist() == [[2.0] * 3, [2.0] * 3]


def test_float64_bfloat16_and_complex():
    for dtype in (torch.float64, torch.bfloat16, torch.complex64):
        stacked = _replicas(4, 3).to(dtype)
        got = vmap(simulate.replica_mean())(stacked)
        assert got.dtype == dtype
        assert torch.equal(got, stacked.mean(0).expand_as(stacked))


# --- bad input -------------------------------------------------------------------------------


def test_group_size_that_does_not_divide_w():
    with pytest.raises(ValueError, match=r"group_size 3 does not divide the number of replicas W=8"):
        vmap(simulate.replica_mean(3))(torch.zeros(8, 2))
    avg = avgfn.periodic(2, reduce=simulate.replica_mean(3))
    stacked = {"w": torch.zeros(4, 2)}
    state = vmap(avg.init)(stacked)
    with pytest.raises(ValueError, match=r"group_size 3 .* W=4"):
        vmap(avg.update, in_dims=(0, 0, None))(stacked, state, 0)


def test_replica_dimension_of_size_zero():
    with pytest.raises(ValueError, match="size 0"):
        vmap(simulate.replica_mean())(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="must not be empty"):
        simulate.stack([])
    with pytest.raises(ValueError, match="size 0"):
        simulate.unstack({"w": torch.zeros(0, 3)})


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_group_size(bad, error):
    with pytest.raises(error, match="group_size"):
        simulate.replica_mean(bad)


def test_bad_tensor():
    with pytest.raises(TypeError, match="floating-point"):
        simulate.replica_mean()(torch.arange(3))
    with pytest.raises(TypeError, match="Tensor"):
        simulate.replica_mean()([1.0, 2.0])


# --- hierarchy -------------------------------------------------------------------------------


def test_hierarchy_levels_and_groups():
    levels = simulate.hierarchy({2: 2, 4: 4, 8: 8}, world_size=8)
    assert [(p, r.group_size) for p, r in levels] == [(2, 2), (4, 4), (8, 8)]
    levels = simulate.hierarchy([(3, 1), (6, 8)], 8)
    assert [(p, r.group_size) for p, r in levels] == [(3, 1), (6, 8)]
    avg = avgfn.hierarchical(levels)
    stacked = {"w": _replicas(8, 2)}
    state = vmap(avg.init)(stacked)
    update = vmap(avg.update, in_dims=(0, 0, None))
    out, state = update(stacked, state, 3)  # group of one: unchanged values
    assert torch.equal(out["w"], stacked["w"])
    out, state = update(out, state, 6)
    assert torch.equal(out["w"], _expected(stacked["w"], 8))
    assert state.rounds.tolist() == [[1, 1]] * 8


@pytest.mark.parametrize(
    "sizes, world, error, pattern",
    [
        ({2: 1, 4: 2}, 4, ValueError, "last group size must equal world_size, 4; got 2"),
        ({2: 3, 4: 6}, 6 * 2, ValueError, "last group size"),
        ({2: 3, 4: 8}, 8, ValueError, "group size 3 of period 2 does not divide world_size, 8"),
        ({2: 0, 4: 4}, 4, ValueError, "must be an int >= 1"),
        ({}, 4, ValueError, "must not be empty"),
        ([(4, 2), (2, 4)], 4, ValueError, "strictly increasing"),
        ([(0, 2), (2, 4)], 4, ValueError, "first period"),
        ({2: 2, 4: 4}, 0, ValueError, "world_size must be >= 1"),
        ({2: 2, 4: 4}, 4.0, TypeError, "world_size must be an int"),
    ],
)
def test_hierarchy_bad_input(sizes, world, error, pattern):
    with pytest.raises(error, match=re.escape(pattern)):
        simulate.hierarchy(sizes, world)


# --- stack / unstack / shard -----------------------------------------------------------------


def test_stack_unstack_round_trip():
    reps = [{"a": torch.randn(2, 3), "b": [torch.randn(4), torch.tensor(1.5, dtype=torch.float64)]} for _ in range(3)]
    before = [{"a": r["a"].clone(), "b": [t.clone() for t in r["b"]]} for r in reps]
    stacked = simulate.stack(reps)
    assert stacked["a"].shape == (3, 2, 3) and stacked["b"][1].shape == (3,)
    assert stacked["b"][1].dtype == torch.float64
    back = simulate.unstack(stacked)
    assert len(back) == 3
    for r, b, orig in zip(reps, back, before):
        assert torch.equal(b["a"], orig["a"]) and torch.equal(b["b"][0], orig["b"][0])
        assert torch.equal(b["b"][1], orig["b"][1])
    # no memory shared with the replicas, nor between unstack's output and its input
    stacked["a"].add_(1)
    assert torch.equal(reps[0]["a"], before[0]["a"])
    back[0]["a"].zero_()
    assert torch.equal(stacked["a"][0], before[0]["a"] + 1)


def test_stack_modules_matches_stack_module_state():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)) for _ in range(3)]
    params = simulate.stack(models)
    ref_params, ref_buffers = torch.func.stack_module_state(models)
    assert list(params) == list(ref_params)
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]) and not params[k].requires_grad
    both = simulate.stack(models, buffers=True)
    assert list(both) == list(ref_params) + list(ref_buffers)
    for k in ref_buffers:
        assert torch.equal(both[k], ref_buffers[k])
    # runs through functional_call replica by replica
    x = torch.randn(5, 3)
    out = vmap(lambda p: torch.func.functional_call(models[0], p, (x,)), randomness="same")(both)
    models[1].train()
    assert torch.allclose(out[1], models[1](x), atol=1e-6)
    # and loads back into modules
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(simulate.unstack(params)[2], strict=False)
    assert torch.equal(fresh[0].weight, models[2][0].weight)


def test_stack_bad_input():
    a = {"w": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"replica 1 has another structure.*only in replica 0: \['b'\]"):
        simulate.stack([a, {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"replica 2 has another structure"):
        simulate.stack([a, a, [torch.zeros(2), torch.zeros(3)]])
    with pytest.raises(ValueError, match=r"leaf at \['b'\].*shape \(3,\).*shape \(4,\) on cpu in replica 1"):
        simulate.stack([a, {"w": torch.zeros(2), "b": torch.zeros(4)}])
    with pytest.raises(ValueError, match=r"leaf at \['w'\] is a torch.float32.*torch.float64"):
        simulate.stack([a, {"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}])
    with pytest.raises(TypeError, match=r"leaf at \['n'\] of replica 0 is int"):
        simulate.stack([{"n": 1}, {"n": 1}])
    with pytest.raises(TypeError, match="a mix"):
        simulate.stack([torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}])
    with pytest.raises(TypeError, match="a list"):
        simulate.stack(torch.zeros(3, 2))
    models = [torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)]
    with pytest.raises(ValueError, match=r"leaf at \['weight'\]"):
        simulate.stack(models)


def test_unstack_bad_input():
    with pytest.raises(ValueError, match=r"disagree.*3 at \['a'\], 4 at \['b'\]"):
        simulate.unstack({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="0-d"):
        simulate.unstack({"a": torch.zeros(3), "b": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="not a tensor"):
        simulate.unstack({"a": torch.zeros(3), "n": 3})


def test_shard():
    x, y = torch.arange(24.0).reshape(12, 2), torch.arange(12)
    sx, sy = simulate.shard((x, y), 4)
    assert sx.shape == (4, 3, 2) and sy.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert torch.equal(sx[2], x[6:9])
    with pytest.raises(ValueError, match=r"world_size 5 does not divide the length 12 of the leaf at \[0\]"):
        simulate.shard((x, y), 5)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        simulate.shard(x, 0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        simulate.shard(x, 2.0)


# --- every averager of the contract under vmap ---------------------------------------------------

W = 4


def _averagers():
    return {
        "periodic": avgfn.periodic(3, reduce=simulate.replica_mean(), warmup_steps=2),
        "periodic-pairs": avgfn.periodic(2, reduce=simulate.replica_mean(2)),
        "periodic-where": avgfn.periodic(2, reduce=simulate.replica_mean(), where={"w": True, "b": False}),
        "hierarchical": avgfn.hierarchical(simulate.hierarchy({2: 2, 4: 4}, W), warmup_steps=1),
    }


def _schedule(name, step):
    """The group size averaged at ``step`` (0: none), written out by hand."""
    if name == "periodic":
        return W if step >= 2 and (step - 2) % 3 == 0 else 0
    if name in ("periodic-pairs", "periodic-where"):
        return (2 if name == "periodic-pairs" else W) if step % 2 == 0 else 0
    if step < 1:
        return 0
    return W if step % 4 == 0 else 2 if step % 2 == 0 else 0


@pytest.mark.parametrize("name", list(_averagers()))
def test_averagers_under_vmap(name):
    avg = _averagers()[name]
    torch.manual_seed(1)
    stacked = {"w": torch.randn(W, 3, 2), "b": torch.randn(W, 2)}
    data = torch.randn(W, 10, 3)

    def loss(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).mean()

    def local(p, x):
        g = grad(loss)(p, x)
        return {k: p[k] - 0.1 * g[k] for k in p}

    def step_fn(p, s, x, step):
        return avg.update(local(p, x), s, step)

    state = vmap(avg.init)(stacked)
    train = vmap(step_fn, in_dims=(0, 0, 0, None))
    rounds = 0
    for step in range(9):
        before = vmap(local)(stacked, data)
        stacked, state = train(stacked, state, data, step)
        group = _schedule(name, step)
        rounds += group > 0
        for k in stacked:
            if group and not (name == "periodic-where" and k == "b"):
                want = _expected(before[k], group)
                torch.testing.assert_close(stacked[k], want, rtol=1e-6, atol=1e-7)
                assert torch.equal(stacked[k][0], stacked[k][group - 1])
            else:
                assert torch.equal(stacked[k], before[k])
    total = state.rounds.sum(-1) if state.rounds.dim() == 2 else state.rounds
    assert total.tolist() == [rounds] * W


def test_compile_vmapped_training_step_fullgraph():
    avg = avgfn.hierarchical(simulate.hierarchy([(2, 2), (4, 4)], W))
    torch.manual_seed(2)
    stacked = {"w": torch.randn(W, 3, 2), "b": torch.randn(W, 2)}
    data = torch.randn(W, 10, 3)

    def step_fn(p, s, x, step):
        g = grad(lambda q: ((x @ q["w"] + q["b"]) ** 2).mean())(p)
        return avg.update({k: p[k] - 0.1 * g[k] for k in p}, s, step)

    train = vmap(step_fn, in_dims=(0, 0, 0, None))
    compiled = torch.compile(train, fullgraph=True, backend="aot_eager")
    eager_p, eager_s = stacked, vmap(avg.init)(stacked)
    comp_p, comp_s = eager_p, eager_s
    for step in range(5):
        eager_p, eager_s = train(eager_p, eager_s, data, step)
        comp_p, comp_s = compiled(comp_p, comp_s, data, step)
        for k in stacked:
            torch.testing.assert_close(comp_p[k], eager_p[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(comp_s.rounds, eager_s.rounds)
    assert comp_s.rounds.tolist() == [[1, 2]] * W  # pairs at 2; everyone at 0 and 4


def _strides(tree):
    return [(torch.utils._pytree.keystr(path), leaf.stride()) for path, leaf in torch.utils._pytree.tree_flatten_with_path(tree)[0]]


def test_compiled_diloco_with_adamw_builds_no_graph_for_strides():
    # vmap(init) used to make its int64 counters with torch.zeros: unbatched, so vmap
    # returned them expanded (stride 0), while update returns counter + 1 (stride 1).
    # torch.compile guards on strides: 5 graphs for 24 steps. Now the state of
    # vmap(init) has update's strides, and the 3 graphs left are those the Python step
    # asks for: step 0 (dynamo specializes an int it sees first), then, with step
    # symbolic, the local steps and the outer steps (`(step + 1) % period`, a host branch).
    from torch._dynamo.testing import CompileCounterWithBackend

    replicas = 8
    avg = avgfn.diloco(4, reduce=simulate.replica_mean())
    train = avgfn.with_inner_state(avgfn.optim.adamw(0.01), avg, "keep")
    torch.manual_seed(3)
    stacked = {"w": torch.randn(replicas, 3, 2), "b": torch.randn(replicas, 2)}
    data = torch.randn(replicas, 10, 3)

    def step_fn(p, s, x, step):
        g = grad(lambda q: ((x @ q["w"] + q["b"]) ** 2).mean())(p)
        return train.update(g, s, p, step)

    step_all = vmap(step_fn, in_dims=(0, 0, 0, None))
    state = vmap(train.init)(stacked)
    after_local = step_all(stacked, state, data, 0)[1]
    after_outer = step_all(stacked, state, data, 3)[1]
    assert _strides(state) == _strides(after_local) == _strides(after_outer)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step_all, fullgraph=True, backend=counter)
    eager_p, comp_p, eager_s, comp_s = stacked, stacked, state, state
    try:
        for step in range(24):
            eager_p, eager_s = step_all(eager_p, eager_s, data, step)
            comp_p, comp_s = compiled(comp_p, comp_s, data, step)
    finally:
        torch._dynamo.reset()  # the other compiled tests of this file start from a clean cache
    assert counter.frame_count == 3
    for k in stacked:
        torch.testing.assert_close(comp_p[k], eager_p[k], rtol=1e-6, atol=1e-7)
    assert comp_s.averager.rounds.tolist() == [6] * replicas
    assert comp_s.optimizer.step.tolist() == [24] * replicas


def test_counters_of_vmapped_init_are_batched():
    # Every averager's and optimizer's counter: vmap(init) stacks it (stride 1), it is
    # not a stride-0 expansion of one unbatched zero.
    stacked = {"w": torch.randn(4, 3)}
    inits = {
        "periodic": avgfn.periodic(2, reduce=simulate.replica_mean()).init,
        "hierarchical": avgfn.hierarchical(simulate.hierarchy({2: 2, 4: 4}, 4)).init,
        "diloco": avgfn.diloco(2, reduce=simulate.replica_mean()).init,
        "sgd": avgfn.optim.sgd(0.1, momentum=0.9).init,
        "adam": avgfn.optim.adam(0.1).init,
        "adamw": avgfn.optim.adamw(0.1).init,
    }
    for name, init in inits.items():
        for path, stride in _strides(vmap(init)(stacked)):
            assert 0 not in stride, (name, path, stride)
    # outside vmap nothing changes: plain zeros, periodic's counter on the CPU
    assert avgfn.periodic(2, reduce=simulate.replica_mean()).init(stacked).rounds.device.type == "cpu"
    assert avgfn.optim.adamw(0.1).init({"w": torch.ones(2)}).step.stride() == ()


def test_compile_with_inductor():
    f = torch.compile(vmap(simulate.replica_mean(2)), fullgraph=True)
    stacked = _replicas(4, 3)
    assert torch.equal(f(stacked), _expected(stacked, 2))


# --- the example cannot rot ---------------------------------------------------------------------


def test_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("simulate_local_sgd", ROOT / "examples" / "simulate_local_sgd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--steps", "8", "--period", "4"])
    out = capsys.readouterr().out
    rounds = re.findall(r"^step +(\d+)  round (\d+): spread ([0-9.e+-]+) -> ([0-9.e+-]+)$", out, re.M)
    assert [(int(s), int(r)) for s, r, _, _ in rounds] == [(0, 1), (4, 2)], out
    for *_, before, after in rounds:
        # the workers drift apart on their own shards, and are equal after each averaging
        assert float(before) > 0 and float(after) == 0.0, out
    losses = re.findall(r"^step +(\d+)  losses ((?:[0-9.]+ ?){8})$", out, re.M)
    assert [int(s) for s, _ in losses] == [0, 4], out
    assert re.search(r"test accuracy of the averaged model [0-9.]+$", out, re.M), out


def test_benchmark_runs_and_its_variants_agree():
    # A few steps, no compile: the benchmark itself checks the three trainings agree.
    spec = importlib.util.spec_from_file_location("simulate_benchmark", ROOT / "benchmarks" / "simulate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--no-compile", "--runs", "1", "--steps", "4", "--warmup", "4", "--json"])
    assert set(result) >= {"loop_ms", "simulate_eager_ms", "simulate_compiled_ms", "compile_s", "speedup"}
    assert result["loop_ms"] > 0 and result["simulate_eager_ms"] > 0
