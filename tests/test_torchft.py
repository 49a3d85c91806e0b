"""avgfn over a real torchft quorum: rounds that are not committed, healing, replicas that come and go.

Three kinds of tests:

* without torchft: [`skip_uncommitted`] over fakes that decline rounds, and
  under ``vmap`` with simulated replicas;
* one replica in this process, on a real ``LighthouseServer`` and ``Manager``
  over ``ProcessGroupGloo``: a committed round, a vote that says no, a
  collective that fails, healing's strictness;
* three replica processes on loopback for local SGD (``avgfn.periodic``) and
  for DiLoCo: one SIGKILLs itself mid-run, the two others go on with a quorum
  of two, the killed one is started again, heals and rejoins. Each replica
  writes a log of its rounds (committed or not, with how many participants);
  the test compares every replica's final params with a one-process replay of
  the same schedule of quorums.

The multi-process runs are made deterministic by files and by the
Lighthouse's status page, not by sleeps: every replica waits at a gate (a
file) before a chosen quorum, and the test opens it once the Lighthouse shows
what it waits for (every replica heartbeating; the restarted replica's
request registered). Every wait has a deadline, and every process is killed in
``finally``. The replica processes are forked from a forkserver that has
imported torch and torchft once, so a restart costs a fork, not an import.

The torchft tests skip when torchft cannot be imported (``make test``
installs it: see ``pyproject.toml`` and the ``Makefile``).
"""

from __future__ import annotations

import doctest
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import avgfn
import avgfn.torchft
from avgfn import simulate
from avgfn.torchft import QuorumState, skip_uncommitted

ROOT = Path(__file__).resolve().parents[1]
# torchft 0.2.0 logs through the deprecated Logger.warn when a quorum changes.
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
NO_TORCHFT = "torchft is not installed (pip install 'avgfn[torchft]'; make test installs it)"


@pytest.fixture(scope="module")
def ft() -> Any:
    """The torchft module, or a skip with the reason."""
    return pytest.importorskip("torchft", reason=NO_TORCHFT, exc_type=ImportError)


# --- the task every replica trains ----------------------------------------------------

FEATURES, OUTPUTS = 6, 3


def _initial_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(FEATURES, OUTPUTS, generator=g) * 0.3, "b": torch.zeros(OUTPUTS)}


