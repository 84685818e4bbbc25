"""The export's progress on stderr: a bar redrawn in place on a terminal, else a line now
and then (logs and pipes keep every line, so a redraw would flood them).

The share done is the time range's: rows come in time order, so the last row's time
against the span from the first row's time to the range's end is an estimate that costs
nothing, where a ``count(*)`` would read the range twice. It reads low when the data
stops before ``--to``; the summary gives the exact count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


def time_fraction(first_ms: int, last_ms: int, end_ms: int) -> float:
    """Share of [first_ms, end_ms) covered once the row at ``last_ms`` is out, in [0, 1]."""
    if end_ms <= first_ms:
        return 1.0
    return min(1.0, max(0.0, (last_ms - first_ms) / (end_ms - first_ms)))


def render(rows: int, elapsed_s: float, fraction: float | None, bar: bool, width: int = 24) -> str:
    rate = rows / elapsed_s if elapsed_s > 0 else 0.0
    text = f"{rows:,} rows, {rate:,.0f} rows/s"
    if fraction is None:
        return text
    if not bar:
        return f"{text}, {fraction:.0%} of the time range"
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}  {text}"


class Progress:
    """``update`` after each batch; draws at most every ``every_s``; ``finish`` draws the
    last state (a terminal's bar then ends its line)."""

    def __init__(self, out: TextIO, tty: bool, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = tty
        self.label = label
        self.clock = clock
        self.started = clock()
        self.every_s = 0.2 if tty else 5.0
        self.last_draw = self.started
        self.rows = 0
        self.fraction: float | None = None

    def start(self) -> None:
        """The clock starts here (rows/s leaves out the time to reach the database)."""
        self.started = self.last_draw = self.clock()

    def update(self, rows: int, fraction: float | None) -> None:
        self.rows, self.fraction = rows, fraction
        now = self.clock()
        if now - self.last_draw >= self.every_s:
            self.last_draw = now
            self._draw(now)

    def finish(self) -> float:
        """Draws the end state on a terminal; returns the seconds since the start."""
        now = self.clock()
        if self.tty:
            self.fraction = 1.0
            self._draw(now)
            self.out.write("\n")
            self.out.flush()
        return now - self.started

    def abort(self) -> None:
        """Ends a half-drawn bar's line, so an error message starts on a line of its own."""
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def _draw(self, now: float) -> None:
        line = f"{self.label}: {render(self.rows, now - self.started, self.fraction, self.tty)}"
        # \r and the erase-to-end-of-line code redraw the bar in place.
        self.out.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.out.flush()
