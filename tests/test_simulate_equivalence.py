"""The contract of avgfn.simulate: one process under vmap == W real gloo processes.

One training task (a small MLP, its own init and data on every rank, SGD with
gradients from ``torch.func.grad``) runs (a) on 4 real gloo processes with
``avgfn.collectives`` and (b) in this process on 4 replicas under
``torch.func.vmap`` with ``avgfn.simulate``, for periodic and hierarchical
averaging. The params must agree at every step, up to the rounding of a
different summation order (gloo's ring against a sum in replica order, bmm
against mm).
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

import avgfn
from _dist import run_world
from avgfn import simulate

WORLD = 4
STEPS = 30
BATCH = 8
SIZES = (6, 16, 3)
LR = 0.2
# periodic: averaging at 2, 5, 8, ...; hierarchical: pairs at even steps >= 1,
# everyone at multiples of 6.
PERIODIC = {"period": 3, "warmup_steps": 2}
HIERARCHY = {2: 2, 6: 4}
# Float32 rounding of a different summation order, grown over 30 steps (measured:
# at most 1.2e-7 here, on params of size ~1); a wrong group or a missed averaging
# moves params by ~1e-2 and more.
RTOL, ATOL = 2e-6, 1e-6


def task(rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s initial params and its data for every step: (params, xs, ys)."""
    g = torch.Generator().manual_seed(1000 + rank)
    d_in, d_hidden, d_out = SIZES
    params = {
        "w1": torch.randn(d_in, d_hidden, generator=g) / d_in**0.5,
        "b1": torch.randn(d_hidden, generator=g) * 0.1,
        "w2": torch.randn(d_hidden, d_out, generator=g) / d_hidden**0.5,
        "b2": torch.zeros(d_out),
    }
    xs = torch.randn(STEPS, BATCH, d_in, generator=g)
    ys = torch.randint(0, d_out, (STEPS, BATCH), generator=g)
    return params, xs, ys


def loss_fn(params, x, y):
    h = torch.tanh(x @ params["w1"] + params["b1"])
    return torch.nn.functional.cross_entropy(h @ params["w2"] + params["b2"], y)


def make_step(avg):
    def step_fn(params, state, x, y, step):
        g = grad(loss_fn)(params, x, y)
        local = {k: p - LR * g[k] for k, p in params.items()}
        return avg.update(local, state, step)

    return step_fn


def _train(step_fn, params, state, xs, ys):
    history = []
    for step in range(STEPS):
        params, state = step_fn(params, state, xs[step], ys[step], step)
        history.append({k: v.clone() for k, v in params.items()})
    return history, state


def _world(rank, world_size):
    """Both runs in one 4-process world; returns each run's per-step params."""
    params, xs, ys = task(rank)
    runs = {
        "periodic": avgfn.periodic(reduce=avgfn.collectives.all_reduce_mean(), **PERIODIC),
        "hierarchical": avgfn.hierarchical(avgfn.collectives.hierarchy(HIERARCHY)),
    }
    out = {}
    for name, avg in runs.items():
        history, state = _train(make_step(avg), params, avg.init(params), xs, ys)
        out[name] = {"history": history, "rounds": state.rounds}
    return out


def _simulated():
    tasks = [task(r) for r in range(WORLD)]
    stacked = simulate.stack([t[0] for t in tasks])
    xs = torch.stack([t[1] for t in tasks], dim=1)  # (STEPS, W, BATCH, d_in)
    ys = torch.stack([t[2] for t in tasks], dim=1)
    runs = {
        "periodic": avgfn.periodic(reduce=simulate.replica_mean(), **PERIODIC),
        "hierarchical": avgfn.hierarchical(simulate.hierarchy(HIERARCHY, WORLD)),
    }
    out = {}
    for name, avg in runs.items():
        step_fn = vmap(make_step(avg), in_dims=(0, 0, 0, 0, None))
        history, state = _train(step_fn, stacked, vmap(avg.init)(stacked), xs, ys)
        out[name] = {"history": history, "rounds": state.rounds}
    return out


def _group_at(name: str, step: int) -> int:
    if name == "periodic":
        due = step >= 2 and (step - 2) % 3 == 0
        return WORLD if due else 0
    return WORLD if step % 6 == 0 else 2 if step % 2 == 0 else 0


def test_simulation_matches_a_real_gloo_world():
    real = run_world(_world, WORLD)
    sim = _simulated()
    worst = 0.0
    for name in ("periodic", "hierarchical"):
        for step in range(STEPS):
            group = _group_at(name, step)
            simulated = sim[name]["history"][step]
            for key, value in simulated.items():
                for rank in range(WORLD):
                    got, want = value[rank], real[rank][name]["history"][step][key]
                    torch.testing.assert_close(
                        got, want, rtol=RTOL, atol=ATOL,
                        msg=lambda m: f"{name}, step {step}, rank {rank}, {key}: {m}",
                    )  # fmt: skip
                    worst = max(worst, float((got - want).abs().max()))
                if group:
                    # the members of a group hold bitwise the same params, in both runs
                    for start in range(0, WORLD, group):
                        members = range(start, start + group)
                        assert all(torch.equal(value[start], value[r]) for r in members)
                        ref = real[start][name]["history"][step][key]
                        assert all(torch.equal(ref, real[r][name]["history"][step][key]) for r in members)
                else:
                    # between averagings every rank trains on its own data: they differ
                    assert not torch.equal(value[0], value[1]), (name, step, key)
        for rank in range(WORLD):
            assert torch.equal(sim[name]["rounds"][rank], real[rank][name]["rounds"])
    assert sim["periodic"]["rounds"].tolist() == [10] * WORLD
    assert sim["hierarchical"]["rounds"].tolist() == [[10, 5]] * WORLD
    print(f"largest difference from the gloo world: {worst:.3g}")
