"""A progress bar on stderr for long CLI steps (no dependency: tqdm is not one of ptmserve's)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``done/total`` of a named step with a bar, the elapsed time and an estimate of what is left.

    On a terminal the line is redrawn in place; elsewhere (logs, tests) it is written about every 10%.
    Call ``advance(n)`` as work completes and ``close()`` at the end.
    """

    def __init__(self, what: str, total: int, *, unit: str = "", stream: TextIO | None = None) -> None:
        self.what = what
        self.total = max(0, total)
        self.unit = unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._shown = -1  # the last tenth written (not a terminal)
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
        elif self._shown < 10:
            self._write(self._line())
        self._stream.flush()

    def _line(self) -> str:
        width = 24
        share = self.done / self.total if self.total else 1.0
        filled = int(share * width)
        elapsed = time.monotonic() - self._started
        left = elapsed / share - elapsed if share > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.what}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}{unit} "
            f"{share:4.0%} {elapsed:6.1f} s (about {left:.0f} s left)"
        )

    def _draw(self) -> None:
        if self._tty:
            self._stream.write("\r" + self._line())
            self._stream.flush()
            return
        tenth = int(10 * self.done / self.total) if self.total else 10
        if tenth > self._shown:
            self._shown = tenth
            self._write(self._line())

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
