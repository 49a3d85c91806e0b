"""Simulated replicas in one process: W workers stacked under ``torch.func.vmap``.

The averager object that runs on a real world runs unchanged on W replicas
held as one pytree with a leading replica dimension::

    stacked = simulate.stack(models)                      # or a list of params
    avg = avgfn.periodic(4, reduce=simulate.replica_mean())
    state = torch.func.vmap(avg.init)(stacked)
    step_all = torch.func.vmap(step_fn, in_dims=(0, 0, 0, None))
    for step in range(num_steps):
        stacked, state = step_all(stacked, state, batch, step)

where ``step_fn(params, state, batch, step)`` is the per-replica training step
that ends in ``avg.update(params, state, step)``. A fixed training task gives
the same params at every step as W real gloo processes using
[`avgfn.collectives`][avgfn.collectives], up to the rounding of the summation order.
"""

from avgfn.simulate._replica_mean import ReplicaMean as ReplicaMean
from avgfn.simulate._replica_mean import hierarchy as hierarchy
from avgfn.simulate._replica_mean import replica_mean as replica_mean
from avgfn.simulate._stacking import shard as shard
from avgfn.simulate._stacking import stack as stack
from avgfn.simulate._stacking import unstack as unstack

__all__ = ["ReplicaMean", "hierarchy", "replica_mean", "shard", "stack", "unstack"]
