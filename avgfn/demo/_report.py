"""The study's table, as text: quality and communication, one row per algorithm.

And the notes under it, which say why a curve does what a reader would not
expect (`find_overfitting()`, `explain()`), computed from the run.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Optional

import attrs

from avgfn.demo._study import MOMENTUM, Result, Task

__all__ = ["Overfitting", "explain", "find_overfitting", "format_bytes", "format_ratio", "table"]


def format_bytes(n: float) -> str:
    """Bytes in decimal units (kB = 1000 bytes), two decimals.

    Examples:
      >>> from avgfn.demo._report import format_bytes
      >>> format_bytes(999), format_bytes(35_880), format_bytes(17_222_400)
      ('999 B', '35.88 kB', '17.22 MB')
    """
    if n < 1000:
        return f"{n:.0f} B"
    for unit, size in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < size * 1000 or unit == "GB":
            return f"{n / size:.2f} {unit}"
    raise AssertionError("unreachable")


def format_ratio(baseline: int, n: int) -> str:
    """``n`` as a fraction of ``baseline``: ``1/16``, ``1/3.4``, ``1`` or ``2.0x``.

    Examples:
      >>> from avgfn.demo._report import format_ratio
      >>> format_ratio(480, 30), format_ratio(480, 143), format_ratio(480, 480), format_ratio(10, 0)
      ('1/16', '1/3.4', '1', '0')
    """
    if n == 0:
        return "0"
    if n == baseline:
        return "1"
    if n > baseline:
        return f"{n / baseline:.1f}x"
    ratio = baseline / n
    return f"1/{ratio:.0f}" if abs(ratio - round(ratio)) < 1e-9 else f"1/{ratio:.1f}"


HEADER = ("algorithm", "train loss", "train acc", "test loss", "test acc", "calls", "bytes/worker", "vs DP", "largest call")


def table(results: Sequence[Result], task: Task) -> str:
    """The table the demo prints, with its caption (what each algorithm did).

    ``vs DP`` compares the bytes with those of data parallel training on the
    same run (every gradient all-reduced at every step: ``steps`` calls of
    all the params), whether or not ``sync-dp`` is in the study.
    """
    config = task.config
    dp_bytes = config.steps * task.param_bytes
    rows = [HEADER]
    for r in results:
        rows.append(
            (
                r.name,
                f"{r.train_loss:.3f}",
                f"{r.train_acc:.1%}",
                f"{r.test_loss:.3f}",
                f"{r.test_acc:.1%}",
                str(r.ledger.total_calls),
                format_bytes(r.ledger.total_bytes),
                format_ratio(dp_bytes, r.ledger.total_bytes),
                format_bytes(r.ledger.peak),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    shard = task.shard_y.shape[1]
    caption = (
        f"Every worker starts from the same params and takes SGD steps (lr {config.lr:g}, momentum "
        f"{MOMENTUM:g}) on batches of {config.batch_size} from its own {shard} training images; "
        f"losses and accuracies are those of the mean of the {config.workers} workers' params, on "
        f"the {len(task.split.train_y) - len(task.split.train_y) % config.workers} training images "
        f"and the {len(task.split.test_y)} held-out ones. "
        f"calls and bytes/worker: the collective calls of one worker and the bytes it handed them "
        f"(a ring all-reduce moves about twice that); vs DP: those bytes against data parallel's "
        f"{format_bytes(dp_bytes)} ({config.steps} all-reduces of {task.num_params:,} float32 "
        f"params); largest call: the biggest single collective."
    )
    lines += ["", *textwrap.wrap(caption, 100), ""]
    width = max(len(r.name) for r in results)
    for r in results:
        line = f"  {r.name.ljust(width)}  {r.summary}"
        if len(r.ledger.calls) > 1:
            parts = ", ".join(
                f"{r.ledger.calls[label]} calls over {label} ({format_bytes(r.ledger.bytes[label])})"
                for label in r.ledger.calls
            )
            line += f"; {parts}"
        lines.append(line)
    return "\n".join(lines)


# --- why a curve does what it does ---------------------------------------------------------


@attrs.frozen
class Overfitting:
    """A held-out loss that rises past its minimum while the training loss keeps falling.

    Attributes:
      best_step, best_loss: the point where the held-out loss is lowest.
      end_step, end_loss: the last point.
      train_at_best, train_at_end: the training loss at those two points.
      acc_at_best, acc_at_end: the held-out accuracy at those two points.
    """

    best_step: int
    best_loss: float
    end_step: int
    end_loss: float
    train_at_best: float
    train_at_end: float
    acc_at_best: float
    acc_at_end: float


def find_overfitting(
    points: Sequence[tuple[int, float, float, float]], *, rise: float = 0.2, fall: float = 0.8
) -> Optional[Overfitting]:
    """Overfitting in a run's curve, or ``None``.

    Overfitting here: the held-out loss is lowest at some point, the last two
    points both lie more than ``rise`` (a fraction) above that minimum, and the
    training loss at the end is at most ``fall`` times what it was at the
    minimum. A single spike, or a rise shared by the training loss (a run that
    diverges), is not overfitting.

    Args:
      points: ``(step, test_loss, test_acc, train_loss)`` in step order.
      rise: how far above its minimum the held-out loss must end, relatively.
      fall: the most the training loss may keep of its value at the minimum.

    Examples:
      >>> from avgfn.demo._report import find_overfitting
      >>> test = [2.0, 0.5, 0.3, 0.25, 0.3, 0.35, 0.4]
      >>> train = [2.0, 0.4, 0.2, 0.1, 0.05, 0.02, 0.01]
      >>> points = [(16 * i, t, 0.9, tr) for i, (t, tr) in enumerate(zip(test, train))]
      >>> found = find_overfitting(points)
      >>> found.best_step, found.best_loss, found.end_step, found.train_at_end
      (48, 0.25, 96, 0.01)
      >>> find_overfitting(points[:5]) is None     # one point above the minimum is not enough
      True
    """
    if len(points) < 3:
        return None
    best = min(range(len(points)), key=lambda i: points[i][1])
    if best > len(points) - 3:
        return None
    step, loss, acc, train = points[best]
    end_step, end_loss, end_acc, end_train = points[-1]
    if min(points[-2][1], end_loss) <= loss * (1 + rise):
        return None
    if end_train > fall * train:
        return None
    return Overfitting(step, loss, end_step, end_loss, train, end_train, acc, end_acc)


def explain(results: Sequence[Result]) -> list[str]:
    """The notes the demo prints under its table: why a curve behaves as it does.

    One paragraph (wrapped lines) per algorithm whose held-out loss
    ``find_overfitting`` finds rising while its training loss falls; an empty
    list when there is none.
    """
    lines: list[str] = []
    for r in results:
        found = find_overfitting([(p[0], p[3], p[4], p[5]) for p in r.curve])
        if found is None:
            continue
        text = (
            f"{r.name}: overfitting. Its held-out loss is lowest at step {found.best_step} "
            f"({found.best_loss:.3f}) and rises to {found.end_loss:.3f} by step {found.end_step}, "
            f"while its training loss falls from {found.train_at_best:.3f} to "
            f"{found.train_at_end:.3f}."
        )
        accuracy = f"{found.acc_at_best:.1%} at step {found.best_step}, {found.acc_at_end:.1%} at the end"
        if found.acc_at_end >= found.acc_at_best - 0.01:
            text += (
                f" Its held-out accuracy does not drop ({accuracy}): the model grows more "
                "confident, and the few images it gets wrong cost more."
            )
        else:
            text += f" Its held-out accuracy drops too ({accuracy})."
        lines += textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    ")
    return lines
