"""Text progress bars for the command line: the rollout's per-wave bars and the
byte counters of ``publish`` (one line per phase, redrawn in place on a terminal).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TextIO

BAR_WIDTH: Final = 24
REDRAW_INTERVAL_S: Final = 0.1


def bar(done: int, total: int, failed: int = 0, width: int = BAR_WIDTH) -> str:
    """``[####xx....]``: ``done`` (#) and ``failed`` (x) out of ``total``."""
    total = max(total, 1)
    done = max(0, min(done, total))
    full = round(width * done / total)
    bad = min(width - full, round(width * failed / total)) if failed else 0
    return "[" + "#" * full + "x" * bad + "." * (width - full - bad) + "]"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class ByteProgress:
    """Progress of a byte-counting job with phases, e.g. ``verify`` then ``copy``.

    ``update(phase, done, total)`` redraws the phase's line in place (``\\r``) at
    most every ``interval_s``, and always when the phase completes; a new phase
    starts a new line. Meant for a terminal only: the caller decides whether to
    create one (scripts reading a pipe get no progress output at all).
    """

    def __init__(
        self,
        stream: TextIO,
        label: str,
        interval_s: float = REDRAW_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.label = label
        self.interval_s = interval_s
        self.clock = clock
        self._phase: str | None = None
        self._last: tuple[int, int] = (0, 0)
        self._drawn_at = float("-inf")
        self._dirty = False  # an update not drawn yet

    def _draw(self) -> None:
        done, total = self._last
        percent = 100.0 * done / total if total else 100.0
        self.stream.write(
            f"\r{self._phase:<7} {self.label} {bar(done, total)} "
            f"{human_bytes(done)} / {human_bytes(total)} {percent:3.0f}%\x1b[K"
        )
        self.stream.flush()
        self._drawn_at = self.clock()
        self._dirty = False

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self.close()
            self._phase = phase
            self._drawn_at = float("-inf")
        self._last = (done, total)
        self._dirty = True
        if done >= total or self.clock() - self._drawn_at >= self.interval_s:
            self._draw()

    def close(self) -> None:
        """End the current line (drawn as it stands), e.g. before an error message."""
        if self._phase is not None:
            if self._dirty:
                self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._phase = None
