"""The core averagers under torch.func.vmap and torch.compile."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

import avgfn


def _reduce(t):
    return t * 0.5 + 1.0


def _params():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float64), "i": torch.arange(2)}


def test_vmap_init_and_update():
    avg = avgfn.hierarchical([(2, _reduce), (4, _reduce)], warmup_steps=1)
    stacked = {k: torch.stack([v, v + 1]) for k, v in _params().items()}
    state = torch.func.vmap(avg.init)(stacked)
    assert state.rounds.shape == (2, 2)
    for step in range(6):
        stacked, state = torch.func.vmap(avg.update, in_dims=(0, 0, None))(stacked, state, step)
    assert state.rounds.tolist() == [[1, 1], [1, 1]]  # step 2: level 0; step 4: level 1
    # each replica got exactly what the unbatched update gives it
    single = _params()
    s = avg.init(single)
    for step in range(6):
        single, s = avg.update(single, s, step)
    for k in single:
        assert torch.equal(stacked[k][0], single[k])


def test_compile_update_fullgraph():
    avg = avgfn.periodic(2, reduce=_reduce, warmup_steps=1)
    params = _params()
    state = avg.init(params)
    compiled = torch.compile(avg.update, fullgraph=True, backend="eager")
    eager_p, eager_s = params, state
    comp_p, comp_s = params, state
    for step in range(5):
        eager_p, eager_s = avg.update(eager_p, eager_s, step)
        comp_p, comp_s = compiled(comp_p, comp_s, step)
        assert type(comp_s) is avgfn.PeriodicState
        for a, b in zip(pytree.tree_leaves(eager_p), pytree.tree_leaves(comp_p)):
            assert torch.equal(a, b)
    assert int(comp_s.rounds) == int(eager_s.rounds) == 2


def test_compile_hierarchical_with_inductor():
    avg = avgfn.hierarchical([(1, _reduce), (3, _reduce)])
    params = _params()
    state = avg.init(params)
    compiled = torch.compile(avg.update, fullgraph=True)
    p, s = compiled(params, state, 3)
    ref_p, ref_s = avg.update(params, state, 3)
    assert torch.equal(p["w"], ref_p["w"]) and s.rounds.tolist() == ref_s.rounds.tolist() == [0, 1]
