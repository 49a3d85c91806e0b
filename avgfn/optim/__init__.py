"""Functional optimizers: ``init``/``update`` records that match ``torch.optim`` bit for bit.

The small set avgfn needs to write a whole training step as a pure function
(see [`avgfn.with_averaging()`][avgfn.with_averaging]): [`sgd()`][avgfn.optim.sgd] (momentum, dampening, Nesterov,
weight decay), [`adam()`][avgfn.optim.adam] and [`adamw()`][avgfn.optim.adamw]; learning-rate schedules that
may be passed as their ``lr`` ([`linear_warmup()`][avgfn.optim.linear_warmup], [`cosine_decay()`][avgfn.optim.cosine_decay],
[`step_decay()`][avgfn.optim.step_decay], ...); and gradient clipping by global norm
([`clip_by_global_norm()`][avgfn.optim.clip_by_global_norm]). Each ``update(grads, state, params)`` returns
``(new_params, new_state)`` and works under ``torch.func.vmap``.
"""

from avgfn.optim._adam import AdamState as AdamState
from avgfn.optim._adam import adam as adam
from avgfn.optim._adamw import AdamWState as AdamWState
from avgfn.optim._adamw import adamw as adamw
from avgfn.optim._base import OptInitFn as OptInitFn
from avgfn.optim._base import Optimizer as Optimizer
from avgfn.optim._base import OptUpdateFn as OptUpdateFn
from avgfn.optim._clip import clip_by_global_norm as clip_by_global_norm
from avgfn.optim._clip import clip_grad_norm as clip_grad_norm
from avgfn.optim._schedules import Schedule as Schedule
from avgfn.optim._schedules import constant_schedule as constant_schedule
from avgfn.optim._schedules import cosine_decay as cosine_decay
from avgfn.optim._schedules import join_schedules as join_schedules
from avgfn.optim._schedules import linear_warmup as linear_warmup
from avgfn.optim._schedules import step_decay as step_decay
from avgfn.optim._sgd import SGDState as SGDState
from avgfn.optim._sgd import sgd as sgd

__all__ = [
    "AdamState",
    "AdamWState",
    "OptInitFn",
    "OptUpdateFn",
    "Optimizer",
    "SGDState",
    "Schedule",
    "adam",
    "adamw",
    "clip_by_global_norm",
    "clip_grad_norm",
    "constant_schedule",
    "cosine_decay",
    "join_schedules",
    "linear_warmup",
    "sgd",
    "step_decay",
]
