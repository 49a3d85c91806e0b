"""DiLoCo over a torchft quorum: a replica dies, the others go on, it comes back and heals.

Try it on one machine (``pip install 'avgfn[torchft]'`` first)::

    python examples/torchft_diloco.py demo

The demo starts a torchft Lighthouse and three replicas. Replica 2 SIGKILLs
itself at ``--kill-at``; the survivors' round fails (that round is skipped:
params and DiLoCo state unchanged), they form a quorum of two and go on, and
the demo starts replica 2 again as a scheduler would. It joins the next
quorum, receives a peer's params, DiLoCo state and step (torchft's healing),
and trains in step with the others. At the end every replica prints a digest
of its params, and the demo checks that they are all the same.

On several machines, start one Lighthouse for the job, then one replica
process per machine, with HOST the Lighthouse's machine (each replica here is
one process; torchft also runs replica groups of several ranks):

    RUST_LOG=warn torchft_lighthouse --min_replicas 2 --bind 0.0.0.0:29510 \\
        --join_timeout_ms 10000 --heartbeat_timeout_ms 2000
    python examples/torchft_diloco.py replica --index 0 --lighthouse http://HOST:29510
    python examples/torchft_diloco.py replica --index 1 --lighthouse http://HOST:29510
    python examples/torchft_diloco.py replica --index 2 --lighthouse http://HOST:29510

Kill any replica (``kill -9``) and start it again with the same command: it
heals from the others. Each replica prints its rounds (committed or skipped,
and over how many participants), what a quorum, a round and a heal cost in
milliseconds, and avgfn's own share of a round (the same DiLoCo step with a
Reduce of one).

The avgfn side is the same averager as everywhere else:
``avgfn.diloco(period, reduce=avgfn.torchft.quorum_mean(manager))``, wrapped
in ``avgfn.torchft.skip_uncommitted`` and driven by ``avgfn.torchft.Replica``
(see ``docs/torchft.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import avgfn
import avgfn.torchft

FEATURES, HIDDEN, OUTPUTS = 16, 32, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("demo", "replica"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=48, help="training steps (default 48)")
        p.add_argument("--period", type=int, default=4, help="local steps between rounds (default 4)")
        p.add_argument("--lr", type=float, default=0.05, help="inner SGD learning rate (default 0.05)")
        p.add_argument("--timeout", type=float, default=5.0,
                       help="seconds a collective waits for its peers (default 5)")  # fmt: skip
        p.add_argument("--kill-at", type=int, default=None,
                       help="SIGKILL this replica before this step (demo: the last replica; "
                            "default a third of the way, steps // 3 + 1)")  # fmt: skip
        p.add_argument("--work-dir", default=None, help="where to write each replica's summary (JSON)")
    replica = sub.choices["replica"]
    replica.add_argument("--index", type=int, required=True, help="this replica's number (its data shard)")
    replica.add_argument("--lighthouse", required=True, help="the Lighthouse's address, http://HOST:PORT")
    replica.add_argument("--min-replicas", type=int, default=2, help="the fewest replicas that commit a round")
    demo = sub.choices["demo"]
    demo.add_argument("--replicas", type=int, default=3, help="how many replicas (default 3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.period < 1 or args.timeout <= 0:
        parser.error("need --steps >= 1, --period >= 1 and --timeout > 0")
    return args


def say(line: str) -> None:
    """Print one line in a single write, so that the lines of two replicas never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def digest(params: dict[str, torch.Tensor]) -> str:
    """A checksum of the exact bits of the params (equal bits, equal digest)."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(bytes(params[name].detach().contiguous().view(torch.uint8).reshape(-1).tolist()))
    return h.hexdigest()[:12]


def initial_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # every replica builds the same model
    return {
        "w1": torch.randn(FEATURES, HIDDEN, generator=g) / FEATURES**0.5,
        "b1": torch.zeros(HIDDEN),
        "w2": torch.randn(HIDDEN, OUTPUTS, generator=g) / HIDDEN**0.5,
        "b2": torch.zeros(OUTPUTS),
    }


def batch(index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``index``'s batch at ``step`` (its shard of a regression task)."""
    teacher = torch.randn(FEATURES, OUTPUTS, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(10_000 * index + step)
    x = torch.randn(32, FEATURES, generator=g)
    return x, torch.tanh(x @ teacher) + 0.05 * index


def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return ((hidden @ params["w2"] + params["b2"] - y) ** 2).mean()


def train_step(params: dict[str, torch.Tensor], index: int, step: int, lr: float) -> dict[str, torch.Tensor]:
    """One inner SGD step, out of place (the params handed in are never written)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss_of(leaves, *batch(index, step)), list(leaves.values()))
    return {k: (params[k] - lr * g).detach() for k, g in zip(params, grads)}


def make_averager(period: int, reduce: Any) -> avgfn.Averager:
    """DiLoCo with the paper's outer step: Nesterov SGD, lr 0.7, momentum 0.9."""
    return avgfn.diloco(
        period, reduce=reduce, outer_optimizer=avgfn.optim.sgd(0.7, momentum=0.9, nesterov=True)
    )


def own_share_ms(period: int) -> float:
    """avgfn's own cost of a DiLoCo round, with a Reduce of one (no communication): best of 20."""
    avg = make_averager(period, lambda t: t)
    params = initial_params()
    state = avg.init(params)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        params, state = avg.update(params, state, period - 1)
        times.append(time.perf_counter() - started)
    return 1000 * min(times)  # the replicas measure at the same time: the least disturbed call


def run_replica(args: argparse.Namespace) -> int:
    """One replica: its own TCPStore and Manager, DiLoCo over the quorum, a line per round."""
    import torch.distributed as dist
    import torchft

    torch.set_num_threads(1)
    logging.getLogger("torchft").setLevel(logging.CRITICAL)  # this loop reports what happens
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # torchft's heal
    me = f"[replica {args.index}]"
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = torchft.Manager(
        pg=torchft.ProcessGroupGloo(timeout=timedelta(seconds=args.timeout)),
        load_state_dict=None,  # avgfn.torchft.Replica registers its own
        state_dict=None,
        min_replica_size=args.min_replicas,
        use_async_quorum=False,  # heal in Replica.begin(), before training on stale params
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica{args.index}",
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        hostname="127.0.0.1",
        timeout=timedelta(seconds=max(10.0, 2 * args.timeout)),
        quorum_timeout=timedelta(seconds=60),
        connect_timeout=timedelta(seconds=10),
    )
    try:
        reduce = avgfn.torchft.quorum_mean(manager)
        avg = avgfn.torchft.skip_uncommitted(make_averager(args.period, reduce))
        replica = avgfn.torchft.Replica(reduce, avg, initial_params())
        quorums, rounds, off_steps, joins = [], [], [], []
        while replica.step < args.steps:
            if replica.step == args.kill_at:
                say(f"{me} killing myself (SIGKILL) before step {replica.step}")
                os.kill(os.getpid(), signal.SIGKILL)
            due, healed = replica.reduce.quorum_due, len(replica.healed_at)
            started = time.perf_counter()
            params = replica.begin()
            if due:
                (joins if len(replica.healed_at) > healed else quorums).append(time.perf_counter() - started)
            if len(replica.healed_at) > healed:
                say(f"{me} healed at step {replica.step}: params, DiLoCo state and step from a peer "
                    f"({1000 * joins[-1]:.0f} ms in the quorum that healed it)")  # fmt: skip
            step = replica.step
            params = train_step(params, args.index, step, args.lr)
            before = int(replica.state.committed), int(replica.state.skipped)
            started = time.perf_counter()
            replica.update(params)
            spent = time.perf_counter() - started
            after = int(replica.state.committed), int(replica.state.skipped)
            if after == before:
                off_steps.append(spent)
            elif after[0] > before[0]:
                rounds.append(spent)
                say(f"{me} step {step}: round committed by {reduce.size} replicas ({1000 * spent:.1f} ms)")
            else:
                cause = str(manager.errored() or "the vote said no").splitlines()[0]
                cause = re.sub(r"^\[[^\]]*\] ", "", cause)[:90]  # gloo prefixes its source file
                say(f"{me} step {step}: round NOT committed ({reduce.size} in the quorum): skipped, "
                    f"params and state kept ({cause})")  # fmt: skip
        x, y = batch(args.index, args.steps)
        summary = {
            "index": args.index,
            "digest": digest(replica.params),
            "committed": int(replica.state.committed),
            "skipped": int(replica.state.skipped),
            "torchft_step": manager.current_step(),
            "healed_at": replica.healed_at,
            "loss": float(loss_of(replica.params, x, y)),
        }
        ms = lambda xs: f"{1000 * statistics.median(xs):.2f} ms" if xs else "-"  # noqa: E731
        say(f"{me} done at step {replica.step}: {summary['committed']} rounds committed, "
            f"{summary['skipped']} skipped (torchft current_step {summary['torchft_step']}), "
            f"loss {summary['loss']:.4f}, params digest {summary['digest']}")  # fmt: skip
        say(f"{me} per round: quorum {ms(quorums)}, round (agree + all-reduce + vote + outer step) "
            f"{ms(rounds)}, avgfn's own share {own_share_ms(args.period):.2f} ms, step without a round "
            f"{ms(off_steps)}; a quorum that healed this replica {ms(joins)}")  # fmt: skip
        if args.work_dir:
            path = Path(args.work_dir) / f"replica{args.index}.json"
            path.write_text(json.dumps(summary))
        return 0
    finally:
        manager.shutdown(wait=False)


def _child(args: argparse.Namespace) -> None:
    sys.exit(run_replica(args))


def run_demo(args: argparse.Namespace) -> int:
    """A Lighthouse in this process, replicas forked from a server that imported torch once."""
    from torchft.coordination import LighthouseServer

    if args.replicas < 2:
        raise SystemExit("--replicas must be >= 2")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="torchft-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    kill_at = (args.steps // 3 + 1) if args.kill_at is None else args.kill_at
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, join_timeout_ms=10_000,
                                  heartbeat_timeout_ms=2_000)  # fmt: skip
    address = "http://127.0.0.1:" + lighthouse.address().rsplit(":", 1)[1]
    say(f"Lighthouse at {address}; {args.replicas} replicas, replica {args.replicas - 1} dies before "
        f"step {kill_at} and is started again")  # fmt: skip
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchft", "avgfn.torchft"])

    def start(index: int, kill: int | None) -> Any:
        replica_args = argparse.Namespace(**{**vars(args), "mode": "replica", "index": index,
            "lighthouse": address, "min_replicas": 2, "kill_at": kill, "work_dir": str(work)})  # fmt: skip
        process = context.Process(target=_child, args=(replica_args,), daemon=True)
        process.start()
        return process

    last = args.replicas - 1
    processes = [start(i, kill_at if i == last else None) for i in range(args.replicas)]
    restarted = kill_at >= args.steps  # no death, no restart
    deadline = time.monotonic() + 300
    try:
        while any(p.is_alive() for p in processes) or not restarted:
            if time.monotonic() > deadline:
                say("the demo did not finish in 300 s")
                return 1
            if not restarted and processes[last].exitcode == -signal.SIGKILL:
                say(f"replica {last} died (SIGKILL); starting it again")
                processes[last] = start(last, None)
                restarted = True
            for p in processes:
                if p.exitcode not in (None, 0, -signal.SIGKILL):
                    say(f"a replica failed with exit code {p.exitcode}")
                    return 1
            time.sleep(0.05)
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        lighthouse.shutdown()
    if any(p.exitcode != 0 for p in processes):
        say(f"exit codes: {[p.exitcode for p in processes]}")
        return 1
    summaries = [json.loads((work / f"replica{i}.json").read_text()) for i in range(args.replicas)]
    digests = {s["digest"] for s in summaries}
    if len(digests) != 1:
        say(f"the replicas differ: {[s['digest'] for s in summaries]}")
        return 1
    say(f"all {args.replicas} replicas hold the same params (digest {digests.pop()}); "
        f"replica {last} healed at step(s) {summaries[last]['healed_at']}")  # fmt: skip
    return 0


def main() -> int:
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's servers log every quorum at INFO
    args = parse_args()
    return run_demo(args) if args.mode == "demo" else run_replica(args)


if __name__ == "__main__":
    sys.exit(main())
