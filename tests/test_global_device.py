"""DiLoCo's global copy and outer state kept on another device than the params (``global_device``)."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import avgfn
from avgfn import optim
from avgfn.testing import peers_mean


def _run(device: str, global_device, outer=None):
    peer = peers_mean(lambda t: t * 0.5)  # one peer whose pseudo-gradient is half of ours
    avg = avgfn.diloco(2, reduce=peer, outer_optimizer=outer, global_device=global_device)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g).to(device), "b": torch.randn(3, generator=g).half().to(device)}
    state = avg.init(params)
    history = []
    for step in range(6):
        params = {k: v - 0.1 * torch.ones_like(v) * (step + 1) for k, v in params.items()}
        params, state = avg.update(params, state, step)
        history.append(params)
    return history, state


@pytest.mark.parametrize("outer", [None, optim.adamw(0.05)], ids=["nesterov", "adamw"])
def test_a_cpu_global_copy_gives_the_same_run(outer):
    want, want_state = _run("cpu", None, outer)
    got, state = _run("cpu", "cpu", outer)
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert all(t.device.type == "cpu" for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor))
    assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(state), pytree.tree_leaves(want_state)))


def test_global_device_must_name_a_device():
    with pytest.raises(TypeError, match="global_device must be None .* got 'nowhere'"):
        avgfn.diloco(2, reduce=lambda t: t, global_device="nowhere")
    with pytest.raises(TypeError, match="global_device"):
        avgfn.diloco(2, reduce=lambda t: t, global_device=3.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_params_with_a_pinned_cpu_global_copy():
    want, _ = _run("cuda", None)
    got, state = _run("cuda", "cpu")
    for a, b in zip(got, want):
        for k in b:
            assert a[k].device.type == "cuda" and a[k].dtype == b[k].dtype
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    assert all(g.device.type == "cpu" and g.is_pinned() for g in state.global_params)
    outer = [t for t in pytree.tree_leaves(state.outer) if isinstance(t, torch.Tensor) and t.dim() > 0]
    assert outer and all(t.device.type == "cpu" for t in outer)
