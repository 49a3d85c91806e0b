"""DTensor params (FSDP2's) through every averager, on one 4-process gloo world.

The world is a (replicate=2, shard=2) ``DeviceMesh``: ranks ``2 i + j`` hold
shard ``j`` of replica ``i``. Each replica trains the conformance task
(tests/test_conformance.py) on the full tensors; before every ``update`` its
params are sharded (``Shard(0)``, uneven where a dimension is odd), and the
averager, whose Reduce is the mean over the replicate group, must hand back
DTensors laid out as they came, equal bit for bit to the same run on the
full tensors. Two layouts: the 1-D shard mesh (what ``fully_shard`` makes in
each replica) and the 2-D mesh with ``[Replicate(), Shard(0)]``. The
int64 leaf stays a plain tensor (mixed DTensor and plain leaves).

Everything is checked inside the world; each rank returns its findings.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

import avgfn
import test_conformance as tc
from _dist import run_world
from avgfn import collectives

WORLD = 4
SHARDED = ("w1", "b1", "w2", "b2")


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _shard(params: dict[str, torch.Tensor], mesh: Any, two_d: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    sub, placements = (mesh, [Replicate(), Shard(0)]) if two_d else (mesh["shard"], [Shard(0)])
    out: dict[str, Any] = dict(params)
    for key in SHARDED:
        # src_data_rank=None: every rank cuts its own copy (the replicas differ)
        out[key] = distribute_tensor(params[key].detach(), sub, placements, src_data_rank=None)
    return out


def _shards(tree: Any, like: Any) -> Any:
    """The local shards of ``tree``'s DTensors; ``like``'s plain tensors cut as ``tree``'s are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def cut(t: Any, full: Any) -> Any:
        if not isinstance(t, DTensor):
            return (t, full)
        piece = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
        return (t.to_local(), piece.to_local())

    pairs = pytree.tree_map(cut, tree, like)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], torch.Tensor)  # noqa: E731
    return pytree.tree_map(lambda p: p[0], pairs, is_leaf=is_pair), pytree.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)


def _layouts(tree: Any) -> list[Any]:
    from torch.distributed.tensor import DTensor

    return [
        (type(t).__name__, tuple(t.placements), t.device_mesh.mesh.tolist(), tuple(t.shape), t.stride())
        if isinstance(t, DTensor)
        else type(t).__name__
        for t in pytree.tree_leaves(tree)
    ]


def _diff(a: Any, b: Any) -> str:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return f"structure {sa} != {sb}"
    for k, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor):
            if type(x) is not type(y) or x.dtype != y.dtype or not torch.equal(x, y):
                return f"leaf {k}: {x!r} != {y!r}"
        elif x != y:
            return f"leaf {k}: {x!r} != {y!r}"
    return ""


def _comm(group: Any) -> tc.Comm:
    mean = collectives.all_reduce_mean(group)
    return tc.Comm(mean, lambda spec: [(period, mean) for period in spec])


def _plain(name: str, replica: int, comm: tc.Comm) -> tuple[list, list, Any]:
    """The conformance run of ``name`` on full tensors: each step's inputs and outputs, the final state."""
    avg = tc.REGISTRY[name].make(comm)
    params = tc.initial_params(replica)
    xs, ys = tc.data(replica)
    state = avg.init(params)
    inputs, outputs = [], []
    for step in range(tc.STEPS):
        local = tc.local_step(params, xs[step], ys[step])
        params, state = avg.update(local, state, step)
        inputs.append(local)
        outputs.append(params)
    return inputs, outputs, state


