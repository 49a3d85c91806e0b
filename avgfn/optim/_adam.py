"""Adam with an L2 penalty: ``torch.optim.Adam``, made pure."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from avgfn._core.records import Record, record
from avgfn.optim._base import Optimizer
from avgfn.optim._moments import adaptive_moments
from avgfn.optim._schedules import Schedule


@record
class AdamState(Record):
    """State of [`adam()`][avgfn.optim.adam].

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


def adam(
    lr: Union[float, Schedule] = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> Optimizer:
    """Adam (Kingma & Ba), with weight decay as an L2 penalty on the gradient.

    Reproduces ``torch.optim.Adam`` (its single-tensor path, the one torch
    uses on CPU) bit for bit: ``weight_decay * param`` is added to the
    gradient, then the moments and the param are updated as in [`adamw()`][avgfn.optim.adamw].
    The decay therefore passes through the moments and is scaled by the
    adaptive step, unlike [`adamw()`][avgfn.optim.adamw]'s decoupled decay.

    Every operation is out of place, so ``update`` works under
    ``torch.func.vmap`` and ``torch.func.grad``.

    Args:
      lr: the learning rate, ``>= 0``, or a [`Schedule`][avgfn.optim.Schedule] of the step
        count (the state's ``step`` before this update).
      betas: the running-average coefficients, each in ``[0, 1)``.
      eps: added to the denominator, ``>= 0``.
      weight_decay: the L2 penalty added to the gradient, ``>= 0``.
      amsgrad: use the maximum of past second moments (AMSGrad).
      maximize: ascend instead of descend.

    Returns:
      An [`avgfn.optim.Optimizer`][avgfn.optim.Optimizer] whose state is an [`AdamState`][avgfn.optim.AdamState].

    Raises:
      ValueError: a hyperparameter out of range.
      TypeError: a hyperparameter that is not a real number, or ``betas`` not a pair.

    Examples:
      >>> import torch, avgfn
      >>> opt = avgfn.optim.adam(0.1, weight_decay=0.5)
      >>> params = {"w": torch.tensor([1.0, -1.0])}
      >>> state = opt.init(params)
      >>> params, state = opt.update({"w": torch.tensor([-0.2, 0.0])}, state, params)
      >>> params["w"]                      # the decay turned the first gradient's sign
      tensor([ 0.9000, -0.9000])
    """
    return adaptive_moments(
        "adam",
        AdamState,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled=False,
    )
