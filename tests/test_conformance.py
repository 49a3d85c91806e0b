"""One conformance suite over every averager of the package (a registry, as optax has).

Every entry of :data:`REGISTRY` builds an averager from a :class:`Comm` (the
Reduces of a world: real gloo groups, simulated replicas under ``vmap``, or
fakes), and goes through the same checks:

* purity: ``update`` never changes its inputs, and off-steps return them;
* the state keeps its structure, shapes and dtypes across steps;
* the params keep their dtypes (float32, float64 and an int64 leaf);
* a checkpoint taken mid-run resumes to the uninterrupted run, bit for bit;
* a group of one: the simulated world of one replica equals the eager run
  with ``lambda t: t``; and for the entries that only average, training with
  the averager alone equals training without it;
* one 4-process gloo world runs every entry for a dozen steps of a tiny MLP,
  and the same runs simulated under ``vmap`` in this process give the same
  params at every step (float32 rounding of a different summation order).

The gloo world also holds the DiLoCo oracle: the outer step against
``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`` applied to the same
averaged pseudo-gradient, bit for bit.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.func import grad, vmap

import avgfn
from _dist import run_world
from avgfn import collectives, optim, simulate
from avgfn import chain
from avgfn import diloco
from avgfn import overlapped_diloco
from avgfn import slowmo
from avgfn import streaming_diloco
from avgfn import ema, swa
from avgfn import fedavg, fedavgm, weighted
from avgfn.testing import peers_mean

WORLD = 4
STEPS = 12
BATCH = 8
SIZES = (5, 8, 3)
LR = 0.2
FLOAT_KEYS = ("w1", "b1", "w2", "b2")
# Float32 rounding of a different summation order, grown over a dozen steps
# (an outer momentum amplifies it a little); a wrong group, schedule or
# weight moves params by 1e-3 and more.
RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Comm:
    """The Reduces of one world: ``mean`` over all replicas, and hierarchy levels."""

    mean: Any
    hierarchy: Callable[[dict[int, int]], list]
    replicas: Any = None  # the group size, where ``mean`` cannot tell it (eager updates need it)


def _weight(params: Any, step: int) -> torch.Tensor:
    return params["n"]  # each replica's sample count, a leaf of its params


@dataclass(frozen=True)
class Entry:
    make: Callable[[Comm], avgfn.Averager]
    only_averages: bool = False  # with a group of one, training is unchanged...
    exactly: bool = True  # ...bit for bit (else up to float rounding)


REGISTRY: dict[str, Entry] = {
    "periodic": Entry(lambda c: avgfn.periodic(3, reduce=c.mean, warmup_steps=2), True),
    "hierarchical": Entry(lambda c: avgfn.hierarchical(c.hierarchy({2: 2, 4: 4}), warmup_steps=1), True),
    "diloco": Entry(lambda c: diloco(4, reduce=c.mean)),
    "diloco_adamw": Entry(lambda c: diloco(3, reduce=c.mean, outer_optimizer=optim.adamw(0.05))),
    "diloco_sgd1": Entry(lambda c: diloco(3, reduce=c.mean, outer_optimizer=optim.sgd(1.0)), True, False),
    "streaming": Entry(
        lambda c: streaming_diloco(4, reduce=c.mean, num_fragments=2, delay=1, alpha=0.5)
    ),
    "streaming_sgd1": Entry(
        lambda c: streaming_diloco(4, reduce=c.mean, num_fragments=4, outer_optimizer=optim.sgd(1.0)),
        True,
        False,
    ),
    "slowmo": Entry(lambda c: slowmo(6, reduce=c.mean, lr=LR, momentum=0.5, base_period=2)),
    "weighted": Entry(lambda c: weighted(3, reduce=c.mean, weight=_weight, warmup_steps=1), True),
    "fedavg": Entry(lambda c: fedavg(4, reduce=c.mean, weight=_weight), True),
    "fedavgm": Entry(
        lambda c: fedavgm(3, reduce=c.mean, weight=_weight, server_lr=0.8, server_momentum=0.5)
    ),
    "ema": Entry(lambda c: ema(0.8, start=2), True),
    "swa": Entry(lambda c: swa(start=3, every=2), True),
    "chain_diloco_ema": Entry(lambda c: chain(diloco(4, reduce=c.mean), ema(0.9))),
    "overlapped": Entry(lambda c: overlapped_diloco(3, reduce=c.mean, num_replicas=c.replicas)),
    "overlapped_delayed": Entry(lambda c: overlapped_diloco(3, reduce=c.mean, eager=False)),
}

NAMES = sorted(REGISTRY)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


ALONE = Comm(_identity, lambda spec: [(period, _identity) for period in spec], 1)


def _fake_comm() -> Comm:
    """A group with one peer whose buffers are half of ours."""
    peer = peers_mean(lambda t: t * 0.5)
    return Comm(peer, lambda spec: [(period, peer) for period in spec], 2)


# --- the task ---------------------------------------------------------------------------


def initial_params(rank: int) -> dict[str, torch.Tensor]:
    """The same model on every rank (DiLoCo needs it), and the rank's sample count."""
    g = torch.Generator().manual_seed(7)
    d_in, d_hidden, d_out = SIZES
    return {
        "w1": torch.randn(d_in, d_hidden, generator=g) / d_in**0.5,
        "b1": torch.randn(d_hidden, generator=g) * 0.1,
        "w2": (torch.randn(d_hidden, d_out, generator=g) / d_hidden**0.5).double(),
        "b2": torch.zeros(d_out),
        "n": torch.tensor(rank + 1),
    }