def _batch(index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``index``'s batch at ``step``: a function of both only."""
    g = torch.Generator().manual_seed(1000 * index + step)
    x = torch.randn(8, FEATURES, generator=g)
    target = torch.arange(FEATURES * OUTPUTS, dtype=torch.float32).reshape(FEATURES, OUTPUTS) / 10
    return x, x @ target + 0.1 * index


def _local_step(params: dict[str, torch.Tensor], index: int, step: int) -> dict[str, torch.Tensor]:
    """One SGD step on the squared error (torch.autograd: torch.func's first call imports far more)."""
    x, y = _batch(index, step)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = ((x @ leaves["w"] + leaves["b"] - y) ** 2).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return {k: (params[k] - 0.05 * grads[k]).detach() for k in params}


PERIOD = 4
SCENARIOS = {
    # algorithm: (steps, kill_at, gate of the rejoin): the kill falls inside an
    # interval, so the round that ends it is the one the survivors cannot commit;
    # the rejoin gate is the start of an interval (a quorum is due there).
    "periodic": (41, 14, 25),  # rounds at 0, 4, ..., 40; quorums start at 0, 1, 5, ...
    "diloco": (40, 13, 24),  # rounds at 3, 7, ..., 39; quorums start at 0, 4, 8, ...
}


def _averager(algorithm: str, reduce: Any) -> avgfn.Averager:
    if algorithm == "periodic":
        inner = avgfn.periodic(PERIOD, reduce=reduce)
    else:
        inner = avgfn.diloco(PERIOD, reduce=reduce, outer_optimizer=avgfn.optim.sgd(0.7, momentum=0.9, nesterov=True))
    return skip_uncommitted(inner)


# --- without torchft: skip_uncommitted over fakes --------------------------------------


class _Declines(avgfn.ForwardingReduce):
    """A group whose vote says no to every round (as torchft's should_commit can)."""

    def commit(self) -> bool:
        return False


class _Commits(avgfn.ForwardingReduce):
    votes = 0

    def commit(self) -> bool:
        self.votes += 1
        return True


def _bits(tree: Any) -> list[torch.Tensor]:
    return [leaf.clone() for leaf in torch.utils._pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _same(tree: Any, bits: list[torch.Tensor]) -> bool:
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
    return len(leaves) == len(bits) and all(torch.equal(a, b) for a, b in zip(leaves, bits))


@pytest.mark.parametrize("algorithm", sorted(SCENARIOS))
def test_a_declined_round_leaves_params_and_state_and_counts_it(algorithm):
    peer = avgfn.testing.peers_mean(lambda t: t * 0 + 1.0)
    avg = _averager(algorithm, _Declines(peer))
    params = _initial_params()
    state = avg.init(params)
    due = 0 if algorithm == "periodic" else PERIOD - 1
    params = _local_step(params, 0, due)
    kept_params, kept_state = _bits(params), _bits(state.inner)
    new_params, new_state = avg.update(params, state, due)
    assert new_params is params and _same(params, kept_params)
    assert new_state.inner is state.inner and _same(state.inner, kept_state)
    assert (int(new_state.committed), int(new_state.skipped)) == (0, 1)
    # The plain averager raises instead: the wrapper is what turns it into a skip.
    plain = avgfn.periodic(PERIOD, reduce=_Declines(peer)) if algorithm == "periodic" else (
        avgfn.diloco(PERIOD, reduce=_Declines(peer)))
    with pytest.raises(avgfn.RoundNotCommitted, match=f"at step {due}"):
        plain.update(params, plain.init(_initial_params()), due)


@pytest.mark.parametrize("algorithm", sorted(SCENARIOS))
def test_committed_rounds_are_the_plain_averagers_and_are_counted(algorithm):
    peer = avgfn.testing.peers_mean(lambda t: t * 0.5)
    voting = _Commits(peer)
    wrapped = _averager(algorithm, voting)
    plain = _averager(algorithm, peer)  # the same algorithm over a plain Reduce
    params = _initial_params()
    a, b = wrapped.init(params), plain.init(params)
    pa = pb = params
    for step in range(3 * PERIOD):
        pa, a = wrapped.update(_local_step(pa, 0, step), a, step)
        pb, b = plain.update(_local_step(pb, 0, step), b, step)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert int(a.committed) == voting.votes == 3 and int(a.skipped) == 0
    off_step = 1 if algorithm == "periodic" else 0
    same, same_state = wrapped.update(pa, a, 3 * PERIOD + off_step)
    assert same is pa and same_state is a  # no round due: the inputs themselves


def test_a_step_that_applies_an_earlier_round_is_not_counted_again():
    # Streaming DiLoCo with a delay averages at its start steps and applies the
    # average later: only the start steps vote, so only they are committed rounds
    voting = _Commits(avgfn.testing.peers_mean(lambda t: t * 0.5))
    avg = skip_uncommitted(avgfn.streaming_diloco(4, reduce=voting, num_fragments=2, delay=1))
    params = _initial_params()
    state = avg.init(params)
    for step in range(8):
        params, state = avg.update(_local_step(params, 0, step), state, step)
    assert voting.votes == 4 and int(state.committed) == voting.votes
    assert state.inner.rounds.tolist() == [2, 2]


def test_other_failures_are_not_skips():
    nan = {"w": torch.tensor([float("nan")]), "b": torch.zeros(1)}
    avg = skip_uncommitted(avgfn.periodic(2, reduce=_Declines(lambda t: t)))
    with pytest.raises(avgfn.NonFiniteError):
        avg.update(nan, avg.init(nan), 0)
    with pytest.raises(TypeError, match="QuorumState"):
        avg.update(nan, avgfn.periodic(2, reduce=lambda t: t).init(nan), 0)
    with pytest.raises(TypeError, match="avgfn.Averager"):
        skip_uncommitted(lambda p: p)


def test_the_same_wrapper_runs_on_simulated_replicas_under_vmap():
    replicas = [_initial_params() for _ in range(4)]
    for i, p in enumerate(replicas):
        replicas[i] = _local_step(p, i, 0)
    stacked = simulate.stack(replicas)
    avg = _averager("periodic", simulate.replica_mean())
    state = torch.func.vmap(avg.init)(stacked)
    new, state = torch.func.vmap(avg.update, in_dims=(0, 0, None))(stacked, state, 0)
    mean = {k: stacked[k].mean(0) for k in stacked}
    for k in new:
        torch.testing.assert_close(new[k], mean[k].expand_as(new[k]))
    assert isinstance(state, QuorumState) and state.committed.tolist() == [1] * 4


# --- one replica in this process, on a real Lighthouse and Manager ---------------------


def _lighthouse(ft: Any, **options: Any) -> tuple[Any, str]:
    from torchft.coordination import LighthouseServer

    options = {"min_replicas": 1, "join_timeout_ms": 10_000, "heartbeat_timeout_ms": 2_000, **options}
    server = LighthouseServer(bind="127.0.0.1:0", **options)
    return server, "http://127.0.0.1:" + server.address().rsplit(":", 1)[1]


def _manager(
    ft: Any, lighthouse: str, replica_id: str, store_port: int, min_replica_size: int, **options: Any
) -> Any:
    """A Manager for one replica (a replica group of one process) on loopback.

    A collective waits at most 5 s: a survivor whose neighbour in the ring
    noticed a lost replica first waits that long before it notices too.
    """
    return ft.Manager(
        pg=ft.ProcessGroupGloo(timeout=timedelta(seconds=5)),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replica_size,
        use_async_quorum=False,  # a replica heals in Replica.begin(), before it trains
        lighthouse_addr=lighthouse,
        replica_id=replica_id,
        store_addr="127.0.0.1",
        store_port=store_port,
        rank=0,
        world_size=1,
        hostname="127.0.0.1",
        timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=40),
        connect_timeout=timedelta(seconds=10),
        **options,
    )


@pytest.fixture
def solo(ft):
    """``make(min_replica_size) -> manager``: one replica on a Lighthouse of its own."""
    import torch.distributed as dist

    made: list[tuple[Any, Any, Any]] = []

    def make(min_replica_size: int = 1) -> Any:
        server, address = _lighthouse(ft)
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        manager = _manager(ft, address, f"solo{len(made)}", store.port, min_replica_size)
        made.append((server, store, manager))
        return manager

    yield make
    for server, _, manager in made:
        manager.shutdown(wait=False)
        server.shutdown()


@pytest.mark.parametrize("algorithm", sorted(SCENARIOS))
def test_a_replica_alone_commits_its_rounds(solo, algorithm):
    manager = solo(min_replica_size=1)
    reduce = avgfn.torchft.quorum_mean(manager)
    replica = avgfn.torchft.Replica(reduce, _averager(algorithm, reduce), _initial_params())
    plain = _averager(algorithm, lambda t: t)  # the same steps in a group of one, without torchft
    params, state = _initial_params(), plain.init(_initial_params())
    while replica.step < 2 * PERIOD + 1:
        step = replica.step
        replica.update(_local_step(replica.begin(), 0, step))
        params, state = plain.update(_local_step(params, 0, step), state, step)
    assert all(torch.equal(replica.params[k], params[k]) for k in params)
    rounds = 3 if algorithm == "periodic" else 2
    assert int(replica.state.committed) == manager.current_step() == rounds
    assert int(replica.state.skipped) == 0 and reduce.size == 1


def test_a_vote_that_says_no_is_a_skipped_round(solo):
    # The Lighthouse forms a quorum of one, but the Manager wants two replicas:
    # the all-reduce works, and should_commit says no.
    manager = solo(min_replica_size=2)
    reduce = avgfn.torchft.quorum_mean(manager)
    replica = avgfn.torchft.Replica(reduce, _averager("diloco", reduce), _initial_params())
    for step in range(PERIOD):
        params = _local_step(replica.begin(), 0, step)
        before = replica.state
        returned = replica.update(params)
    assert returned is params  # the round's params: the local ones, unaveraged
    assert replica.state.inner is before.inner
    assert (int(replica.state.committed), int(replica.state.skipped), manager.current_step()) == (0, 1, 0)


def test_a_collective_that_fails_is_a_skipped_round(solo):
    manager = solo()
    reduce = avgfn.torchft.quorum_mean(manager)
    replica = avgfn.torchft.Replica(reduce, _averager("periodic", reduce), _initial_params())
    replica.update(_local_step(replica.begin(), 0, 0))  # round 0: committed
    for step in range(1, PERIOD + 1):
        params = _local_step(replica.begin(), 0, step)
        if step == PERIOD:
            # What torchft records when a peer dies mid-round (its collectives then
            # return at once with the error noted, not raised).
            manager.report_error(RuntimeError("Connection reset by peer"))
            kept = replica.state
            assert replica.update(params) is params and replica.state.inner is kept.inner
        else:
            replica.update(params)
    assert (int(replica.state.committed), int(replica.state.skipped)) == (1, 1)
    assert manager.current_step() == 1
    # The next interval starts a fresh quorum, and its round commits.
    for step in range(PERIOD + 1, 2 * PERIOD + 1):
        replica.update(_local_step(replica.begin(), 0, step))
    assert (int(replica.state.committed), int(replica.state.skipped), manager.current_step()) == (2, 1, 2)


def test_without_the_wrapper_the_failure_names_its_cause(solo):
    manager = solo()
    reduce = avgfn.torchft.quorum_mean(manager)
    replica = avgfn.torchft.Replica(reduce, avgfn.periodic(2, reduce=reduce), _initial_params())
    params = replica.begin()
    manager.report_error(RuntimeError("Connection reset by peer"))
    with pytest.raises(avgfn.RoundNotCommitted, match=r"at step 0: .*Connection reset by peer"):
        replica.update(params)
    assert replica.step == 0 and replica.params is params and reduce.quorum_due


def test_no_collective_before_a_quorum_and_no_check_at_init(solo):
    manager = solo()
    reduce = avgfn.torchft.quorum_mean(manager)
    # init's replica check (DiLoCo's "values") runs before any quorum: nothing to compare with.
    avg = avgfn.diloco(2, reduce=reduce)
    state = avg.init(_initial_params())
    with pytest.raises(RuntimeError, match=r"call Replica.begin\(\)"):
        avg.update(_initial_params(), state, 1)
    assert reduce.size == 0 and reduce.quorum_due
    with pytest.raises(TypeError, match="torchft.Manager"):
        avgfn.torchft.quorum_mean(object())
    with pytest.raises(TypeError, match="QuorumMean"):
        avgfn.torchft.Replica(lambda t: t, avg, _initial_params())


def _two_replicas(ft: Any, name: str, run: Callable[[int, Any], Any]) -> dict[int, Any]:
    """``run(i, manager)`` for two replicas (threads here, as in torchft's own tests) on one Lighthouse.

    init_sync=False: no heal at the first quorum (which would copy one
    replica's step to the other). Returns what each ``run`` returned, or
    the exception it raised.
    """
    import threading

    import torch.distributed as dist

    server, address = _lighthouse(ft, min_replicas=2)
    stores = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) for _ in range(2)]
    managers = [_manager(ft, address, f"{name}{i}", stores[i].port, 2, init_sync=False) for i in range(2)]
    outcome: dict[int, Any] = {}

    def main(i: int) -> None:
        try:
            outcome[i] = run(i, managers[i])
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            outcome[i] = error

    try:
        threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a replica hung"
    finally:
        for manager in managers:
            manager.shutdown(wait=False)
        server.shutdown()
    return outcome