def _sharded_run(name: str, replica: int, comm: tc.Comm, mesh: Any, two_d: bool, plain: tuple) -> dict[str, Any]:
    """The same steps on DTensors, fed the plain run's inputs; compared shard by shard at each step.

    Feeding each step the plain run's (full) inputs keeps the check free of
    all-gathers: with equal outputs at every step the two runs are one.
    """
    inputs, outputs, plain_state = plain
    avg = tc.REGISTRY[name].make(comm)
    state = avg.init(_shard(tc.initial_params(replica), mesh, two_d))
    first = _layouts(state)
    found = {"params": "", "layouts kept": True}
    for step in range(tc.STEPS):
        local = _shard(inputs[step], mesh, two_d)
        new, state = avg.update(local, state, step)
        found["layouts kept"] = found["layouts kept"] and _layouts(new) == _layouts(local)
        diff = _diff(*_shards(new, outputs[step]))
        if diff and not found["params"]:
            found["params"] = f"step {step}: {diff}"
    got, want = _shards(state, plain_state)
    if hasattr(got, "pending") and got.pending is not None:
        # Streaming DiLoCo's flat buffer in flight holds the shards: its length differs by design.
        got, want = got.replace(pending=got.pending[:0]), want.replace(pending=want.pending[:0])
    found["state"] = _diff(got, want)
    found["state layouts"] = _layouts(state)
    found["state types kept"] = found["state layouts"] == first  # no plain counter turns DTensor
    found["moved"] = not torch.equal(outputs[-1]["w1"], tc.initial_params(replica)["w1"])
    return found


def _world(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    mesh = _mesh()
    replica = rank // 2
    comm = _comm(mesh["replicate"].get_group())
    found: dict[str, Any] = {}
    for name in tc.NAMES:
        plain = _plain(name, replica, comm)
        for two_d in (False, True):
            try:
                found[(name, two_d)] = _sharded_run(name, replica, comm, mesh, two_d, plain)
            except Exception:  # noqa: BLE001 - reported by the test of this scenario
                found[(name, two_d)] = {"error": traceback.format_exc()}
    found["mismatch"] = _wrong_group(mesh, replica)
    for policy in ("raise", "skip", "exclude"):
        for donate in (False, True):
            found[("nan", policy, donate)] = _nan_in_one_shard(mesh, replica, comm, policy, donate)
    for name in ("ema", "swa"):
        for policy in ("skip", "raise"):
            found[("temporal nan", name, policy)] = _temporal_nan_in_one_shard(mesh, replica, name, policy)
    found["global device"] = _global_device_of_dtensors(mesh, replica)
    for name in DCP_AVERAGERS:
        try:
            found[("dcp", name)] = _dcp_resume(name, replica, comm, mesh, f"{folder}/{name}")
        except Exception:  # noqa: BLE001 - reported by the test of this scenario
            found[("dcp", name)] = {"error": traceback.format_exc()}
    for name in FSDP_AVERAGERS:
        try:
            found[("fsdp", name)] = _fsdp(name, replica, comm, mesh)
        except Exception:  # noqa: BLE001 - reported by the test of this scenario
            found[("fsdp", name)] = {"error": traceback.format_exc()}
    return found


FSDP_AVERAGERS = ("diloco", "streaming", "periodic")
DCP_AVERAGERS = ("diloco_adamw", "streaming", "chain_diloco_ema")
SAVE_AT = 5


def _dcp_resume(name: str, replica: int, comm: tc.Comm, mesh: Any, path: str) -> dict[str, Any]:
    """Save the state through DCP mid-run, load it into a fresh init, resume: the same run.

    Each replica saves its own checkpoint over its shard group (the replicas'
    states differ: an EMA of local params, a replica's own counters), as
    torchft's replica groups do.
    """
    import torch.distributed.checkpoint as dcp

    group = mesh["shard"].get_group()
    path = f"{path}-replica{replica}"

    inputs, _, _ = _plain(name, replica, comm)
    avg = tc.REGISTRY[name].make(comm)
    fresh = lambda: avg.init(_shard(tc.initial_params(replica), mesh, False))  # noqa: E731
    state, outputs = fresh(), []
    for step in range(tc.STEPS):
        if step == SAVE_AT:
            dcp.save({"avg": avgfn.sharded_state_dict(state, group=group)}, checkpoint_id=path, process_group=group)
        new, state = avg.update(_shard(inputs[step], mesh, False), state, step)
        outputs.append(new)
    template = fresh()
    loaded = {"avg": avgfn.sharded_state_dict(template, group=group)}
    dcp.load(loaded, checkpoint_id=path, process_group=group)
    resumed = avgfn.load_sharded_state_dict(template, loaded["avg"])
    diffs = []
    for step in range(SAVE_AT, tc.STEPS):
        new, resumed = avg.update(_shard(inputs[step], mesh, False), resumed, step)
        diffs.append(_diff(*_shards(new, outputs[step])))
    got, want = _shards(resumed, state)
    return {"params": [d for d in diffs if d], "state": _diff(got, want), "layouts": _layouts(resumed) == _layouts(state)}


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train_module(model: torch.nn.Module, averager: Any, replica: int, steps: int = 9) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=tc.LR)
    xs, ys = tc.data(replica)
    for step in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[step]), ys[step]).backward()
        opt.step()
        averager.step(step)