def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    xs = torch.randn(STEPS, BATCH, SIZES[0], generator=g)
    ys = torch.randint(0, SIZES[2], (STEPS, BATCH), generator=g)
    return xs, ys


def loss_fn(fp: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ fp["w1"] + fp["b1"])
    return torch.nn.functional.cross_entropy(h @ fp["w2"].float() + fp["b2"], y)


def local_step(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    fp = {k: params[k] for k in FLOAT_KEYS}
    g = grad(loss_fn)(fp, x, y)
    out = {k: fp[k] - LR * g[k] for k in FLOAT_KEYS}
    out["n"] = params["n"]
    return out


def make_step(avg: avgfn.Averager | None) -> Callable:
    def step_fn(params, state, x, y, step):
        local = local_step(params, x, y)
        if avg is None:
            return local, state
        return avg.update(local, state, step)

    return step_fn


def train(avg, step_fn, params, state, xs, ys, steps=range(STEPS)):
    history = []
    for step in steps:
        params, state = step_fn(params, state, xs[step], ys[step], step)
        history.append({k: v.clone() for k, v in params.items()})
    return history, params, state


def eager_run(name: str, comm: Comm, rank: int = 0):
    avg = REGISTRY[name].make(comm)
    params = initial_params(rank)
    xs, ys = data(rank)
    return train(avg, make_step(avg), params, avg.init(params), xs, ys)


def simulated_run(name: str, world: int):
    def levels(spec: dict[int, int]) -> list:
        # in a world of one every level is the group of one
        return simulate.hierarchy(spec if world == WORLD else {p: world for p in spec}, world)

    comm = Comm(simulate.replica_mean(), levels, world)
    avg = REGISTRY[name].make(comm)
    stacked = simulate.stack([initial_params(r) for r in range(world)])
    xs = torch.stack([data(r)[0] for r in range(world)], dim=1)
    ys = torch.stack([data(r)[1] for r in range(world)], dim=1)
    step_fn = vmap(make_step(avg), in_dims=(0, 0, 0, 0, None))
    return train(avg, step_fn, stacked, vmap(avg.init)(stacked), xs, ys)


def _leaves(tree: Any) -> list[Any]:
    return pytree.tree_leaves(tree)


def _equal_trees(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(
        torch.equal(x, y) and x.dtype == y.dtype if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(la, lb)
    )


# --- properties -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_purity(name):
    avg = REGISTRY[name].make(_fake_comm())
    params = initial_params(1)
    xs, ys = data(1)
    state = avg.init(params)
    due = 0
    for step in range(STEPS):
        local = local_step(params, xs[step], ys[step])
        before_p = pytree.tree_map(lambda t: t.clone(), local)
        before_s = pytree.tree_map(lambda t: t.clone(), state)
        new, new_state = avg.update(local, state, step)
        assert _equal_trees(local, before_p), f"{name} changed its params input at step {step}"
        assert _equal_trees(state, before_s), f"{name} changed its state input at step {step}"
        if new_state is state:
            # nothing due: the very inputs come back
            assert new is local
        else:
            due += 1
            # leaves it changed are new tensors; never the state's own tensors
            state_ids = {id(t) for t in _leaves(new_state) if isinstance(t, torch.Tensor)}
            assert not any(id(t) in state_ids for t in _leaves(new)), name
        params, state = new, new_state
    assert due > 0, f"{name} never did anything in {STEPS} steps"


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_is_stable_and_dtypes_are_kept(name):
    avg = REGISTRY[name].make(_fake_comm())
    params = initial_params(0)
    xs, ys = data(0)
    state0 = avg.init(params)
    leaves0, spec0 = pytree.tree_flatten(state0)
    state = state0
    for step in range(STEPS):
        params, state = make_step(avg)(params, state, xs[step], ys[step], step)
        leaves, spec = pytree.tree_flatten(state)
        assert spec == spec0, f"{name}: the state changed structure at step {step}"
        for a, b in zip(leaves, leaves0):
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), (name, step)
        for key, value in initial_params(0).items():
            assert params[key].dtype == value.dtype and params[key].shape == value.shape, (name, key)
    assert torch.equal(params["n"], torch.tensor(1))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_resumes_exactly(name):
    comm = _fake_comm()
    _, final, final_state = eager_run(name, comm)
    avg = REGISTRY[name].make(comm)
    params = initial_params(0)
    xs, ys = data(0)
    step_fn = make_step(avg)
    _, params, state = train(avg, step_fn, params, avg.init(params), xs, ys, range(5))
    buffer = io.BytesIO()
    torch.save({"params": params, "avg": avgfn.state_dict(state)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = avgfn.load_state_dict(avg.init(initial_params(0)), saved["avg"])
    _, resumed, resumed_state = train(avg, step_fn, saved["params"], restored, xs, ys, range(5, STEPS))
    assert _equal_trees(resumed, final), name
    assert _equal_trees(resumed_state, final_state), name


@pytest.mark.parametrize("name", NAMES)
def test_a_group_of_one(name):
    history, _, state = eager_run(name, ALONE)
    sim_history, _, sim_state = simulated_run(name, 1)
    for step in range(STEPS):
        for key in FLOAT_KEYS:
            torch.testing.assert_close(sim_history[step][key][0], history[step][key], rtol=RTOL, atol=ATOL)
    for a, b in zip(_leaves(sim_state), _leaves(state)):
        torch.testing.assert_close(a[0], b, rtol=RTOL, atol=ATOL)
    entry = REGISTRY[name]
    if entry.only_averages:
        plain, _, _ = train(None, make_step(None), initial_params(0), None, *data(0))
        for step in range(STEPS):
            for key in FLOAT_KEYS:
                got, want = history[step][key], plain[step][key]
                if entry.exactly:
                    assert torch.equal(got, want), (name, step, key)
                else:
                    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_the_registry_covers_every_averager():
    covered = {name.split("_")[0] for name in REGISTRY}
    assert covered >= {
        "periodic", "hierarchical", "diloco", "streaming", "slowmo", "weighted", "fedavg",
        "fedavgm", "ema", "swa", "chain",
    }  # fmt: skip


# --- one gloo world ---------------------------------------------------------------------


def _diloco_oracle(rank: int) -> list[tuple[int, bool]]:
    """DiLoCo's outer step against torch.optim.SGD(nesterov) on the same averaged pseudo-gradient."""
    mean = collectives.all_reduce_mean()
    avg = diloco(4, reduce=mean)
    params = initial_params(rank)
    xs, ys = data(rank)
    state = avg.init(params)
    glob = [torch.nn.Parameter(params[k].detach().clone()) for k in FLOAT_KEYS]
    opt = torch.optim.SGD(glob, lr=0.7, momentum=0.9, nesterov=True)
    checks = []
    for step in range(STEPS):
        local = local_step(params, xs[step], ys[step])
        if (step + 1) % 4 == 0:
            pseudo = tuple(g.detach() - local[k] for g, k in zip(glob, FLOAT_KEYS))
            averaged = avgfn.average(pseudo, mean, round=avgfn.Round(nonfinite="ignore"))
            for g, a in zip(glob, averaged):
                g.grad = a
            opt.step()
        params, state = avg.update(local, state, step)
        if (step + 1) % 4 == 0:
            same = all(torch.equal(g.detach(), s) for g, s in zip(glob, state.global_params))
            same = same and all(torch.equal(g.detach(), params[k]) for g, k in zip(glob, FLOAT_KEYS))
            checks.append((step, same))
    return checks


def _world(rank: int, world_size: int) -> dict[str, Any]:
    comm = Comm(collectives.all_reduce_mean(), collectives.hierarchy)
    out: dict[str, Any] = {}
    for name in NAMES:
        avg = REGISTRY[name].make(comm)
        params = initial_params(rank)
        xs, ys = data(rank)
        history, _, state = train(avg, make_step(avg), params, avg.init(params), xs, ys)
        out[name] = {"history": history, "state": avgfn.state_dict(state)}
    out["oracle"] = _diloco_oracle(rank)
    return out


@pytest.fixture(scope="module")
def gloo_world() -> list[dict[str, Any]]:
    return run_world(_world, WORLD)


def test_diloco_outer_step_equals_torch_sgd_nesterov_on_gloo(gloo_world):
    for rank in range(WORLD):
        checks = gloo_world[rank]["oracle"]
        assert [step for step, _ in checks] == [3, 7, 11]
        assert all(same for _, same in checks), (rank, checks)


@pytest.mark.parametrize("name", NAMES)
def test_simulation_equals_the_gloo_run(name, gloo_world):
    history, _, state = simulated_run(name, WORLD)
    for step in range(STEPS):
        for key in FLOAT_KEYS:
            for rank in range(WORLD):
                torch.testing.assert_close(
                    history[step][key][rank], gloo_world[rank][name]["history"][step][key],
                    rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}, step {step}, rank {rank}, {key}: {m}",
                )  # fmt: skip
    simulated = avgfn.state_dict(state)
    for rank in range(WORLD):
        real = gloo_world[rank][name]["state"]
        assert simulated.keys() == real.keys()
        for key, value in simulated.items():
            torch.testing.assert_close(value[rank], real[key], rtol=RTOL, atol=ATOL, msg=f"{name} {key}")
    # the replicas train apart: after the first step some leaf differs between replicas
    assert any(not torch.equal(history[0][k][0], history[0][k][1]) for k in FLOAT_KEYS), name
