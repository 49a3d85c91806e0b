"""Adam with decoupled weight decay: ``torch.optim.AdamW``, made pure."""

from __future__ import annotations

from typing import Any, Optional

import torch

from avgfn import _tree
from avgfn._base import Params
from avgfn._records import record
from avgfn.optim._base import (
    Optimizer,
    check_float,
    check_state_type,
    flatten_like,
    flatten_params,
)


@record
class AdamWState:
    """State of :func:`adamw`.

    Attributes:
      step: int64 count of the steps taken.
      exp_avg: the first-moment running average, a tree shaped like the params.
      exp_avg_sq: the second-moment running average, shaped like the params.
      max_exp_avg_sq: the running maximum of ``exp_avg_sq`` with ``amsgrad``,
        else ``None``.
    """

    step: torch.Tensor
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Optional[Any]


def _bias_corrections(
    step: torch.Tensor, lr: float, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-lr / (1 - beta1**t)`` and ``(1 - beta2**t) ** 0.5`` as float64 tensors.

    torch computes these in Python floats from ``step.item()``. Here they are
    float64 tensors (so ``update`` runs under vmap with a batched step) written
    with the very operations Python uses: ``pow`` of two doubles (not ``sqrt``:
    ``x ** 0.5`` and ``sqrt(x)`` differ in the last bit for some ``x``), and a
    true division (``lr / tensor`` would multiply by a reciprocal).
    """
    t = step.to(torch.float64)
    one = torch.ones_like(t)
    bc1 = torch.sub(one, torch.pow(torch.full_like(t, beta1), t))
    bc2 = torch.sub(one, torch.pow(torch.full_like(t, beta2), t))
    neg_step_size = torch.neg(torch.div(torch.full_like(t, lr), bc1))
    bc2_sqrt = torch.pow(bc2, torch.full_like(t, 0.5))
    return neg_step_size, bc2_sqrt


def adamw(
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> Optimizer:
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Reproduces ``torch.optim.AdamW`` (its single-tensor path, the one torch
    uses on CPU) bit for bit: the param is first scaled by
    ``1 - lr * weight_decay``, the moments are updated with ``lerp`` and
    ``addcmul``, and the param moves by ``-lr / (1 - beta1**t)`` times
    ``exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**t) + eps)``.

    Every operation is out of place, so ``update`` works under
    ``torch.func.vmap`` and ``torch.func.grad``. Bit-exactness with torch is
    tested for float32 and float64 params (half-precision params may differ
    in the last bit: torch's kernels compute those in float32).

    Args:
      lr: the learning rate, ``>= 0``.
      betas: the running-average coefficients, each in ``[0, 1)``.
      eps: added to the denominator, ``>= 0``.
      weight_decay: decoupled weight decay, ``>= 0``.
      amsgrad: use the maximum of past second moments (AMSGrad).
      maximize: ascend instead of descend.

    Returns:
      An :class:`avgfn.optim.Optimizer` whose state is an :class:`AdamWState`.

    Raises:
      ValueError: a hyperparameter out of range.
      TypeError: a hyperparameter that is not a real number, or ``betas`` not a pair.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.adamw(0.1, weight_decay=0.0)
      >>> params = {"w": torch.tensor([1.0, -1.0])}
      >>> state = opt.init(params)
      >>> params, state = opt.update({"w": torch.tensor([3.0, -0.5])}, state, params)
      >>> params["w"]                      # the first Adam step moves each weight by ~lr
      tensor([ 0.9000, -0.9000])
    """
    lr = check_float("lr", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = check_float("betas[0]", betas[0], below=1.0)
    beta2 = check_float("betas[1]", betas[1], below=1.0)
    eps = check_float("eps", eps)
    weight_decay = check_float("weight_decay", weight_decay)
    for name, flag in (("amsgrad", amsgrad), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    decay = 1 - lr * weight_decay

    def init(params: Params) -> AdamWState:
        leaves, spec = flatten_params(params, "adamw.init")
        device = leaves[0].device if leaves else torch.device("cpu")

        def zeros() -> Any:
            return _tree.tree_unflatten(
                [torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves], spec
            )

        return AdamWState(
            torch.zeros((), dtype=torch.int64, device=device),
            zeros(),
            zeros(),
            zeros() if amsgrad else None,
        )

    def update(grads: Params, state: AdamWState, params: Params) -> tuple[Params, AdamWState]:
        check_state_type(state, AdamWState, "adamw")
        p_leaves, spec = flatten_params(params, "adamw.update")
        g_leaves = flatten_like("grads", grads, spec, p_leaves, "adamw.update")
        m_leaves = flatten_like("state.exp_avg", state.exp_avg, spec, p_leaves, "adamw.update")
        v_leaves = flatten_like(
            "state.exp_avg_sq", state.exp_avg_sq, spec, p_leaves, "adamw.update"
        )
        if amsgrad != (state.max_exp_avg_sq is not None):
            raise ValueError(
                f"adamw.update: this adamw has amsgrad={amsgrad} but the state was made with "
                f"amsgrad={not amsgrad}"
            )
        vmax_leaves = (
            flatten_like("state.max_exp_avg_sq", state.max_exp_avg_sq, spec, p_leaves, "adamw.update")
            if amsgrad
            else [None] * len(p_leaves)
        )
        step = state.step + 1
        neg_step_size, bc2_sqrt = _bias_corrections(step, lr, beta1, beta2)
        # torch hands these to its kernels as Python scalars, which the kernels
        # round to the param's dtype; rounding them here keeps a 0-dim param
        # from being promoted to float64.
        scalars: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        new_p, new_m, new_v, new_vmax = [], [], [], []
        for p, g, m, v, vmax in zip(p_leaves, g_leaves, m_leaves, v_leaves, vmax_leaves):
            if p.dtype not in scalars:
                scalars[p.dtype] = (neg_step_size.to(p.dtype), bc2_sqrt.to(p.dtype))
            p_neg_step_size, p_bc2_sqrt = scalars[p.dtype]
            if maximize:
                g = torch.neg(g)
            if weight_decay != 0:
                p = torch.mul(p, decay)
            m = torch.lerp(m, g, 1 - beta1)
            v = torch.addcmul(torch.mul(v, beta2), g, g, value=1 - beta2)
            if amsgrad:
                vmax = torch.maximum(vmax, v)
                new_vmax.append(vmax)
                second = vmax
            else:
                second = v
            denom = torch.add(torch.div(torch.sqrt(second), p_bc2_sqrt), eps)
            # torch: p.addcdiv_(m, denom, value=-step_size), computed as
            # p + (value * m) / denom with value rounded to the param's dtype.
            p = torch.add(p, torch.div(torch.mul(m, p_neg_step_size), denom))
            new_p.append(p)
            new_m.append(m)
            new_v.append(v)
        unflat = _tree.tree_unflatten
        return unflat(new_p, spec), AdamWState(
            step,
            unflat(new_m, spec),
            unflat(new_v, spec),
            unflat(new_vmax, spec) if amsgrad else None,
        )

    return Optimizer(init=init, update=update)
