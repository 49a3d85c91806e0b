"""The study: each algorithm trains the same task on W simulated workers, and is measured.

Every algorithm is built from avgfn's public pieces, given a ``Comm`` that
hands out the Reduces (a counting [`avgfn.simulate.replica_mean()`][avgfn.simulate.replica_mean] here,
a counting [`avgfn.collectives.all_reduce_mean()`][avgfn.collectives.all_reduce_mean] in the real run of
`avgfn.demo._real`), so the very same recipe runs on simulated workers
under ``torch.func.vmap`` and on real gloo processes.

The task is a 64-64-64-10 tanh MLP on the digits; every worker starts from the same
initial params, takes SGD steps (momentum 0.9) on mini-batches of its own
shard, and communicates only as its algorithm says. The model evaluated is
the mean of the workers' params (what one more averaging would give each; for
the algorithms that keep a global copy it is that copy right after a sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Protocol

import attrs
import torch
from torch.func import functional_call, grad_and_value, vmap

import avgfn
from avgfn import simulate
from avgfn.demo._accounting import CountingReduce, Ledger
from avgfn.demo._data import CLASSES, PIXELS, Split, batch_indices, load_digits, shard_train, split
from avgfn.demo._progress import Progress

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Comm",
    "Config",
    "Result",
    "SimulatedComm",
    "Task",
    "algorithm",
    "check_algorithm",
    "make_task",
    "run",
    "run_study",
]

# --- the run's settings and its task -----------------------------------------------------


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        del instance, attribute
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    return check


def _as_widths(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


def _widths(instance: Any, attribute: Any, value: tuple[Any, ...]) -> None:
    del instance, attribute
    if not value or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in value):
        raise ValueError(f"hidden must be one or more widths >= 1, got {value!r}")


@attrs.frozen
class Config:
    """The settings of a run (the CLI's options).

    Attributes:
      workers: the number of workers W.
      steps: training steps per algorithm.
      batch_size: the mini-batch of each worker at each step.
      lr: the inner SGD learning rate (momentum 0.9).
      hidden: the widths of the MLP's hidden layers.
      seed: fixes the split, the initial params and the mini-batches.
      eval_every: steps between two points of the curves.
      test_size: the held-out images.
    """

    workers: int = attrs.field(default=8, validator=_positive("workers"))
    steps: int = attrs.field(default=480, validator=_positive("steps"))
    batch_size: int = attrs.field(default=32, validator=_positive("batch_size"))
    lr: float = 0.05
    hidden: tuple[int, ...] = attrs.field(default=(64, 64), converter=_as_widths, validator=_widths)
    seed: int = 0
    eval_every: int = attrs.field(default=16, validator=_positive("eval_every"))
    test_size: int = 297


MOMENTUM = 0.9


def make_model(hidden: Sequence[int]) -> torch.nn.Module:
    """The architecture: ``Linear(64, h1) - tanh - ... - Linear(h_last, 10)``.

    tanh, not ReLU: a ReLU network's gradient jumps where a pre-activation
    crosses zero, so a difference in the last bit (gloo adds in another
    order than the simulation) can flip a unit and send a real run and its
    simulation apart; with tanh they stay within float32 rounding.

    Examples:
      >>> from avgfn.demo._study import make_model
      >>> make_model((64, 64))
      Sequential(
        (0): Linear(in_features=64, out_features=64, bias=True)
        (1): Tanh()
        (2): Linear(in_features=64, out_features=64, bias=True)
        (3): Tanh()
        (4): Linear(in_features=64, out_features=10, bias=True)
      )
    """
    layers: list[torch.nn.Module] = []
    width = PIXELS
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
        width = h
    layers.append(torch.nn.Linear(width, CLASSES))
    return torch.nn.Sequential(*layers)


@attrs.frozen(eq=False)
class Task:
    """Everything a run trains on: the data, its shards, the batches and the starting params.

    Attributes:
      config: the run's `Config`.
      split: the train / held-out `avgfn.demo.Split`.
      shard_x, shard_y: ``(W, n, 64)`` and ``(W, n)``: worker ``r``'s rows.
      indices: ``(steps, W, batch_size)``: the rows of its shard each worker
        trains on at each step.
      model: the architecture (its own params are not used).
      init: the params every worker starts from.
    """

    config: Config
    split: Split
    shard_x: torch.Tensor
    shard_y: torch.Tensor
    indices: torch.Tensor
    model: torch.nn.Module
    init: dict[str, torch.Tensor]

    @property
    def num_params(self) -> int:
        """Elements in the params."""
        return sum(p.numel() for p in self.init.values())

    @property
    def param_bytes(self) -> int:
        """Bytes in the params: what one all-reduce of all of them hands over."""
        return sum(p.numel() * p.element_size() for p in self.init.values())

    def loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the model with ``params`` on ``(x, y)``."""
        return torch.nn.functional.cross_entropy(functional_call(self.model, params, (x,)), y)

    def evaluate(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """``(loss, accuracy)`` of the model with ``params`` on ``(x, y)``."""
        with torch.no_grad():
            logits = functional_call(self.model, params, (x,))
            loss = torch.nn.functional.cross_entropy(logits, y)
            accuracy = (logits.argmax(1) == y).to(torch.float32).mean()
        return float(loss), float(accuracy)


def make_task(config: Config) -> Task:
    """Load the digits, split, shard over ``config.workers`` and draw the batches.

    Deterministic: the same config gives the same task in every process
    (the real run's ranks rebuild it, and take their own column).

    Examples:
      >>> from avgfn.demo import Config, make_task
      >>> task = make_task(Config(workers=4, steps=10))
      >>> tuple(task.shard_x.shape), tuple(task.indices.shape), task.num_params
      ((4, 375, 64), (10, 4, 32), 8970)
    """
    parts = split(*load_digits(), test_size=config.test_size, seed=config.seed)
    shard_x, shard_y = shard_train(parts, config.workers)
    indices = batch_indices(
        config.steps, config.workers, shard_y.shape[1], config.batch_size, config.seed
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = make_model(config.hidden)
    init = {name: p.detach().clone() for name, p in model.named_parameters()}
    return Task(config, parts, shard_x, shard_y, indices, model, init)


# --- communication ----------------------------------------------------------------------


class Comm(Protocol):
    """Where an algorithm gets its Reduces, each counted in ``ledger``."""

    workers: int
    ledger: Ledger

    def world(self) -> avgfn.Reduce:
        """The mean over all the workers."""
        ...

    def hierarchy(self, period_group_sizes: dict[int, int]) -> Sequence[tuple[int, avgfn.Reduce]]:
        """The levels of [`avgfn.hierarchical()`][avgfn.hierarchical] for ``period -> group size``."""
        ...


def world_label(workers: int) -> str:
    """The ledger label of a mean over all the workers."""
    return f"all {workers}"


def group_label(size: int, workers: int) -> str:
    """The ledger label of a mean over groups of ``size`` workers."""
    return world_label(workers) if size == workers else f"groups of {size}"


class SimulatedComm:
    """The Reduces of W simulated workers: counted [`avgfn.simulate.replica_mean()`][avgfn.simulate.replica_mean].

    Examples:
      >>> from avgfn.demo import SimulatedComm
      >>> comm = SimulatedComm(8)
      >>> [(period, r.label) for period, r in comm.hierarchy({4: 2, 16: 8})]
      [(4, 'groups of 2'), (16, 'all 8')]
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.ledger = Ledger()

    def world(self) -> CountingReduce:
        return CountingReduce(simulate.replica_mean(), self.ledger, world_label(self.workers))

    def hierarchy(self, period_group_sizes: dict[int, int]) -> list[tuple[int, CountingReduce]]:
        levels = simulate.hierarchy(period_group_sizes, self.workers)
        return [
            (period, CountingReduce(r, self.ledger, group_label(size, self.workers)))
            for (period, r), size in zip(levels, period_group_sizes.values())
        ]


# --- the algorithms ---------------------------------------------------------------------

LOCAL_PERIODS = (4, 16)
OUTER_PERIOD = 16  # H of DiLoCo, Streaming DiLoCo and SlowMo
POST_LOCAL_PERIOD = 16
HIERARCHY_PERIODS = (4, 16)  # groups of 2 every 4 steps, everyone every 16
STREAMING: dict[str, Any] = {"num_fragments": 2, "delay": 1, "alpha": 0.5}  # fragments: see fragments()
SLOWMO: dict[str, Any] = {"momentum": 0.5, "slow_lr": 1.0}


def post_local_start(config: Config) -> int:
    """The first step of post-local SGD's local phase: a quarter of the run."""
    return config.steps // 4


def _never() -> avgfn.Averager:
    """An averager that never averages (the params half of plain data parallel)."""
    return avgfn.Averager(init=lambda params: None, update=lambda params, state, step: (params, state))


def _inner(config: Config) -> avgfn.optim.Optimizer:
    return avgfn.optim.sgd(config.lr, momentum=MOMENTUM)


Build = Callable[[Comm, Config], avgfn.AveragingUpdate]


@attrs.frozen
class Algorithm:
    """One row of the study.

    Attributes:
      name: the CLI name, e.g. ``"diloco"``.
      summary: ``config -> str``: what it does, for the table's caption.
      build: ``(comm, config) -> AveragingUpdate``: the whole per-worker update
        (gradient averaging, inner SGD, averaging) with ``comm``'s Reduces.
    """

    name: str
    summary: Callable[[Config], str]
    build: Build


def _sync_dp(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    # The gradient half of post-local SGD whose local phase starts after the
    # last step: gradients averaged over everyone at every step, i.e. DDP.
    gradients = avgfn.post_local_gradients(
        config.steps, global_reduce=comm.world(), local_reduce=None
    )
    return avgfn.with_averaging(_inner(config), _never(), gradients=gradients)


def _local_sgd(period: int) -> Build:
    def build(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
        return avgfn.with_averaging(_inner(config), avgfn.periodic(period, reduce=comm.world()))

    return build


def _post_local(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    algo = avgfn.post_local_sgd(
        post_local_start(config), global_reduce=comm.world(), local_reduce=None,
        period=POST_LOCAL_PERIOD,
    )  # fmt: skip
    return avgfn.with_averaging(_inner(config), algo)


def _hierarchy_sizes(workers: int) -> dict[int, int]:
    small, large = HIERARCHY_PERIODS
    if workers % 2 or workers < 4:
        raise ValueError(
            f"hierarchical: needs an even number of workers >= 4 (groups of 2 below a world of "
            f"more than 2), got {workers}"
        )
    return {small: 2, large: workers}


def _hierarchical(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    levels = comm.hierarchy(_hierarchy_sizes(comm.workers))
    return avgfn.with_averaging(_inner(config), avgfn.hierarchical(levels))


def _diloco(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    return avgfn.with_averaging(_inner(config), avgfn.diloco(OUTER_PERIOD, reduce=comm.world()))


def fragments(config: Config) -> dict[str, int]:
    """Each param's fragment for Streaming DiLoCo: two fragments of about equal size.

    The params, in order, are cut in two where the larger part is smallest
    (``streaming_diloco``'s own split puts the cut at the first leaf past the
    middle, which here would leave 92% of the elements in the first fragment).

    Examples:
      >>> from avgfn.demo import Config
      >>> from avgfn.demo._study import fragments
      >>> fragments(Config())      # 4160 and 4810 elements
      {'0.weight': 0, '0.bias': 0, '2.weight': 1, '2.bias': 1, '4.weight': 1, '4.bias': 1}
    """
    with torch.device("meta"):
        sizes = {name: p.numel() for name, p in make_model(config.hidden).named_parameters()}
    names, total = list(sizes), sum(sizes.values())
    best, cut, running = total, 1, 0
    for i, name in enumerate(names[:-1], start=1):
        running += sizes[name]
        if max(running, total - running) < best:
            best, cut = max(running, total - running), i
    return {name: int(i >= cut) for i, name in enumerate(names)}


def _streaming(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    avg = avgfn.streaming_diloco(
        OUTER_PERIOD, reduce=comm.world(), fragment_of=fragments(config), **STREAMING
    )
    return avgfn.with_averaging(_inner(config), avg)


def _overlapped(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    # DiLoCo's Nesterov step (lr 0.7, momentum 0.9) diverges here when 7/8 of each
    # mean arrives a round late; plain SGD at lr 1 (the mean itself) does not.
    avg = avgfn.overlapped_diloco(
        OUTER_PERIOD, reduce=comm.world(), num_replicas=comm.workers, outer_optimizer=avgfn.optim.sgd(1.0)
    )
    return avgfn.with_averaging(_inner(config), avg)


def _slowmo(comm: Comm, config: Config) -> avgfn.AveragingUpdate:
    avg = avgfn.slowmo(OUTER_PERIOD, reduce=comm.world(), lr=config.lr, **SLOWMO)
    return avgfn.with_averaging(_inner(config), avg)


def _summaries() -> dict[str, Callable[[Config], str]]:
    small, large = HIERARCHY_PERIODS
    return {
        "sync-dp": lambda c: (
            f"data parallel: gradients averaged over all {c.workers} workers at every step"
        ),
        "post-local-sgd": lambda c: (
            f"data parallel for the first {post_local_start(c)} steps, then local SGD, params "
            f"averaged every {POST_LOCAL_PERIOD} steps"
        ),
        "hierarchical": lambda c: (
            f"params averaged in groups of 2 every {small} steps, over all {c.workers} every {large}"
        ),
        "diloco": lambda c: (
            f"{OUTER_PERIOD} local steps, then the averaged pseudo-gradient takes an outer "
            "Nesterov step (lr 0.7, momentum 0.9)"
        ),
        "streaming-diloco": lambda c: (
            f"DiLoCo in {STREAMING['num_fragments']} fragments (layer 1 / the rest) synced in turn "
            f"every {OUTER_PERIOD // STREAMING['num_fragments']} steps, each sent "
            f"{STREAMING['delay']} step before use, mixed with alpha {STREAMING['alpha']}"
        ),
        "overlapped-diloco": lambda c: (
            f"DiLoCo whose averaged pseudo-gradient is applied one round late (eager updates: "
            f"each worker's own pseudo-gradient stands in for its share at once), {OUTER_PERIOD} "
            "local steps, outer SGD step (lr 1.0: with DiLoCo's Nesterov step it diverges)"
        ),
        "slowmo": lambda c: (
            f"params averaged every {OUTER_PERIOD} steps, then a slow momentum step "
            f"(momentum {SLOWMO['momentum']}, slow lr {SLOWMO['slow_lr']})"
        ),
    }


def algorithm(name: str) -> Algorithm:
    """The `Algorithm` named ``name``; ``local-sgd-P`` works for any period ``P >= 2``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).

    Examples:
      >>> from avgfn.demo import Config, algorithm
      >>> algorithm("local-sgd-8").summary(Config())
      'local SGD: params averaged over all 8 workers every 8 steps'
    """
    if name.startswith("local-sgd-"):
        text = name[len("local-sgd-") :]
        if text.isdigit() and int(text) >= 2:
            period = int(text)
            return Algorithm(
                name,
                lambda c: f"local SGD: params averaged over all {c.workers} workers every {period} steps",
                _local_sgd(period),
            )
    builds = {
        "sync-dp": _sync_dp,
        "post-local-sgd": _post_local,
        "hierarchical": _hierarchical,
        "diloco": _diloco,
        "streaming-diloco": _streaming,
        "overlapped-diloco": _overlapped,
        "slowmo": _slowmo,
    }
    if name not in builds:
        raise ValueError(
            f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)} (local-sgd-P for any "
            "period P >= 2)"
        )
    return Algorithm(name, _summaries()[name], builds[name])


ALGORITHMS = (
    "sync-dp",
    *(f"local-sgd-{p}" for p in LOCAL_PERIODS),
    "post-local-sgd",
    "hierarchical",
    "diloco",
    "streaming-diloco",
    "overlapped-diloco",
    "slowmo",
)
"""The algorithms of the default study, in table order."""


# --- one run ----------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Result:
    """What one algorithm's run measured.

    Attributes:
      name: the algorithm.
      summary: what it did.
      curve: ``(step, calls, bytes, test_loss, test_acc, train_loss)`` at the
        start, after every ``eval_every`` steps and at the end; ``calls``/``bytes``
        are the totals per worker so far, the losses and accuracy those of the
        workers' mean params (``train_loss`` on the training images).
      train_loss, train_acc, test_loss, test_acc: of the workers' mean params
        at the end, on the whole training set and on the held-out images.
      ledger: the `avgfn.demo.Ledger` of the run.
      params: the workers' final params, stacked ``(W, ...)``.
      seconds: wall time of the training loop.
    """

    name: str
    summary: str
    curve: list[tuple[int, int, int, float, float, float]]
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    ledger: Ledger
    params: dict[str, torch.Tensor]
    seconds: float


def mean_params(stacked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over the workers (dim 0) of each leaf."""
    return {k: v.mean(0) for k, v in stacked.items()}


def run(name: str, task: Task, progress: Optional[Progress] = None) -> Result:
    """Train ``task`` with the algorithm ``name`` on ``task.config.workers`` simulated workers.

    Examples:
      >>> from avgfn.demo import Config, make_task, run
      >>> result = run("local-sgd-4", make_task(Config(workers=4, steps=8, eval_every=4)))
      >>> result.ledger.calls, result.ledger.total_bytes     # steps 0 and 4, 8970 floats each
      ({'all 4': 2}, 71760)
      >>> [point[0] for point in result.curve]
      [0, 4, 8]
    """
    threads = torch.get_num_threads()
    # The tensors are tiny (W x batch x 64): a second intra-op thread only adds
    # contention, which on a busy 2-core machine slows a run down tenfold.
    torch.set_num_threads(1)
    try:
        return _run(name, task, progress)
    finally:
        torch.set_num_threads(threads)


def _run(name: str, task: Task, progress: Optional[Progress]) -> Result:
    config = task.config
    workers = config.workers
    algo = algorithm(name)
    comm = SimulatedComm(workers)
    train = algo.build(comm, config)

    def step_fn(params: Any, state: Any, x: torch.Tensor, y: torch.Tensor, step: int) -> Any:
        grads, loss = grad_and_value(task.loss)(params, x, y)
        params, state = train.update(grads, state, params, step)
        return params, state, loss

    stacked = simulate.stack([task.init] * workers)
    state = vmap(train.init)(stacked)
    step_all = vmap(step_fn, in_dims=(0, 0, 0, 0, None))
    rows = torch.arange(workers)[:, None]
    split_ = task.split
    used = workers * task.shard_y.shape[1]
    train_x, train_y = split_.train_x[:used], split_.train_y[:used]
    curve = [
        (0, 0, 0, *task.evaluate(task.init, split_.test_x, split_.test_y),
         task.evaluate(task.init, train_x, train_y)[0])
    ]  # fmt: skip
    started = time.perf_counter()
    for step in range(config.steps):
        pick = task.indices[step]
        stacked, state, _ = step_all(stacked, state, task.shard_x[rows, pick], task.shard_y[rows, pick], step)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            mean = mean_params(stacked)
            test_loss, test_acc = task.evaluate(mean, split_.test_x, split_.test_y)
            train_loss = task.evaluate(mean, train_x, train_y)[0]
            ledger = comm.ledger
            curve.append((done, ledger.total_calls, ledger.total_bytes, test_loss, test_acc, train_loss))
        if progress is not None:
            progress.advance(name)
    seconds = time.perf_counter() - started
    final = mean_params(stacked)
    train_loss, train_acc = task.evaluate(final, train_x, train_y)
    test_loss, test_acc = task.evaluate(final, split_.test_x, split_.test_y)
    return Result(
        name, algo.summary(config), curve, train_loss, train_acc, test_loss, test_acc,
        comm.ledger, stacked, seconds,
    )  # fmt: skip


def check_algorithm(name: str, workers: int) -> Algorithm:
    """The `Algorithm` ``name``, after checking that it can run on ``workers`` workers.

    Raises:
      ValueError: an unknown name, or ``hierarchical`` on a number of workers
        that is odd or below 4.
    """
    algo = algorithm(name)
    if name == "hierarchical":
        _hierarchy_sizes(workers)
    return algo


def run_study(
    names: Sequence[str], config: Config, *, progress: Optional[Progress] = None
) -> tuple[Task, list[Result]]:
    """Build the task once and run each algorithm of ``names`` on it, in order."""
    for name in names:
        check_algorithm(name, config.workers)  # fail before any training
    task = make_task(config)
    results = []
    for name in names:
        result = run(name, task, progress)
        if progress is not None:
            progress.note(
                f"{name}: {result.seconds:.1f} s, held-out accuracy {result.test_acc:.1%}, "
                f"{result.ledger.total_calls} collective calls per worker"
            )
        results.append(result)
    return task, results
