"""The loop every optimizer oracle runs: torch.optim and an avgfn optimizer, side by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch


def run_against_torch(
    make_torch: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    ours: Any,
    init: dict[str, torch.Tensor],
    grads_of: Callable[[int], dict[str, torch.Tensor]],
    steps: int,
    *,
    before_step: Optional[Callable[[list[torch.nn.Parameter]], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> Any:
    """Step both from ``init`` on the same grads; assert equal bits (and untouched grads) each step.

    ``before_step(torch_params)`` runs between setting torch's grads and its
    step (a clip), ``after_step()`` after torch's step (a scheduler).
    """
    torch_params = [torch.nn.Parameter(v.clone()) for v in init.values()]
    torch_opt = make_torch(torch_params)
    params = {k: v.clone() for k, v in init.items()}
    state = ours.init(params)
    for step in range(steps):
        grads = grads_of(step)
        before = {k: v.clone() for k, v in grads.items()}
        for p, grad in zip(torch_params, grads.values()):
            p.grad = grad.clone()
        if before_step is not None:
            before_step(torch_params)
        torch_opt.step()
        if after_step is not None:
            after_step()
        params, state = ours.update(grads, state, params)
        assert all(torch.equal(grads[k], before[k]) for k in grads), "grads were modified"
        for (name, value), p in zip(params.items(), torch_params):
            assert torch.equal(value, p.detach()), (
                f"step {step}, leaf {name}: max |diff| {(value - p.detach()).abs().max().item():.3g}"
            )
    return state
