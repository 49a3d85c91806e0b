"""Adam's running moments, shared by [`adam()`][avgfn.optim.adam] and [`adamw()`][avgfn.optim.adamw].

torch implements both with one function (``torch.optim.AdamW`` is ``Adam`` with
``decoupled_weight_decay=True``); so does this module. The two differ only in
where the weight decay goes: added to the gradient (Adam's L2 penalty), or
applied to the param before the step (AdamW's decoupled decay).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from avgfn._core import tree as _tree
from avgfn._core.traced import zeros_like_batch
from avgfn._core.types import Params
from avgfn.optim._base import (
    Optimizer,
    check_float,
    check_state_type,
    flatten_like,
    flatten_params,
    settings_of,
)
from avgfn.optim._schedules import Schedule, check_lr, lr_at


def _bias_corrections(
    step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float
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
    neg_step_size = torch.neg(torch.div(lr, bc1))
    bc2_sqrt = torch.pow(bc2, torch.full_like(t, 0.5))
    return neg_step_size, bc2_sqrt


class _MomentOptions(NamedTuple):
    """The validated options of `adaptive_moments()`, less ``lr``."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool


def _check_moment_options(
    lr: Union[float, Schedule],
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> tuple[Union[float, Schedule], _MomentOptions]:
    """Validate `adaptive_moments()`' options, returning ``lr`` and the rest."""
    lr = check_lr(lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = check_float("betas[0]", betas[0], below=1.0)
    beta2 = check_float("betas[1]", betas[1], below=1.0)
    eps = check_float("eps", eps)
    weight_decay = check_float("weight_decay", weight_decay)
    for name, flag in (("amsgrad", amsgrad), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    return lr, _MomentOptions(beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled)


def _zero_state(
    state_cls: Callable[..., Any], params: Params, init_who: str, amsgrad: bool
) -> Any:
    """A ``state_cls`` at step 0 with zero moments shaped like ``params``."""
    leaves, spec = flatten_params(params, init_who)

    def zeros() -> Any:
        return _tree.tree_unflatten(
            [torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves], spec
        )

    return state_cls(
        zeros_like_batch(leaves),  # batched under vmap: vmap(init) gives update's strides
        zeros(),
        zeros(),
        zeros() if amsgrad else None,
    )


def _moment_leaves(
    who: str, amsgrad: bool, state: Any, spec: Any, p_leaves: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], Sequence[Optional[torch.Tensor]]]:
    """The leaves of ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``.

    Those of ``max_exp_avg_sq`` are ``None`` without amsgrad.
    """
    update_who = f"{who}.update"
    m_leaves = flatten_like("state.exp_avg", state.exp_avg, spec, p_leaves, update_who)
    v_leaves = flatten_like("state.exp_avg_sq", state.exp_avg_sq, spec, p_leaves, update_who)
    if amsgrad != (state.max_exp_avg_sq is not None):
        raise ValueError(
            f"{update_who}: this {who} has amsgrad={amsgrad} but the state was made with "
            f"amsgrad={not amsgrad}"
        )
    vmax_leaves = (
        flatten_like("state.max_exp_avg_sq", state.max_exp_avg_sq, spec, p_leaves, update_who)
        if amsgrad
        else [None] * len(p_leaves)
    )
    return m_leaves, v_leaves, vmax_leaves


def _adam_leaf(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    vmax: Optional[torch.Tensor],
    scalars: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    opts: _MomentOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One leaf's new param, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``.

    ``scalars`` are ``-step_size``, ``sqrt(bias_correction2)`` and the decoupled
    decay factor, each rounded to the param's dtype.
    """
    p_neg_step_size, p_bc2_sqrt, p_decay = scalars
    if opts.maximize:
        g = torch.neg(g)
    if opts.weight_decay != 0:
        if opts.decoupled:
            p = torch.mul(p, p_decay)
        else:
            g = torch.add(g, p, alpha=opts.weight_decay)
    m = torch.lerp(m, g, 1 - opts.beta1)
    v = torch.addcmul(torch.mul(v, opts.beta2), g, g, value=1 - opts.beta2)
    if opts.amsgrad:
        assert vmax is not None  # the state has max_exp_avg_sq exactly when amsgrad
        vmax = torch.maximum(vmax, v)
        second = vmax
    else:
        second = v
    denom = torch.add(torch.div(torch.sqrt(second), p_bc2_sqrt), opts.eps)
    # torch: p.addcdiv_(m, denom, value=-step_size), computed as
    # p + (value * m) / denom with value rounded to the param's dtype.
    p = torch.add(p, torch.div(torch.mul(m, p_neg_step_size), denom))
    return p, m, v, vmax


def adaptive_moments(
    who: str,
    state_cls: type[Any],
    *,
    lr: Union[float, Schedule],
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> Optimizer:
    """The Adam update of ``torch.optim.Adam``'s single-tensor path, made pure.

    Args:
      who: the factory's name, for error messages (``"adam"``, ``"adamw"``).
      state_cls: the state record, with fields ``step``, ``exp_avg``,
        ``exp_avg_sq`` and ``max_exp_avg_sq``.
      lr: the learning rate, or a schedule of the step count.
      betas: the running-average coefficients, each in ``[0, 1)``.
      eps: added to the denominator, ``>= 0``.
      weight_decay: the weight decay, ``>= 0``.
      amsgrad: use the maximum of past second moments (AMSGrad).
      maximize: ascend instead of descend.
      decoupled: scale the param by ``1 - lr * weight_decay`` (AdamW) instead
        of adding ``weight_decay * param`` to the gradient (Adam).

    Returns:
      An [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer] whose state is a ``state_cls``.
    """
    lr, opts = _check_moment_options(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled)
    init_who, update_who = f"{who}.init", f"{who}.update"

    def init(params: Params) -> Any:
        return _zero_state(state_cls, params, init_who, amsgrad)

    def update(grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        check_state_type(state, state_cls, who)
        p_leaves, spec = flatten_params(params, update_who)
        g_leaves = flatten_like("grads", grads, spec, p_leaves, update_who)
        m_leaves, v_leaves, vmax_leaves = _moment_leaves(who, amsgrad, state, spec, p_leaves)
        lr_now = lr_at(lr, state.step)
        step = state.step + 1
        neg_step_size, bc2_sqrt = _bias_corrections(step, lr_now, opts.beta1, opts.beta2)
        # torch: param.mul_(1 - lr * weight_decay), the factor a Python float.
        decay = torch.sub(torch.ones_like(lr_now), torch.mul(lr_now, opts.weight_decay))
        # torch hands these to its kernels as Python scalars, which the kernels
        # round to the param's dtype; rounding them here keeps a 0-dim param
        # from being promoted to float64.
        scalars: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        new_p, new_m, new_v, new_vmax = [], [], [], []
        for p, g, m, v, vmax in zip(p_leaves, g_leaves, m_leaves, v_leaves, vmax_leaves):
            if p.dtype not in scalars:
                scalars[p.dtype] = (
                    neg_step_size.to(p.dtype),
                    bc2_sqrt.to(p.dtype),
                    decay.to(p.dtype),
                )
            p, m, v, vmax = _adam_leaf(p, g, m, v, vmax, scalars[p.dtype], opts)
            new_p.append(p)
            new_m.append(m)
            new_v.append(v)
            new_vmax.append(vmax)
        unflat = _tree.tree_unflatten
        return unflat(new_p, spec), state_cls(
            step,
            unflat(new_m, spec),
            unflat(new_v, spec),
            unflat(new_vmax, spec) if amsgrad else None,
        )

    settings = settings_of(
        who, lr, betas=(opts.beta1, opts.beta2), eps=opts.eps, weight_decay=opts.weight_decay,
        amsgrad=opts.amsgrad, maximize=opts.maximize,
    )  # fmt: skip
    return Optimizer(init=init, update=update, settings=settings)
