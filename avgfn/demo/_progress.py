"""A one-line progress bar on stderr, redrawn in place with a carriage return."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """Count steps towards ``total`` and draw ``label [#####.....] 40% 12.3s``.

    On a terminal the line is redrawn in place (at most every ``interval``
    seconds); elsewhere (a log file, a pipe) only `note()` lines and the
    final line are written, so logs stay readable.

    Args:
      total: the number of steps of the whole run, ``>= 1``.
      stream: where to draw; ``None`` for ``sys.stderr``.
      width: the bar's width in characters.
      interval: the least time between two redraws, in seconds.

    Examples:
      >>> import io
      >>> from avgfn.demo import Progress
      >>> out = io.StringIO()
      >>> bar = Progress(4, stream=out, width=8)
      >>> for _ in range(4):
      ...     bar.advance("sync-dp")
      >>> bar.close()
      >>> out.getvalue().splitlines()[-1].startswith("sync-dp [########] 100%")
      True
    """

    def __init__(
        self, total: int, *, stream: Optional[TextIO] = None, width: int = 30, interval: float = 0.1
    ) -> None:
        if total < 1:
            raise ValueError(f"Progress: total must be >= 1, got {total}")
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.interval = interval
        self.done = 0
        self.label = ""
        self.started = time.monotonic()
        self._drawn = 0.0
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())

    def _line(self) -> str:
        frac = min(self.done / self.total, 1.0)
        filled = round(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {frac:4.0%} {time.monotonic() - self.started:5.1f}s"

    def advance(self, label: str, steps: int = 1) -> None:
        """Count ``steps`` more steps of the part named ``label``; redraw if due."""
        self.done += steps
        self.label = label
        now = time.monotonic()
        if self.live and (now - self._drawn >= self.interval or self.done >= self.total):
            self._drawn = now
            self.stream.write("\r" + self._line().ljust(self.width + 40))
            self.stream.flush()

    def note(self, text: str) -> None:
        """Write a line of its own (the bar, if live, is redrawn after it)."""
        if self.live:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
        self.stream.write(text + "\n")
        if self.live:
            self.stream.write(self._line())
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        prefix = "\r" if self.live else ""
        self.stream.write(prefix + self._line().ljust(self.width + 40).rstrip() + "\n")
        self.stream.flush()
