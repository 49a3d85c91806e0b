"""Adam with decoupled weight decay: ``torch.optim.AdamW``, made pure."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from avgfn._core.records import Record, record
from avgfn.optim._base import Optimizer
from avgfn.optim._moments import adaptive_moments
from avgfn.optim._schedules import Schedule


@record
class AdamWState(Record):
    """State of [`adamw()`][avgfn.optim.adamw].

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


def adamw(
    lr: Union[float, Schedule] = 1e-3,
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
      lr: the learning rate, ``>= 0``, or a [`Schedule`][avgfn.optim.Schedule] of the step
        count (the state's ``step`` before this update), as
        ``torch.optim.lr_scheduler`` would set it.
      betas: the running-average coefficients, each in ``[0, 1)``.
      eps: added to the denominator, ``>= 0``.
      weight_decay: decoupled weight decay, ``>= 0``.
      amsgrad: use the maximum of past second moments (AMSGrad).
      maximize: ascend instead of descend.

    Returns:
      An [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer] whose state is an [`AdamWState`][avgfn.optim.AdamWState].

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
    return adaptive_moments(
        "adamw",
        AdamWState,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled=True,
    )
