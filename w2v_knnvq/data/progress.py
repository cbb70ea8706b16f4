"""A one-line progress report on stderr for long scans and corpus builds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Reports ``done/total`` for a named task.

    On a terminal the line is redrawn in place; in a log file a line is written at most
    every ``interval`` seconds so the log stays short.
    """

    _task: str
    _total: int
    _stream: TextIO
    _interval: float
    _last_report: float

    def __init__(self, task: str, total: int, *, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self._task = task
        self._total = total
        self._stream = sys.stderr if stream is None else stream
        self._interval = interval
        self._last_report = -float("inf")

    def update(self, done: int) -> None:
        """Reports that ``done`` of the ``total`` items are finished."""
        is_last = done >= self._total

        interactive = self._stream.isatty()

        now = time.monotonic()

        # A terminal redraws cheaply, but still at most ten times a second.
        min_gap = 0.1 if interactive else self._interval

        if not is_last and now - self._last_report < min_gap:
            return

        self._last_report = now

        percent = 100.0 * done / self._total if self._total > 0 else 100.0

        line = f"{self._task}: {done}/{self._total} ({percent:.0f}%)"

        if interactive:
            self._stream.write(f"\r{line}" + ("\n" if is_last else ""))
        else:
            self._stream.write(line + "\n")

        self._stream.flush()
