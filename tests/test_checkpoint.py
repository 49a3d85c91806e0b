"""Checkpoints: flat dicts through torch.save / torch.load(weights_only=True)."""

from __future__ import annotations

import io
import re

import pytest
import torch

import avgfn
from avgfn.testing import peers_mean


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _averagers():
    reduce = peers_mean(lambda t: t * 3)
    return {
        "periodic": avgfn.periodic(3, reduce=reduce, warmup_steps=2),
        "hierarchical": avgfn.hierarchical([(2, reduce), (5, reduce)], warmup_steps=1),
    }


@pytest.mark.parametrize("name", ["periodic", "hierarchical"])
def test_round_trip_and_exact_resume(name):
    avg = _averagers()[name]
    params = {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.float64)}

    def run(params, state, start, stop):
        for step in range(start, stop):
            params = {k: v * 0.9 + 0.1 for k, v in params.items()}  # a "training step"
            params, state = avg.update(params, state, step)
        return params, state

    full_p, full_s = run(params, avg.init(params), 0, 23)
    mid_p, mid_s = run(params, avg.init(params), 0, 11)
    sd = _roundtrip(avgfn.state_dict(mid_s))
    params_sd = _roundtrip(mid_p)
    resumed_s = avgfn.load_state_dict(avg.init(params), sd)
    assert type(resumed_s) is type(mid_s)
    res_p, res_s = run(params_sd, resumed_s, 11, 23)
    for k in full_p:
        assert torch.equal(full_p[k], res_p[k])
    assert torch.equal(full_s.rounds, res_s.rounds)


def test_keys_are_pytree_paths():
    avg = _averagers()["hierarchical"]
    assert list(avgfn.state_dict(avg.init({"w": torch.zeros(1)}))) == [".rounds"]
    nested = {"inner": [avg.init({"w": torch.zeros(1)}), 2.5]}
    assert avgfn.state_dict(nested) == {"['inner'][0].rounds": nested["inner"][0].rounds, "['inner'][1]": 2.5}


def test_strict_loading():
    avg = _averagers()["periodic"]
    template = avg.init({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys \['.rounds'\], unknown keys \[\]"):
        avgfn.load_state_dict(template, {})
    with pytest.raises(ValueError, match=r"unknown keys \['.extra'\]"):
        avgfn.load_state_dict(template, {".rounds": torch.tensor(1), ".extra": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"'.rounds' must be a torch.int64 tensor of shape \(\)"):
        avgfn.load_state_dict(template, {".rounds": torch.tensor([1, 2])})
    with pytest.raises(TypeError, match="'.rounds' must be a tensor, got int"):
        avgfn.load_state_dict(template, {".rounds": 3})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        avgfn.load_state_dict(template, [1])


def test_checkpoint_from_another_algorithm_is_refused():
    p, h = _averagers()["periodic"], _averagers()["hierarchical"]
    sd = avgfn.state_dict(h.init({"w": torch.zeros(1)}))  # rounds has shape (2,)
    with pytest.raises(ValueError, match="shape"):
        avgfn.load_state_dict(p.init({"w": torch.zeros(1)}), sd)


def test_scalar_leaves_are_type_checked():
    template = {"lr": 0.5, "n": 3}
    assert avgfn.load_state_dict(template, {"['lr']": 0.25, "['n']": 4}) == {"lr": 0.25, "n": 4}
    with pytest.raises(TypeError, match=re.escape('"[\'n\']" must be int, got float 4.0')):
        avgfn.load_state_dict(template, {"['lr']": 0.25, "['n']": 4.0})


def test_state_dict_rejects_unsaveable_leaves():
    with pytest.raises(TypeError, match="not a tensor or a Python scalar"):
        avgfn.state_dict({"f": object()})