def test_replicas_out_of_step_refuse_the_round_everywhere(ft):
    # Two replicas whose steps differ: the per-round agreement through the quorum
    # makes both raise, vote no, and keep their params and state.
    def run(i: int, manager: Any) -> Any:
        reduce = avgfn.torchft.quorum_mean(manager)
        replica = avgfn.torchft.Replica(reduce, _averager("diloco", reduce), _initial_params(), step=(3, 7)[i])
        params, state = replica.begin(), replica.state
        try:
            replica.update(params)
            return "no error"
        except avgfn.ReplicaMismatchError as error:
            kept = replica.params is params and replica.state is state and replica.step == (3, 7)[i]
            return (str(error), kept, manager.current_step(), reduce.quorum_due)

    outcome = _two_replicas(ft, "pair", run)
    for i, step in ((0, 3), (1, 7)):
        assert isinstance(outcome.get(i), tuple), outcome
        message, kept, current, due = outcome[i]
        assert f"at step {step}: the participants of the torchft quorum (2) do not average" in message
        assert kept and current == 0 and due


def test_state_dict_round_trip_and_strictness(solo):
    manager = solo()
    reduce = avgfn.torchft.quorum_mean(manager)
    avg = _averager("diloco", reduce)
    source = avgfn.torchft.Replica(reduce, avg, _initial_params(), key="source")
    while source.step < PERIOD + 1:
        source.update(_local_step(source.begin(), 0, source.step))
    saved = source.state_dict()
    assert saved["step"] == PERIOD + 1 and set(saved) == {"params", "state", "step"}
    assert saved["params"]["['w']"] is not source.params["w"]  # a copy: the loop may go on
    target = avgfn.torchft.Replica(reduce, avg, _initial_params(), key="target")
    target.load_state_dict(saved)
    assert target.step == PERIOD + 1 and target.healed_at == []  # loaded by the loop, not healed
    assert all(torch.equal(target.params[k], source.params[k]) for k in source.params)
    assert _same(target.state, _bits(source.state))
    before = target.params
    wrong = dict(saved, params={"['w']": torch.zeros(2, 2), "['b']": torch.zeros(OUTPUTS)})
    with pytest.raises(ValueError, match=r"\['w'\]"):
        target.load_state_dict(wrong)
    with pytest.raises(ValueError, match="expected the keys"):
        target.load_state_dict({"params": saved["params"]})
    assert target.params is before


