"""The study's table, as text: quality and communication, one row per algorithm."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from avgfn.demo._study import MOMENTUM, Result, Task

__all__ = ["format_bytes", "format_ratio", "table"]


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
