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
from avgfn._chain import ChainState as ChainState
from avgfn._chain import chain as chain
from avgfn._checkpoint import load_state_dict as load_state_dict
from avgfn._compose import AveragingState as AveragingState
from avgfn._compose import AveragingUpdate as AveragingUpdate
from avgfn._compose import with_averaging as with_averaging
from avgfn._checkpoint import state_dict as state_dict
from avgfn._diloco import DiLoCoState as DiLoCoState
from avgfn._diloco import diloco as diloco
from avgfn._errors import AveragingError as AveragingError
from avgfn._errors import NonFiniteError as NonFiniteError
from avgfn._errors import PeerError as PeerError
from avgfn._errors import ReplicaMismatchError as ReplicaMismatchError
from avgfn._hierarchical import HierarchicalState as HierarchicalState
from avgfn._hierarchical import hierarchical as hierarchical
from avgfn._inner_state import sync_inner_state as sync_inner_state
from avgfn._inner_state import with_inner_state as with_inner_state
from avgfn._module import ModuleAverager as ModuleAverager
from avgfn._periodic import PeriodicState as PeriodicState
from avgfn._periodic import periodic as periodic
from avgfn._post_local import GradientSchedule as GradientSchedule
from avgfn._post_local import GradientScheduleState as GradientScheduleState
from avgfn._post_local import PostLocalSGD as PostLocalSGD
from avgfn._post_local import post_local_gradients as post_local_gradients
from avgfn._post_local import post_local_sgd as post_local_sgd
from avgfn._slowmo import SlowMoState as SlowMoState
from avgfn._slowmo import slowmo as slowmo
from avgfn._streaming import StreamingDiLoCoState as StreamingDiLoCoState
from avgfn._streaming import streaming_diloco as streaming_diloco
from avgfn._temporal import EMAState as EMAState
from avgfn._temporal import SWAState as SWAState
from avgfn._temporal import ema as ema
from avgfn._temporal import swa as swa
from avgfn._weighted import WeightedState as WeightedState
from avgfn._weighted import fedavg as fedavg
from avgfn._weighted import fedavgm as fedavgm
from avgfn._weighted import weighted as weighted
from avgfn._wire import AsyncReduce as AsyncReduce
from avgfn._wire import Pending as Pending

__version__ = "0.1.0"

__all__ = [
    "AsyncReduce",
    "Averager",
    "AveragingError",
    "AveragingOptimizer",
    "AveragingState",
    "AveragingUpdate",
    "ChainState",
    "DiLoCoState",
    "EMAState",
    "GradientSchedule",
    "GradientScheduleState",
    "HierarchicalState",
    "InitFn",
    "ModuleAverager",
    "NonFiniteError",
    "Params",
    "PeerError",
    "Pending",
    "PeriodicState",
    "PostLocalSGD",
    "Reduce",
    "ReplicaMismatchError",
    "SWAState",
    "SlowMoState",
    "StreamingDiLoCoState",
    "UpdateFn",
    "WeightedState",
    "average",
    "chain",
    "collectives",
    "diloco",
    "ema",
    "fedavg",
    "fedavgm",
    "hierarchical",
    "load_state_dict",
    "optim",
    "periodic",
    "post_local_gradients",
    "post_local_sgd",
    "simulate",
    "slowmo",
    "state_dict",
    "streaming_diloco",
    "swa",
    "sync_inner_state",
    "testing",
    "weighted",
    "with_averaging",
    "with_inner_state",
]
