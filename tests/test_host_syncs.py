"""No host synchronisation on an off-step, and none per leaf in a round.

On an accelerator, reading a tensor's value on the host (``.item()``,
``bool(t)``, ``float(t)``, ``.tolist()``...) waits for the device. Every
averager of the conformance registry runs here on CPU with those reads
counted: an off-step (``update`` returns its inputs) makes none, and a round
makes as many with 30 extra leaves as without them (a fixed number per
round, never one per leaf).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import test_conformance as tc

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counted_reads():
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            counts["n"] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _params(extra: int) -> dict[str, torch.Tensor]:
    params = tc.initial_params(0)
    g = torch.Generator().manual_seed(1)
    for k in range(extra):
        params[f"x{k}"] = torch.randn(3, generator=g)
    return params


def _reads(name: str, extra: int) -> list[tuple[bool, int]]:
    """Per step: whether it was an off-step, and how many host reads ``update`` made."""
    avg = tc.REGISTRY[name].make(tc._fake_comm())  # one peer whose buffers are half of ours
    params = _params(extra)
    state = avg.init(params)
    out = []
    for step in range(tc.STEPS):
        local = {k: (v - 0.01 * (step + 1) if v.is_floating_point() else v) for k, v in params.items()}
        with counted_reads() as counts:
            new, new_state = avg.update(local, state, step)
        out.append((new_state is state and new is local, counts["n"]))
        params, state = new, new_state
    return out


@pytest.mark.parametrize("name", tc.NAMES)
def test_no_host_read_on_an_off_step_and_none_per_leaf(name):
    small, large = _reads(name, 0), _reads(name, 30)
    for step, ((off, n_small), (off_large, n_large)) in enumerate(zip(small, large)):
        assert off == off_large, (name, step)
        if off:
            assert n_small == 0 and n_large == 0, (name, step, n_small, n_large)
        else:
            assert n_large == n_small, f"{name}, step {step}: {n_small} host reads with 5 leaves, {n_large} with 35"
    # the count is live: a round reads a few flags (the health check's verdict...)
    assert sum(n for off, n in small if not off) > 0, name


def test_the_counter_sees_reads():
    with counted_reads() as counts:
        bool(torch.tensor(True))
        torch.tensor(1.0).item()
    assert counts["n"] == 2
