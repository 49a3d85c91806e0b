"""EMA and SWA against ``torch.optim.swa_utils`` bit for bit; under vmap; chained
after a distributed averager; bad input."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_avg_fn

import avgfn
from avgfn import simulate
from avgfn import ChainState, chain
from avgfn import EMAState, SWAState, ema, swa


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _snapshot(model):
    """The model as avgfn sees it: params and buffers in one dict (detached copies)."""
    out = {name: p.detach().clone() for name, p in model.named_parameters()}
    out.update({name: b.detach().clone() for name, b in model.named_buffers()})
    return out


def _run(avg, torch_avg, steps=12, first=3, every=1):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = torch_avg(model)
    params = _snapshot(model)
    where = {name: name in dict(model.named_parameters()) for name in params}
    avg = avg(where)
    state = avg.init(params)
    g = torch.Generator().manual_seed(4)
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()
        opt.step()
        if i >= first and (i - first) % every == 0:
            averaged.update_parameters(model)
        params = _snapshot(model)
        new, state = avg.update(params, state, i)
        assert new is params
    return averaged, state


def _assert_same(averaged, state, keys=None):
    ours = state.average
    theirs = dict(averaged.module.named_parameters())
    theirs.update(dict(averaged.module.named_buffers()))
    for name, value in theirs.items():
        if keys is None or name in keys:
            assert torch.equal(ours[name], value.detach()), name
    assert int(state.count) == int(averaged.n_averaged)


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0, 1.0])
def test_ema_equals_averaged_model_with_ema_multi_avg_fn(decay):
    averaged, state = _run(
        lambda where: ema(decay, start=3, where=where),
        lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(decay)),
    )
    _assert_same(averaged, state)  # params averaged, buffers copied (use_buffers=False)
    assert isinstance(state, EMAState)


def test_ema_with_buffers_averaged_too():
    averaged, state = _run(
        lambda where: ema(0.8),  # every float leaf, buffers included
        lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True),
        first=0,
    )
    floats = {k for k, v in state.average.items() if v.is_floating_point()}
    _assert_same(averaged, state, floats)


@pytest.mark.parametrize("every", [1, 3])
def test_swa_equals_the_default_averaged_model(every):
    averaged, state = _run(lambda where: swa(start=2, every=every, where=where), AveragedModel, first=2, every=every)
    _assert_same(averaged, state)
    averaged, state = _run(
        lambda where: swa(start=2, every=every, where=where),
        lambda m: AveragedModel(m, avg_fn=get_swa_avg_fn()),
        first=2,
        every=every,
    )
    _assert_same(averaged, state)
    assert isinstance(state, SWAState)


def test_temporal_averagers_under_vmap():
    stacked = {"w": torch.arange(6.0).view(3, 2)}
    for avg in (ema(0.7, start=1), swa(every=2)):
        state = vmap(avg.init)(stacked)
        eager = [avg.init({"w": stacked["w"][r]}) for r in range(3)]
        for step in range(6):
            params = {"w": stacked["w"] * (step + 1)}
            new, state = vmap(avg.update, in_dims=(0, 0, None))(params, state, step)
            assert new["w"] is not None
            for r in range(3):
                _, eager[r] = avg.update({"w": params["w"][r]}, eager[r], step)
        for r in range(3):
            assert torch.equal(state.average["w"][r], eager[r].average["w"])


def test_chain_feeds_the_synchronized_params_to_the_average():
    mean = simulate.replica_mean()
    chained = chain(avgfn.periodic(2, reduce=mean), ema(0.5))
    alone = avgfn.periodic(2, reduce=mean)
    shadow = ema(0.5)
    stacked = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(1))}
    c_state = vmap(chained.init)(stacked)
    p_state, e_state = vmap(alone.init)(stacked), vmap(shadow.init)(stacked)
    c_params = p_params = stacked
    update = lambda avg: vmap(avg.update, in_dims=(0, 0, None))  # noqa: E731
    for step in range(5):
        c_params, c_state = update(chained)({"w": c_params["w"] * 0.9 + step}, c_state, step)
        p_params, p_state = update(alone)({"w": p_params["w"] * 0.9 + step}, p_state, step)
        _, e_state = update(shadow)(p_params, e_state, step)
        assert torch.equal(c_params["w"], p_params["w"])
    assert isinstance(c_state, ChainState)
    assert torch.equal(c_state.states[1].average["w"], e_state.average["w"])
    assert torch.equal(c_state.states[0].rounds, p_state.rounds)


def test_chain_off_steps_are_free():
    avg = chain(avgfn.periodic(3, reduce=lambda t: t), ema(0.5, start=10))
    params = {"w": torch.ones(2)}
    state = avg.init(params)
    new, new_state = avg.update(params, state, 1)
    assert new is params and new_state is state


def test_bad_input():
    for decay in (-0.1, 1.1):
        with pytest.raises(ValueError, match="decay must be in \\[0, 1\\]"):
            ema(decay)
    with pytest.raises(TypeError, match="decay must be a real number"):
        ema(True)
    with pytest.raises(ValueError, match="every must be >= 1"):
        swa(every=0)
    with pytest.raises(ValueError, match="start must be >= 0"):
        ema(0.9, start=-1)
    with pytest.raises(TypeError, match="only floating-point and complex leaves"):
        avg = ema(0.9, where=lambda leaf: True)
        p = {"i": torch.arange(3)}
        avg.update(p, avg.init(p), 0)
    avg = swa()
    with pytest.raises(ValueError, match="state.average does not have the structure of params"):
        avg.update({"a": torch.ones(1), "b": torch.ones(1)}, avg.init({"a": torch.ones(1)}), 0)
    with pytest.raises(TypeError, match="state must be a SWAState"):
        avg.update({"a": torch.ones(1)}, ema(0.5).init({"a": torch.ones(1)}), 0)
    with pytest.raises(ValueError, match="chain needs at least one averager"):
        chain()
    with pytest.raises(TypeError, match="argument 1 must be an avgfn.Averager"):
        chain(swa(), lambda p, s, step: (p, s))


def test_nonfinite_params_never_reach_the_average():
    import pytest

    import avgfn

    good = {"w": torch.ones(2)}
    bad = {"w": torch.tensor([1.0, float("nan")])}
    for make in (lambda **kw: avgfn.ema(0.5, **kw), lambda **kw: avgfn.swa(**kw)):
        avg = make()
        _, state = avg.update(good, avg.init(good), 0)
        with pytest.raises(avgfn.NonFiniteError, match=r"at step 1: .* non-finite values at \['w'\]"):
            avg.update(bad, state, 1)
        skip = make(nonfinite="skip")
        _, s1 = skip.update(good, skip.init(good), 0)
        _, s2 = skip.update(bad, s1, 1)
        assert s2 is s1
        # under vmap a non-finite replica keeps its average and count; the others update
        stacked = {"w": torch.stack([torch.full((2,), 3.0), bad["w"]])}
        init = torch.func.vmap(avg.init)({"w": torch.ones(2, 2)})
        _, st = torch.func.vmap(avg.update, in_dims=(0, 0, None))({"w": torch.ones(2, 2)}, init, 0)
        _, st = torch.func.vmap(avg.update, in_dims=(0, 0, None))(stacked, st, 1)
        assert st.count.tolist() == [2, 1]
        assert torch.equal(st.average["w"][1], torch.ones(2))
        assert torch.isfinite(st.average["w"][0]).all() and st.average["w"][0][0].item() > 1.0
        with pytest.raises(ValueError, match="nonfinite must be one of"):
            make(nonfinite="bogus")
