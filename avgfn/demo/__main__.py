"""``python -m avgfn.demo``: compare averaging algorithms on W workers, then check one for real.

1. Trains a small MLP on the handwritten digits shipped with avgfn, once per
   algorithm, on ``--workers`` simulated workers (``avgfn.simulate`` under
   ``torch.func.vmap``), each worker on its own shard, counting its
   collective calls and bytes.
2. Prints a table (train and held-out loss/accuracy, calls, bytes per
   worker), notes on what a curve does that a reader would not expect (an
   algorithm that overfits: its held-out loss rising past its minimum while
   its training loss falls, found in the run's curves), and writes a figure
   (held-out loss against steps and bytes).
3. Runs one algorithm for real with ``torchrun`` on ``--torchrun-workers``
   gloo processes over loopback, and checks that their final params are those
   of a simulation of the same configuration (PASS / FAIL; exit code 1 on FAIL).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, TextIO

from avgfn.demo._progress import Progress
from avgfn.demo._study import ALGORITHMS, Config, algorithm, check_algorithm, make_task, run, run_study

DEFAULT = Config()
DEFAULT_ALGORITHMS = list(ALGORITHMS)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one algorithm")
    for name in names:
        try:
            algorithm(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an algorithm is named twice in {text!r}")
    return names


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be >= 1, got {text!r}")
    return widths


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m avgfn.demo``."""
    p = argparse.ArgumentParser(
        prog="python -m avgfn.demo",
        description=(
            "Compare averaging algorithms on simulated workers (quality against communication), "
            "then run one for real on gloo processes and check it against its simulation."
        ),
        epilog=(
            "algorithms: " + ", ".join(ALGORITHMS) + " (local-sgd-P averages every P steps, for any "
            "P >= 2). Example: python -m avgfn.demo --algorithms sync-dp,local-sgd-8,diloco "
            "--workers 4 --steps 960 --no-torchrun"
        ),
    )
    p.add_argument(
        "--algorithms", type=_names, default=DEFAULT_ALGORITHMS, metavar="A,B,...",
        help="comma-separated algorithms to compare (default: all of them, listed below, "
        "less any that cannot run on --workers)",
    )  # fmt: skip
    p.add_argument("--workers", type=_at_least(1), metavar="N", default=DEFAULT.workers, help="simulated workers (default %(default)s)")
    p.add_argument("--steps", type=_at_least(1), metavar="N", default=DEFAULT.steps, help="training steps (default %(default)s)")
    p.add_argument(
        "--batch-size", type=_at_least(1), default=DEFAULT.batch_size, metavar="N",
        help="mini-batch of each worker (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=DEFAULT.lr, help="inner SGD learning rate, momentum 0.9 (default %(default)s)")
    p.add_argument(
        "--hidden", type=_widths, default=DEFAULT.hidden, metavar="W1,W2,...",
        help="hidden layer widths of the MLP (default 64,64)",
    )  # fmt: skip
    p.add_argument(
        "--eval-every", type=_at_least(1), default=DEFAULT.eval_every, metavar="N",
        help="steps between two points of the curves (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, metavar="N", default=DEFAULT.seed, help="fixes split, init and batches (default %(default)s)")
    p.add_argument(
        "--out", type=Path, default=Path("out/demo.png"), metavar="PATH",
        help="where to write the figure, a PNG (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--no-torchrun", action="store_true", help="skip the real run on gloo processes")
    p.add_argument(
        "--torchrun-algorithms", default=["diloco"], type=_names, metavar="A,B,...",
        help="the algorithms of the real run, one after the other (default diloco)",
    )  # fmt: skip
    p.add_argument(
        "--torchrun-workers", type=_at_least(1), default=4, metavar="N",
        help="gloo processes of the real run (default %(default)s)",
    )  # fmt: skip
    return p


def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """Run the demo; return the exit code (1 when the real run does not match)."""
    out = sys.stdout if stdout is None else stdout
    args = parser().parse_args(argv)
    started = time.perf_counter()

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    try:
        config = Config(
            workers=args.workers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            hidden=args.hidden, seed=args.seed, eval_every=args.eval_every,
        )  # fmt: skip
        names = list(args.algorithms)
        skipped = []
        for name in list(names):
            try:
                check_algorithm(name, config.workers)
            except ValueError:
                if args.algorithms is not DEFAULT_ALGORITHMS:
                    raise  # asked for by name: refuse
                names.remove(name)  # part of the default set: leave it out, say why
                skipped.append(name)
        if not args.no_torchrun:
            for name in args.torchrun_algorithms:
                check_algorithm(name, args.torchrun_workers)
        task = make_task(config)
        shard = task.shard_y.shape[1]
        say(
            f"avgfn demo: {len(names)} algorithms x {config.workers} simulated workers x "
            f"{config.steps} steps on the handwritten digits ({len(task.split.train_y)} training "
            f"images, {shard} per worker; {len(task.split.test_y)} held out)"
        )
        say(
            f"model: MLP 64-{'-'.join(map(str, config.hidden))}-10 (tanh), {task.num_params:,} "
            f"float32 params = {task.param_bytes:,} bytes"
        )
        for name in skipped:
            say(f"{name} left out: it cannot run on {config.workers} workers (see --help)")
        progress = Progress(config.steps * len(names), stream=stderr)
        _, results = run_study(names, config, progress=progress)
        progress.close()
    except ValueError as error:
        print(f"python -m avgfn.demo: error: {error}", file=sys.stderr if stderr is None else stderr)
        return 2
    study_seconds = time.perf_counter() - started
    from avgfn.demo._report import explain, table

    say()
    say(table(results, task))
    say()
    notes = explain(results)
    if notes:
        say("Why a curve does what it does:")
        for line in notes:
            say(line)
        say()
    from avgfn.demo._plot import plot

    no_figure = plot(results, task, args.out)
    if no_figure is None:
        say(f"figure: {args.out.resolve()}")
    else:
        say(f"figure skipped: {no_figure}")
    say(f"study: {study_seconds:.1f} s")
    if args.no_torchrun:
        return 0

    from avgfn.demo._real import compare, real_run

    names, workers = args.torchrun_algorithms, args.torchrun_workers
    real_config = Config(
        workers=workers, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        hidden=config.hidden, seed=config.seed, eval_every=config.steps,
    )  # fmt: skip
    say()
    say(
        f"real run: {', '.join(names)} on {workers} gloo processes (torchrun over 127.0.0.1), "
        f"{config.steps} steps, against a {workers}-replica simulation of the same configuration"
    )
    real_started = time.perf_counter()
    try:
        real = real_run(names, real_config)
    except (RuntimeError, ValueError) as error:
        say(f"FAIL: the real run did not complete: {error}")
        return 1
    real_seconds = time.perf_counter() - real_started
    loops = sum(max(out["seconds"] for out in real[name]) for name in names)
    say(f"  torchrun: {real_seconds:.1f} s ({loops:.1f} s of it training, the rest start-up)")
    passed = True
    real_task = make_task(real_config)
    for name in names:
        simulated = run(name, real_task)
        result = compare(real[name], simulated)
        passed &= result.ok
        calls, sent = sum(real[name][0]["calls"].values()), sum(real[name][0]["bytes"].values())
        ledger = "same as simulated" if result.ledgers_match else (
            f"MISMATCH: simulated {simulated.ledger.total_calls} calls, "
            f"{simulated.ledger.total_bytes:,} bytes"
        )
        say(
            f"  {name}: {calls} collective calls and {sent:,} bytes per rank ({ledger}); "
            f"largest |real - simulated| over every param of every rank {result.max_abs_diff:.2e} "
            f"(params up to {result.param_scale:.2f}; tolerance {result.tolerance:.0e}): "
            + ("ok" if result.ok else "DIFFERENT")
        )
    total = time.perf_counter() - started
    if passed:
        say(
            f"PASS: the {workers} real processes end with the params of the {workers}-replica "
            f"simulation, within float32 rounding of the summation order  (total {total:.1f} s)"
        )
        return 0
    say(f"FAIL: the real run and the simulation differ  (total {total:.1f} s)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
