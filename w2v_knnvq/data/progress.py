"""Progress bars for long scans, extractions and corpus builds (tqdm on stderr)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class ProgressLine:
    """Reports ``done/total`` for a named task with a tqdm bar.

    On a terminal the bar is redrawn in place; in a log file it is written at most every
    ``interval`` seconds so the log stays short.
    """

    def __init__(self, task: str, total: int, *, stream: TextIO | None = None, interval: float = 5.0) -> None:
        stream = sys.stderr if stream is None else stream

        self._bar = tqdm(
            total=total,
            desc=task,
            file=stream,
            mininterval=0.1 if stream.isatty() else interval,
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, done: int) -> None:
        """Reports that ``done`` of the ``total`` items are finished."""
        self._bar.update(done - self._bar.n)

        if self._bar.total is not None and done >= self._bar.total:
            self._bar.close()