def _fsdp(name: str, replica: int, comm: tc.Comm, mesh: Any) -> dict[str, Any]:
    """ModuleAverager over an FSDP2 module (sharded in each replica) against a plain module."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain = _model()
    _train_module(plain, avgfn.ModuleAverager(plain, tc.REGISTRY[name].make(comm)), replica)
    sharded = _model()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(sharded, mesh=mesh["shard"])
    averager = avgfn.ModuleAverager(sharded, tc.REGISTRY[name].make(comm))
    _train_module(sharded, averager, replica)
    got = {k: v.full_tensor() for k, v in sharded.named_parameters()}
    want = dict(plain.named_parameters())
    return {
        "dtensors": all(isinstance(v, DTensor) for v in sharded.parameters()),
        "diff": {k: float((got[k] - want[k]).abs().max()) for k in want},
        "state dtensors": sum(isinstance(t, DTensor) for t in pytree.tree_leaves(averager.state)),
        "moved": not torch.equal(want["0.weight"], _model()[0].weight),
    }


def _nan_in_one_shard(mesh: Any, replica: int, comm: tc.Comm, policy: str, donate: bool) -> str:
    """A NaN in replica 0's first shard only: every rank of the world must decide alike."""
    def of(r: int) -> dict[str, torch.Tensor]:
        base = tc.initial_params(r)
        return {k: (v + r if k in SHARDED else v) for k, v in base.items()}  # the replicas differ

    params = of(replica)
    if replica == 0:
        params["w1"][0, 0] = float("nan")
    sharded = _shard(params, mesh, False)
    before = {k: v.to_local().clone() for k, v in sharded.items() if k in SHARDED}
    try:
        new = avgfn.average(sharded, comm.mean, round=avgfn.Round(nonfinite=policy, donate=donate))
    except avgfn.NonFiniteError:
        return "raised"
    kept = all(torch.allclose(new[k].to_local(), before[k], rtol=0, atol=0, equal_nan=True) for k in SHARDED)
    # "exclude": the healthy replica's values, on every rank (replica 1 keeps its own)
    want = {k: v.to_local() for k, v in _shard(of(1), mesh, False).items() if k in SHARDED}
    healthy = all(torch.equal(new[k].to_local(), want[k]) for k in SHARDED)
    return ("kept " if kept else "") + ("healthy" if healthy else "") or "mixed"


def _temporal_nan_in_one_shard(mesh: Any, replica: int, name: str, policy: str) -> str:
    """EMA/SWA over sharded params, a NaN in replica 0's first shard only at step 1.

    Both ranks of replica 0 must take the same decision (skip, or raise), so
    that their average's shards keep one count; replica 1 goes on.
    """
    make = {"ema": lambda: avgfn.ema(0.5, nonfinite=policy), "swa": lambda: avgfn.swa(nonfinite=policy)}[name]
    avg = make()
    params = _shard(tc.initial_params(replica), mesh, False)
    state = avg.init(params)
    outcome = []
    for step in range(3):
        plain = {k: v + step for k, v in tc.initial_params(replica).items()}
        if step == 1 and replica == 0:
            plain["w1"][0, 0] = float("nan")
        params = _shard(plain, mesh, False)
        try:
            params, state = avg.update(params, state, step)
        except avgfn.NonFiniteError as error:
            outcome.append("raised " + ("here" if error.paths else "elsewhere"))
            continue
        outcome.append(int(state.count))
    return " ".join(map(str, outcome))


def _global_device_of_dtensors(mesh: Any, replica: int) -> str:
    params = _shard(tc.initial_params(replica), mesh, False)
    try:
        avgfn.diloco(2, reduce=lambda t: t, global_device="meta", round=avgfn.Round(verify=None)).init(params)
    except ValueError as error:
        return str(error)
    return "accepted"