def test_the_docs_page_runs(ft, tmp_path, monkeypatch):
    from test_readme import run_page

    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / "docs" / "torchft.md") >= 1


def test_the_docstring_examples_that_need_a_manager_run(solo):
    # The package's doctests skip them (torchft is optional there); run them here.
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    skipped, manager = 0, solo()
    for test in doctest.DocTestFinder().find(avgfn.torchft):
        for example in test.examples:
            skipped += example.options.pop(doctest.SKIP, False)
        test.globs["manager"] = manager
        report: list[str] = []
        result = runner.run(test, out=report.append)
        assert result.failed == 0, "".join(report)
    assert skipped >= 2


# --- three replica processes ----------------------------------------------------------


def _wait_for(what: Callable[[], bool], timeout: float, describe: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {describe}")
        time.sleep(0.02)


def test_a_replica_that_refuses_its_inputs_is_named_by_its_peers(ft):
    # Replica 1 passes a generator at the first round of diloco: it raises its own
    # TypeError; replica 0, whose check meets the refusal, names it instead of calling
    # the global copies different (the first-round check of the outer steps)
    def run(i: int, manager: Any) -> Any:
        reduce = avgfn.torchft.quorum_mean(manager)
        replica = avgfn.torchft.Replica(
            reduce, _averager("diloco", reduce), _initial_params(), step=PERIOD - 1  # a due step
        )
        params = replica.begin()
        try:
            replica.update((p for p in params.values()) if i == 1 else params)
            return "no error"
        except Exception as error:  # noqa: BLE001 - the outcome is the point
            kept = replica.params is params and replica.step == PERIOD - 1
            return (type(error).__name__, str(error), getattr(error, "refused_by", None), kept)

    outcome = _two_replicas(ft, "refuse", run)
    assert isinstance(outcome.get(0), tuple) and isinstance(outcome.get(1), tuple), outcome
    assert outcome[1][0] == "TypeError" and outcome[1][3], outcome
    kind, message, refused_by, kept = outcome[0]
    assert kind == "ReplicaMismatchError" and kept, outcome
    assert "refused the round" in message and "different global params" not in message, message
    assert refused_by is not None and len(refused_by) == 1, outcome


def _replica_main(cfg: dict[str, Any]) -> None:
    """One replica process: train, average over the quorum, log each round."""
    log = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    if os.environ.get("AVGFN_FT_LOG") == "info":
        import logging

        logging.basicConfig(level=logging.INFO)
    import torch.distributed as dist
    import torchft

    folder = Path(cfg["folder"])
    index, life = cfg["index"], cfg["life"]
    events = open(cfg["events"], "a", buffering=1)

    def emit(**record: Any) -> None:
        events.write(json.dumps(dict(record, time=round(time.time(), 3))) + "\n")

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = _manager(torchft, cfg["lighthouse"], f"replica{index}", store.port, min_replica_size=2)
    try:
        reduce = avgfn.torchft.quorum_mean(manager)
        replica = avgfn.torchft.Replica(reduce, _averager(cfg["algorithm"], reduce), _initial_params())
        (folder / f"ready-{index}-{life}").touch()
        healed = 0
        while replica.step < cfg["steps"]:
            step = replica.step
            if step == cfg["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            if reduce.quorum_due:
                if step in cfg["gates"]:
                    (folder / f"at-gate-{step}-{index}").touch()
                    gate = folder / f"gate-{step}"
                    _wait_for(gate.exists, 90, str(gate))
                if cfg["announce"] and replica.step == 0:
                    (folder / f"requesting-{index}-{life}").touch()
            params = replica.begin()
            if len(replica.healed_at) > healed:
                healed = len(replica.healed_at)
                emit(healed=replica.healed_at[-1])
            step = replica.step  # a heal moves it to the peer's
            before = int(replica.state.committed), int(replica.state.skipped)
            started = time.perf_counter()
            replica.update(_local_step(params, index, step))
            after = int(replica.state.committed), int(replica.state.skipped)
            if after != before:
                emit(step=step, committed=after[0] > before[0], participants=reduce.size,
                     ft_step=manager.current_step(), seconds=time.perf_counter() - started)  # fmt: skip
        emit(final=True, step=replica.step, ft_step=manager.current_step(),
             committed=int(replica.state.committed), skipped=int(replica.state.skipped),
             healed_at=replica.healed_at, params={k: v.tolist() for k, v in replica.params.items()})  # fmt: skip
    finally:
        manager.shutdown(wait=False)


def _status(address: str) -> str:
    with urllib.request.urlopen(address + "/status", timeout=5) as page:
        return page.read().decode()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _context() -> Any:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchft", "avgfn.torchft"])
    return context


def _reference(algorithm: str, steps: int, kill_at: int, rejoin: int) -> dict[int, Any]:
    """The run replayed in one process: the same rounds, means over the same quorums.

    Replicas 0, 1 and 2 until replica 2 dies before ``kill_at``; the first
    round after that is not committed (skipped on 0 and 1); from ``rejoin`` on,
    replica 2 holds a copy of replica 0's params and state and trains again.
    """
    answer: list[Callable[[torch.Tensor], torch.Tensor]] = [lambda t: t]
    avg = _averager(algorithm, lambda t: answer[0](t))
    start = _initial_params()
    held = {i: (start, avg.init(start)) for i in range(3)}
    skipped_one = False
    for step in range(steps):
        if step == kill_at:
            del held[2]
        if step == rejoin:
            held[2] = held[0]
        trained = {i: _local_step(p, i, step) for i, (p, _) in held.items()}
        sent: dict[int, torch.Tensor] = {}

        def record(t: torch.Tensor, i: int) -> torch.Tensor:
            sent[i] = t.clone()
            return t

        for i in held:  # a first pass to learn each replica's buffer (update is pure)
            answer[0] = lambda t, i=i: record(t, i)
            avg.update(trained[i], held[i][1], step)
        if not sent:
            held = {i: (trained[i], s) for i, (_, s) in held.items()}
            continue
        if step > kill_at and not skipped_one:
            skipped_one = True

            def decline(t: torch.Tensor) -> torch.Tensor:
                raise avgfn.RoundNotCommitted("the survivors lost replica 2 in this round")

            answer[0] = decline
        else:
            n = len(sent)
            mean = sum((sent[i] / n for i in sorted(sent)), torch.zeros_like(sent[0]))
            answer[0] = lambda t: mean.clone()
        held = {i: avg.update(trained[i], s, step) for i, (_, s) in held.items()}
    return held


@pytest.mark.parametrize("algorithm", sorted(SCENARIOS))
def test_three_replicas_lose_one_go_on_and_heal_it(ft, algorithm, tmp_path, monkeypatch):
    steps, kill_at, rejoin = SCENARIOS[algorithm]
    monkeypatch.setenv("RUST_LOG", os.environ.get("AVGFN_FT_LOG", "warn"))  # torchft's servers log every quorum at INFO
    server, address = _lighthouse(ft, min_replicas=2)
    context = _context()
    processes: list[Any] = []

    def launch(index: int, life: int, **changes: Any) -> Any:
        cfg = dict(
            algorithm=algorithm, index=index, life=life, steps=steps, kill_at=-1, gates=[0, rejoin],
            announce=False, lighthouse=address, folder=str(tmp_path),
            log=str(tmp_path / f"log-{index}-{life}.txt"), events=str(tmp_path / f"events-{index}-{life}.jsonl"),
        )  # fmt: skip
        cfg.update(changes)
        process = context.Process(target=_replica_main, args=(cfg,), daemon=True)
        process.start()
        processes.append(process)
        return process

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("log-*")))

    try:
        first = [launch(i, 0, kill_at=kill_at if i == 2 else -1) for i in range(3)]
        try:
            _wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 3, 120, "three replicas to start")
            # The first quorum: every replica heartbeats, so the Lighthouse waits for all three.
            _wait_for(lambda: "[3 heartbeating]" in _status(address), 30, "three heartbeats")
            (tmp_path / "gate-0").touch()
            _wait_for(lambda: not first[2].is_alive(), 60, "replica 2 to kill itself")
            _wait_for(lambda: all((tmp_path / f"at-gate-{rejoin}-{i}").exists() for i in (0, 1)), 60,
                      "the survivors to reach the rejoin gate")  # fmt: skip
            joiner = launch(2, 1, gates=[], announce=True)
            _wait_for((tmp_path / "requesting-2-1").exists, 60, "the restarted replica")
            # Its quorum request is registered (the survivors wait at the gate): open it.
            _wait_for(lambda: "only have 1 participants" in _status(address), 30, "the restarted replica's request")
            (tmp_path / f"gate-{rejoin}").touch()
            for process in (first[0], first[1], joiner):
                process.join(timeout=90)
                assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}\n{logs()}"
        except (TimeoutError, AssertionError) as error:
            raise AssertionError(f"{error}\n{logs()}") from error
        assert first[2].exitcode == -signal.SIGKILL
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
        server.shutdown()

    survivors = [_events(tmp_path / f"events-{i}-0.jsonl") for i in (0, 1)]
    victim = _events(tmp_path / "events-2-0.jsonl")
    rejoined = _events(tmp_path / "events-2-1.jsonl")
    rounds = [[e for e in log if "step" in e and "final" not in e] for log in survivors]
    lost = min(s for s in range(kill_at, steps) if s in {e["step"] for e in rounds[0]})
    for log in rounds:
        assert [e["step"] for e in log] == [e["step"] for e in rounds[0]]
        for e in log:
            if e["step"] < lost:
                assert (e["committed"], e["participants"]) == (True, 3), e
            elif e["step"] == lost:  # replica 2 died in this round's quorum
                assert (e["committed"], e["participants"]) == (False, 3), e
            elif e["step"] < rejoin:
                assert (e["committed"], e["participants"]) == (True, 2), e
            else:
                assert (e["committed"], e["participants"]) == (True, 3), e
    assert any(lost < e["step"] < rejoin for e in rounds[0])  # the two went on together
    assert all(e["step"] < kill_at for e in victim if "step" in e)
    assert rejoined[0]["healed"] == rejoin
    assert all(e["committed"] and e["participants"] == 3 for e in rejoined if "step" in e and "final" not in e)

    finals = [log[-1] for log in survivors] + [rejoined[-1]]
    assert all(f.get("final") and f["step"] == steps for f in finals)
    total = len(rounds[0])
    for f in finals:
        assert (f["committed"], f["skipped"]) == (total - 1, 1)
        assert f["ft_step"] == f["committed"]  # torchft's current_step counts the committed rounds
    assert finals[2]["healed_at"] == [rejoin]
    assert all(f["healed_at"] in ([], [0]) for f in finals[:2])  # init_sync heals at the first quorum
    # Every live replica holds the same params, bit for bit ...
    assert finals[0]["params"] == finals[1]["params"] == finals[2]["params"]
    # ... and they are those of the replay: committed rounds averaged over their quorum.
    expected = _reference(algorithm, steps, kill_at, rejoin)
    for i in expected:
        for k, value in expected[i][0].items():
            torch.testing.assert_close(torch.tensor(finals[0]["params"][k]), value, rtol=1e-5, atol=1e-6)
        assert int(expected[i][1].committed) == total - 1


