"""The DiLoCo family's global copy and outer state kept on another device than the params (``global_device``).

Without a GPU the copy is asked for on the CPU next to CPU params: the runs
must be the same and every tensor of the state must be where it was asked
for. With CUDA present, the params live on the GPU and the copy on the CPU.
"""

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


FAMILY = {
    "streaming": lambda reduce, device: avgfn.streaming_diloco(
        4, reduce=reduce, num_fragments=2, delay=1, alpha=0.5, global_device=device
    ),
    "streaming_no_delay": lambda reduce, device: avgfn.streaming_diloco(
        4, reduce=reduce, num_fragments=2, global_device=device
    ),
    "slowmo": lambda reduce, device: avgfn.slowmo(
        3, reduce=reduce, lr=0.1, momentum=0.5, base_period=2, global_device=device
    ),
    "fedavgm": lambda reduce, device: avgfn.fedavgm(
        2, reduce=reduce, weight=3.0, server_lr=0.9, server_momentum=0.5, global_device=device
    ),
    "overlapped_eager": lambda reduce, device: avgfn.overlapped_diloco(
        2, reduce=reduce, num_replicas=2, global_device=device
    ),
    "overlapped_delayed": lambda reduce, device: avgfn.overlapped_diloco(
        2, reduce=reduce, eager=False, global_device=device
    ),
}


def _run_family(name: str, device: str, global_device, steps: int = 9):
    avg = FAMILY[name](peers_mean(lambda t: t * 0.5), global_device)
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 3, generator=g).to(device), "b": torch.randn(3, generator=g).half().to(device)}
    state = avg.init(params)
    history = []
    for step in range(steps):
        params = {k: v - 0.1 * torch.ones_like(v) * (step + 1) for k, v in params.items()}
        params, state = avg.update(params, state, step)
        history.append(params)
    return history, state


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_outer_step_averager_takes_a_global_device(name):
    want, want_state = _run_family(name, "cpu", None)
    got, state = _run_family(name, "cpu", torch.device("cpu"))
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert all(g.device.type == "cpu" for g in state.global_params)
    assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(state), pytree.tree_leaves(want_state)))


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_family_refuses_a_global_device_that_names_no_device(name):
    with pytest.raises(TypeError, match="global_device must be None .* got 'nowhere'"):
        FAMILY[name](lambda t: t, "nowhere")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_cuda_params_with_a_cpu_global_copy_for_the_family(name):
    want, _ = _run_family(name, "cuda", None)
    got, state = _run_family(name, "cuda", "cpu")
    for a, b in zip(got, want):
        for k in b:
            assert a[k].device.type == "cuda" and a[k].dtype == b[k].dtype
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    assert all(g.device.type == "cpu" and g.is_pinned() for g in state.global_params)
    pending = getattr(state, "pending", None)  # what is in flight stays where the params are
    for t in pytree.tree_leaves(pending):
        assert t.device.type == "cuda"


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
