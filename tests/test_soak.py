"""A soak run in simulation: 10,000 steps, reloaded from a checkpoint every few hundred.

Two worlds of W=4 simulated replicas run side by side under one
``torch.func.vmap`` (``replica_mean(W)`` and ``simulate.hierarchy(..., W)``
keep every group inside its world), on the same data from the same start.
World A runs straight through. World B is checkpointed and reloaded every 200
to 400 steps: its params and averager states go through ``torch.save``,
``torch.load(weights_only=True)`` and ``avgfn.load_state_dict`` into fresh
templates, and the run goes on from the loaded objects. After 10,000 steps the
two worlds must hold the same bits.
"""

from __future__ import annotations

import io
import random

import torch
import torch.utils._pytree as pytree

import avgfn
from avgfn import simulate

W = 4
STEPS = 10_000
PERIODIC = avgfn.periodic(7, reduce=simulate.replica_mean(W), warmup_steps=5)
# Pairs every 3 steps, the whole world every 8, after 2 steps of warm-up; with
# the "exclude" policy, whose health flags add one small round per averaging.
HIERARCHICAL = avgfn.hierarchical(
    simulate.hierarchy([(3, 2), (8, W)], W), warmup_steps=2, round=avgfn.Round(nonfinite="exclude"), 
)


def _both(p_params, p_state, h_params, h_state, step):
    return PERIODIC.update(p_params, p_state, step), HIERARCHICAL.update(h_params, h_state, step)


UPDATE = torch.func.vmap(_both, in_dims=(0, 0, 0, 0, None))


def _train(params: dict, x: torch.Tensor) -> dict:
    """One local step on every replica at once (elementwise, so replicas stay independent)."""
    return {
        "w": params["w"] - 0.1 * (params["w"] - x),
        "b": params["b"] - 0.05 * (params["b"] - x.sum(dim=1).double()),
    }


def _world(tree, world: int):
    return pytree.tree_map(lambda t: t[world * W : (world + 1) * W], tree)


def _join(a, b):
    return pytree.tree_map(lambda x, y: torch.cat([x, y]), a, b)


def _reload(step: int, trees: dict) -> tuple[int, dict]:
    """Checkpoint world B of every tree and load it back into fresh objects."""
    buffer = io.BytesIO()
    torch.save(
        {
            "step": step,
            "periodic": {"params": trees["p"], "averager": avgfn.state_dict(trees["ps"])},
            "hierarchical": {"params": trees["h"], "averager": avgfn.state_dict(trees["hs"])},
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    out = {}
    for key, avg, name in (("p", PERIODIC, "periodic"), ("h", HIERARCHICAL, "hierarchical")):
        params = checkpoint[name]["params"]
        template = torch.func.vmap(avg.init)(params)
        out[key] = params
        out[key + "s"] = avgfn.load_state_dict(template, checkpoint[name]["averager"])
    return checkpoint["step"], out


def test_soak_with_reloads_ends_bit_equal_to_the_run_without():
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(W, 4, 3, generator=gen), "b": torch.zeros(W, 3, dtype=torch.float64)}
    data = torch.randn(STEPS, W, 4, 3, generator=gen)
    stacked = _join(start, start)  # worlds A and B: same start
    p, h = stacked, stacked
    ps, hs = torch.func.vmap(PERIODIC.init)(stacked), torch.func.vmap(HIERARCHICAL.init)(stacked)

    schedule = random.Random(1)
    next_reload = schedule.randint(200, 400)
    reloads = 0
    step = 0
    while step < STEPS:
        x = torch.cat([data[step], data[step]])
        (p, ps), (h, hs) = UPDATE(_train(p, x), ps, _train(h, x), hs, step)
        step += 1
        if step == next_reload:
            trees = {"p": p, "ps": ps, "h": h, "hs": hs}
            world_a = {k: _world(v, 0) for k, v in trees.items()}
            resumed_at, world_b = _reload(step, {k: _world(v, 1) for k, v in trees.items()})
            assert resumed_at == step
            p, ps, h, hs = (_join(world_a[k], world_b[k]) for k in ("p", "ps", "h", "hs"))
            reloads += 1
            next_reload += schedule.randint(200, 400)
    assert reloads >= 25

    for name, tree in (("periodic", p), ("hierarchical", h)):
        for key in ("w", "b"):
            a, b = _world(tree, 0)[key], _world(tree, 1)[key]
            assert torch.equal(a, b), (name, key)
            assert torch.isfinite(a).all()
    # The counters say the schedule ran in full, in both worlds.
    periodic_rounds = sum(1 for s in range(5, STEPS) if (s - 5) % 7 == 0)
    assert ps.rounds.tolist() == [periodic_rounds] * (2 * W)
    world = sum(1 for s in range(2, STEPS) if s % 8 == 0)
    pairs = sum(1 for s in range(2, STEPS) if s % 3 == 0 and s % 8)
    assert hs.rounds.tolist() == [[pairs, world]] * (2 * W)
    # Training moved the params, and the last step (9999: not a periodic
    # averaging step) left the replicas of a world apart.
    assert not torch.equal(p["w"][0], start["w"][0])
    assert not torch.equal(p["w"][0], p["w"][1])