# --- the example --------------------------------------------------------------------


def test_the_example_runs_and_heals(ft, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", RUST_LOG="warn", PYTHONPATH=str(ROOT))
    # A session of its own: on a timeout, its whole process group (the demo, its
    # forkserver and the replicas forked from it) is killed.
    # The command of the example's docstring (`python examples/torchft_diloco.py demo`),
    # with its summaries written here: 48 steps, replica 2 killed before step 48 // 3 + 1.
    demo = subprocess.Popen(
        [sys.executable, "examples/torchft_diloco.py", "demo", "--work-dir", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = demo.communicate(timeout=240)
    finally:
        try:
            os.killpg(demo.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        demo.wait(timeout=10)
    assert demo.returncode == 0, out[-4000:] + err[-4000:]
    assert "[replica 2] killing myself (SIGKILL) before step 17" in out, out
    assert re.search(r"^\[replica [01]\] step 19: round NOT committed \(\d in the quorum\)", out, re.M), out
    healed = re.search(r"^all 3 replicas hold the same params \(digest [0-9a-f]{12}\); "
                       r"replica 2 healed at step\(s\) \[(\d+)\]$", out, re.M)  # fmt: skip
    assert healed and 17 < int(healed[1]) < 48, out
    assert len(re.findall(r"^\[replica \d\] per round: quorum [0-9.]+ ms, round .* [0-9.]+ ms", out, re.M)) == 3, out
