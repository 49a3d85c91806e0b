"""avgfn: model averaging for PyTorch as pure functions.

Local SGD and its family (periodic, hierarchical, post-local SGD...) as
``(params, state, step) -> (params, state)`` functions over immutable state,
with the collective injected as a function.
"""

from avgfn import collectives as collectives
from avgfn import optim as optim
from avgfn import simulate as simulate
from avgfn import testing as testing
from avgfn._algorithms.average import average as average
from avgfn._adapters.averaging_optimizer import AveragingOptimizer as AveragingOptimizer
from avgfn._core.types import AsyncReduce as AsyncReduce
from avgfn._core.types import Averager as Averager
from avgfn._core.types import ForwardingReduce as ForwardingReduce
from avgfn._core.types import GroupReduce as GroupReduce
from avgfn._core.types import InitFn as InitFn
from avgfn._core.types import Params as Params
from avgfn._core.types import Pending as Pending
from avgfn._core.types import Reduce as Reduce
from avgfn._core.types import UpdateFn as UpdateFn
from avgfn._algorithms.chain import ChainState as ChainState
from avgfn._algorithms.chain import chain as chain
from avgfn._checkpoint import load_state_dict as load_state_dict
from avgfn._round.options import Round as Round
from avgfn._round.pool import release_buffers as release_buffers
from avgfn._training.compose import AveragingState as AveragingState
from avgfn._training.compose import AveragingUpdate as AveragingUpdate
from avgfn._training.compose import with_averaging as with_averaging
from avgfn._checkpoint import state_dict as state_dict
from avgfn._dcp import load_sharded_state_dict as load_sharded_state_dict
from avgfn._dcp import sharded_state_dict as sharded_state_dict
from avgfn._algorithms.outer import DiLoCoState as DiLoCoState
from avgfn._algorithms.diloco import diloco as diloco
from avgfn._core.errors import AveragingError as AveragingError
from avgfn._core.errors import NonFiniteError as NonFiniteError
from avgfn._core.errors import PeerError as PeerError
from avgfn._core.errors import ReplicaMismatchError as ReplicaMismatchError
from avgfn._core.errors import RoundNotCommitted as RoundNotCommitted
from avgfn._algorithms.hierarchical import HierarchicalState as HierarchicalState
from avgfn._algorithms.hierarchical import hierarchical as hierarchical
from avgfn._training.inner_state import sync_inner_state as sync_inner_state
from avgfn._training.inner_state import with_inner_state as with_inner_state
from avgfn._adapters.module import ModuleAverager as ModuleAverager
from avgfn._algorithms.overlapped import OverlappedDiLoCoState as OverlappedDiLoCoState
from avgfn._algorithms.overlapped import overlapped_diloco as overlapped_diloco
from avgfn._algorithms.periodic import PeriodicState as PeriodicState
from avgfn._algorithms.periodic import periodic as periodic
from avgfn._algorithms.post_local import GradientSchedule as GradientSchedule
from avgfn._algorithms.post_local import GradientScheduleState as GradientScheduleState
from avgfn._algorithms.post_local import PostLocalSGD as PostLocalSGD
from avgfn._algorithms.post_local import post_local_gradients as post_local_gradients
from avgfn._algorithms.post_local import post_local_sgd as post_local_sgd
from avgfn._algorithms.slowmo import SlowMoState as SlowMoState
from avgfn._algorithms.slowmo import slowmo as slowmo
from avgfn._algorithms.streaming import StreamingDiLoCoState as StreamingDiLoCoState
from avgfn._algorithms.streaming import streaming_diloco as streaming_diloco
from avgfn._algorithms.temporal import EMAState as EMAState
from avgfn._algorithms.temporal import SWAState as SWAState
from avgfn._algorithms.temporal import ema as ema
from avgfn._algorithms.temporal import swa as swa
from avgfn._algorithms.weighted import WeightedState as WeightedState
from avgfn._algorithms.weighted import fedavg as fedavg
from avgfn._algorithms.weighted import fedavgm as fedavgm
from avgfn._algorithms.weighted import weighted as weighted

__version__ = "0.1.0"

__all__ = [
    "AsyncReduce",
    "Averager",
    "ForwardingReduce",
    "GroupReduce",
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
    "OverlappedDiLoCoState",
    "Params",
    "PeerError",
    "Pending",
    "PeriodicState",
    "PostLocalSGD",
    "Reduce",
    "ReplicaMismatchError",
    "Round",
    "RoundNotCommitted",
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
    "load_sharded_state_dict",
    "optim",
    "overlapped_diloco",
    "periodic",
    "release_buffers",
    "post_local_gradients",
    "post_local_sgd",
    "simulate",
    "slowmo",
    "sharded_state_dict",
    "state_dict",
    "streaming_diloco",
    "swa",
    "sync_inner_state",
    "testing",
    "weighted",
    "with_averaging",
    "with_inner_state",
]
