"""avgfn: model averaging for PyTorch as pure functions.

Local SGD and its family (periodic, hierarchical, post-local SGD...) as
``(params, state, step) -> (params, state)`` functions over immutable state,
with the collective injected as a function.
"""

from avgfn import collectives as collectives
from avgfn import optim as optim
from avgfn import simulate as simulate
from avgfn import testing as testing
from avgfn._average import average as average
from avgfn._averaging_optimizer import AveragingOptimizer as AveragingOptimizer
from avgfn._base import Averager as Averager
from avgfn._base import InitFn as InitFn
from avgfn._base import Params as Params
from avgfn._base import Reduce as Reduce
from avgfn._base import UpdateFn as UpdateFn
from avgfn._checkpoint import load_state_dict as load_state_dict
from avgfn._compose import AveragingState as AveragingState
from avgfn._compose import AveragingUpdate as AveragingUpdate
from avgfn._compose import with_averaging as with_averaging
from avgfn._checkpoint import state_dict as state_dict
from avgfn._errors import AveragingError as AveragingError
from avgfn._errors import NonFiniteError as NonFiniteError
from avgfn._errors import PeerError as PeerError
from avgfn._errors import ReplicaMismatchError as ReplicaMismatchError
from avgfn._hierarchical import HierarchicalState as HierarchicalState
from avgfn._hierarchical import hierarchical as hierarchical
from avgfn._module import ModuleAverager as ModuleAverager
from avgfn._periodic import PeriodicState as PeriodicState
from avgfn._periodic import periodic as periodic
from avgfn._post_local import GradientSchedule as GradientSchedule
from avgfn._post_local import GradientScheduleState as GradientScheduleState
from avgfn._post_local import PostLocalSGD as PostLocalSGD
from avgfn._post_local import post_local_gradients as post_local_gradients
from avgfn._post_local import post_local_sgd as post_local_sgd

__version__ = "0.1.0"

__all__ = [
    "Averager",
    "AveragingError",
    "AveragingOptimizer",
    "AveragingState",
    "AveragingUpdate",
    "GradientSchedule",
    "GradientScheduleState",
    "ModuleAverager",
    "PostLocalSGD",
    "NonFiniteError",
    "PeerError",
    "ReplicaMismatchError",
    "HierarchicalState",
    "InitFn",
    "Params",
    "PeriodicState",
    "Reduce",
    "UpdateFn",
    "average",
    "collectives",
    "hierarchical",
    "load_state_dict",
    "optim",
    "periodic",
    "post_local_gradients",
    "post_local_sgd",
    "simulate",
    "state_dict",
    "testing",
    "with_averaging",
]
