"""The study's figure: held-out loss against steps and against bytes communicated.

Drawn with matplotlib's Agg canvas directly (no ``pyplot``, no global backend
switch, no display needed). matplotlib is the ``demo`` extra of avgfn
(``pip install 'avgfn[demo]'``); without it `plot()` says so and draws
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from avgfn.demo._study import Result, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MISSING", "figure", "plot", "style"]

MISSING = "matplotlib is not installed (pip install 'avgfn[demo]')"

# Line styles and markers, combined with the colours C0..C9, so that lines that lie on top
# of each other (local-sgd-4 and hierarchical send the same bytes) can still be told apart.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def style(index: int) -> dict[str, str]:
    """The colour, line style and marker of the ``index``-th line (all distinct up to 40).

    Examples:
      >>> from avgfn.demo._plot import style
      >>> style(0), style(5)
      ({'color': 'C0', 'linestyle': '-', 'marker': 'o'}, {'color': 'C5', 'linestyle': '--', 'marker': 'P'})
    """
    return {
        "color": f"C{index % 10}",
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "marker": MARKERS[index % len(MARKERS)],
    }


def _marks(points: int, index: int) -> tuple[int, int]:
    """``markevery`` for about 8 markers on a line of ``points``, shifted by the line's index.

    Two lines drawn on top of each other then show both their markers.
    """
    every = max(1, points // 8)
    return (index % every, every)


def figure(results: Sequence[Result], task: Task) -> Figure:
    """The study's figure, a matplotlib ``Figure`` on an Agg canvas (matplotlib must be installed).

    Left: the held-out loss of the workers' mean params against the training
    step. Right: the same loss against the bytes each worker has handed to
    its collectives so far (log scale). One line per algorithm, in the same
    colour, line style and marker in both panels, each panel with its legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    config = task.config
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_bytes = fig.subplots(1, 2, sharey=True)
    for index, r in enumerate(results):
        steps = [p[0] for p in r.curve]
        sent = [p[2] for p in r.curve]
        loss = [p[3] for p in r.curve]
        look = dict(style(index), linewidth=1.4, markersize=4, label=r.name)
        by_step.plot(steps, loss, markevery=_marks(len(steps), index), **look)
        # A curve in bytes starts at the first point with any traffic (log axis).
        points = [(b, v) for b, v in zip(sent, loss) if b > 0]
        if points:
            by_bytes.plot(
                [b for b, _ in points], [v for _, v in points],
                markevery=_marks(len(points), index), **look,
            )  # fmt: skip
    by_step.set_xlabel("training step")
    by_step.set_ylabel("held-out loss (mean of the workers' params)")
    by_step.set_yscale("log")
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("bytes communicated per worker")
    for axes in (by_step, by_bytes):
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8)
    fig.suptitle(
        f"{config.workers} workers, handwritten digits, batch {config.batch_size} per worker: "
        "held-out loss against steps and against communication",
        fontsize=10,
    )
    return fig


def plot(results: Sequence[Result], task: Task, path: Union[str, Path]) -> Optional[str]:
    """Write ``figure(results, task)`` to ``path`` (a PNG); return ``None``, or why it was skipped.

    Returns:
      ``None`` when the figure was written; otherwise the reason it was not
      (matplotlib missing).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING
    fig = figure(results, task)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return None
