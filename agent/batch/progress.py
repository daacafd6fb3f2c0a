"""The progress display on stderr: a redrawn bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

from agent.batch.plan import progress_text

_TTY_EVERY_S = 0.2
_PLAIN_EVERY_S = 10.0


class Progress:
    def __init__(self, out: TextIO, total: int | None, mode: str = "auto") -> None:
        self._out = out
        self._total = total
        tty = out.isatty() if mode == "auto" else mode == "bar"
        self._tty = tty
        self._off = mode == "none"
        self._start = time.monotonic()
        self._last = self._start  # the first line after one interval, not at once
        self._base_rows = 0
        self._base_fraction: float | None = None
        self._drawn = False

    def begin(self, rows_done: int, fraction: float | None = None) -> None:
        """Rows already done before this run (they do not count for rows/s)."""
        self._base_rows = rows_done
        self._base_fraction = fraction

    def update(self, rows: int, fraction: float | None = None, final: bool = False) -> None:
        if self._off:
            return
        now = time.monotonic()
        if not final and now - self._last < (_TTY_EVERY_S if self._tty else _PLAIN_EVERY_S):
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = (rows - self._base_rows) / elapsed
        eta: float | None = None
        if self._total is not None and rate > 0:
            eta = max(self._total - rows, 0) / rate
        elif fraction is not None:
            base = self._base_fraction or 0.0
            if fraction > base:
                eta = elapsed * (1 - fraction) / (fraction - base)
        if final:
            eta = 0.0
        width = 30 if self._tty else 0
        text = progress_text(rows, self._total, fraction, rate, eta, width)
        if self._tty:
            self._out.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self._out.write("edge-agent batch: " + text + "\n")
        self._out.flush()
        self._drawn = not final

    def message(self, text: str) -> None:
        if self._drawn and self._tty:
            self._out.write("\n")
            self._drawn = False
        self._out.write(f"edge-agent batch: {text}\n")
        self._out.flush()
