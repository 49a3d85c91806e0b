"""The study's figure: held-out loss against steps and against bytes communicated.

Drawn with matplotlib's Agg canvas directly (no ``pyplot``, no global backend
switch, no display needed). matplotlib is the ``demo`` extra of avgfn
(``pip install 'avgfn[demo]'``); without it `plot()` says so and draws
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from avgfn.demo._study import Result, Task

__all__ = ["MISSING", "plot"]

MISSING = "matplotlib is not installed (pip install 'avgfn[demo]')"


def plot(results: Sequence[Result], task: Task, path: Union[str, Path]) -> Optional[str]:
    """Write the figure to ``path`` (a PNG); return ``None``, or why it was skipped.

    Left: the held-out loss of the workers' mean params against the training
    step. Right: the same loss against the bytes each worker has handed to
    its collectives so far (log scale). One line per algorithm.

    Returns:
      ``None`` when the figure was written; otherwise the reason it was not
      (matplotlib missing).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return MISSING
    config = task.config
    figure = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    by_step, by_bytes = figure.subplots(1, 2, sharey=True)
    for r in results:
        steps = [p[0] for p in r.curve]
        sent = [p[2] for p in r.curve]
        loss = [p[3] for p in r.curve]
        (line,) = by_step.plot(steps, loss, label=r.name, linewidth=1.6)
        # A curve in bytes starts at the first point with any traffic (log axis).
        points = [(b, v) for b, v in zip(sent, loss) if b > 0]
        if points:
            by_bytes.plot(
                [b for b, _ in points], [v for _, v in points],
                color=line.get_color(), linewidth=1.6,
            )  # fmt: skip
    by_step.set_xlabel("training step")
    by_step.set_ylabel("held-out loss (mean of the workers' params)")
    by_step.set_yscale("log")
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("bytes communicated per worker")
    for axes in (by_step, by_bytes):
        axes.grid(True, which="major", alpha=0.3)
    by_step.legend(fontsize=8)
    figure.suptitle(
        f"{config.workers} workers, handwritten digits, batch {config.batch_size} per worker: "
        "held-out loss against steps and against communication",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return None