def _wrong_group(mesh: Any, replica: int) -> str:
    """A Reduce over the shard dimension: the ranks hold other pieces, and every one raises."""
    params = _shard(tc.initial_params(replica), mesh, False)
    try:
        avgfn.average(params, collectives.all_reduce_mean(mesh["shard"].get_group()))
    except avgfn.ReplicaMismatchError as error:
        return str(error)
    return "no error"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> list[dict[str, Any]]:
    return run_world(_world, WORLD, str(tmp_path_factory.mktemp("dcp")), timeout=600)


@pytest.mark.parametrize("two_d", [False, True], ids=["shard-mesh", "2d-mesh"])
@pytest.mark.parametrize("name", tc.NAMES)
def test_dtensor_params_equal_the_full_tensor_run(world, name, two_d):
    for rank in range(WORLD):
        got = world[rank][(name, two_d)]
        assert "error" not in got, got.get("error")
        assert got["params"] == "", (rank, got["params"])
        assert got["state"] == "", (rank, got["state"])
        assert got["layouts kept"] and got["state types kept"], (rank, got["state layouts"])
        assert got["moved"], rank


def test_the_state_keeps_dtensors_where_the_params_have_them(world):
    # the DiLoCo family's global copy (and outer state) stays sharded like the params
    for two_d in (False, True):
        layouts = world[0][("diloco_adamw", two_d)]["state layouts"]
        assert sum(1 for entry in layouts if isinstance(entry, tuple)) >= 3 * len(SHARDED), layouts


def test_a_reduce_over_the_shard_dimension_is_refused_before_any_value_moves(world):
    for rank in range(WORLD):
        message = world[rank]["mismatch"]
        assert "shard of (5, 8) [S(0)] at (0, 0)" in message, message
        assert "shard of (5, 8) [S(0)] at (3, 0)" in message, message


@pytest.mark.parametrize("name", FSDP_AVERAGERS)
def test_module_averager_over_an_fsdp2_module(world, name):
    for rank in range(WORLD):
        got = world[rank][("fsdp", name)]
        assert "error" not in got, got.get("error")
        assert got["dtensors"] and got["moved"], got
        if name != "periodic":  # the global copy is sharded like the params (4 of them)
            assert got["state dtensors"] >= 4, got
        # FSDP2 averages the gradients within a replica (each shard rank saw the same batch)
        assert max(got["diff"].values()) <= 1e-6, got["diff"]


@pytest.mark.parametrize("name", DCP_AVERAGERS)
def test_a_dcp_checkpoint_of_a_sharded_state_resumes_exactly(world, name):
    for rank in range(WORLD):
        got = world[rank][("dcp", name)]
        assert "error" not in got, got.get("error")
        assert got["params"] == [] and got["state"] == "" and got["layouts"], got


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("policy", ["raise", "skip", "exclude"])
def test_a_nan_in_one_shard_is_decided_alike_on_every_shard(world, policy, donate):
    # before the verdict was and-ed over the shard dimension, the ranks of shard 1 went on
    want = {
        "raise": ["raised"] * WORLD,
        "skip": ["kept ", "kept ", "kept healthy", "kept healthy"],  # ranks 0, 1: replica 0
        "exclude": ["healthy", "healthy", "kept healthy", "kept healthy"],
    }[policy]
    assert [world[rank][("nan", policy, donate)] for rank in range(WORLD)] == want


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("name", ["ema", "swa"])
def test_ema_and_swa_judge_a_replica_on_all_its_shards(world, name, policy):
    # before, rank 1 (replica 0's clean shard) counted step 1 while rank 0 skipped or raised
    got = [world[rank][("temporal nan", name, policy)] for rank in range(WORLD)]
    replica0 = {"skip": ["1 1 2"] * 2, "raise": ["1 raised here 2", "1 raised elsewhere 2"]}[policy]
    assert got == replica0 + ["1 2 3"] * 2, got


def test_dtensor_params_refuse_a_global_copy_off_their_mesh(world):
    for rank in range(WORLD):
        message = world[rank]["global device"]
        assert "global_device='meta'" in message and "pass global_device=None" in message, message
