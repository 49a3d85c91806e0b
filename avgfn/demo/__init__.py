"""``python -m avgfn.demo``: what each averaging algorithm saves in communication, and costs.

Eight simulated workers (``avgfn.simulate`` under ``torch.func.vmap``) train a
small MLP on the handwritten digits that ship with avgfn, once per algorithm;
the demo counts each worker's collective calls and bytes, evaluates the
result on held-out images, draws the held-out loss against steps and bytes,
and finally runs one configuration for real on gloo processes under
``torchrun`` and checks it against the simulation. See ``docs/demo.md``.
"""

from avgfn.demo._accounting import CountingReduce as CountingReduce
from avgfn.demo._accounting import Ledger as Ledger
from avgfn.demo._data import DATA as DATA
from avgfn.demo._data import Split as Split
from avgfn.demo._data import batch_indices as batch_indices
from avgfn.demo._data import load_digits as load_digits
from avgfn.demo._data import read_digits as read_digits
from avgfn.demo._data import shard_train as shard_train
from avgfn.demo._data import split as split
from avgfn.demo._progress import Progress as Progress
from avgfn.demo._study import ALGORITHMS as ALGORITHMS
from avgfn.demo._study import Algorithm as Algorithm
from avgfn.demo._study import Config as Config
from avgfn.demo._study import Result as Result
from avgfn.demo._study import SimulatedComm as SimulatedComm
from avgfn.demo._study import Task as Task
from avgfn.demo._study import algorithm as algorithm
from avgfn.demo._study import make_task as make_task
from avgfn.demo._study import run as run
from avgfn.demo._study import run_study as run_study

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Config",
    "CountingReduce",
    "DATA",
    "Ledger",
    "Progress",
    "Result",
    "SimulatedComm",
    "Split",
    "Task",
    "algorithm",
    "batch_indices",
    "load_digits",
    "make_task",
    "read_digits",
    "run",
    "run_study",
    "shard_train",
    "split",
]
