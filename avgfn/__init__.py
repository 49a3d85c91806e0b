"""avgfn: model averaging for PyTorch as pure functions.

Local SGD and its family (periodic, hierarchical, post-local SGD...) as
``(params, state, step) -> (params, state)`` functions over immutable state,
with the collective injected as a function.
"""

from avgfn import collectives as collectives
from avgfn import testing as testing
from avgfn._average import average as average
from avgfn._base import Averager as Averager
from avgfn._base import InitFn as InitFn
from avgfn._base import Params as Params
from avgfn._base import Reduce as Reduce
from avgfn._base import UpdateFn as UpdateFn
from avgfn._checkpoint import load_state_dict as load_state_dict
from avgfn._checkpoint import state_dict as state_dict
from avgfn._hierarchical import HierarchicalState as HierarchicalState
from avgfn._hierarchical import hierarchical as hierarchical
from avgfn._periodic import PeriodicState as PeriodicState
from avgfn._periodic import periodic as periodic

__version__ = "0.1.0"

__all__ = [
    "Averager",
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
    "periodic",
    "state_dict",
    "testing",
]
