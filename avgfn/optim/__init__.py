"""Functional optimizers: ``init``/``update`` records that match ``torch.optim`` bit for bit.

The small set avgfn needs to write a whole training step as a pure function
(see :func:`avgfn.with_averaging`): :func:`sgd` (momentum, dampening, Nesterov,
weight decay) and :func:`adamw`. Each ``update(grads, state, params)`` returns
``(new_params, new_state)`` and works under ``torch.func.vmap``.
"""

from avgfn.optim._adamw import AdamWState as AdamWState
from avgfn.optim._adamw import adamw as adamw
from avgfn.optim._base import OptInitFn as OptInitFn
from avgfn.optim._base import Optimizer as Optimizer
from avgfn.optim._base import OptUpdateFn as OptUpdateFn
from avgfn.optim._sgd import SGDState as SGDState
from avgfn.optim._sgd import sgd as sgd

__all__ = [
    "AdamWState",
    "OptInitFn",
    "OptUpdateFn",
    "Optimizer",
    "SGDState",
    "adamw",
    "sgd",
]
