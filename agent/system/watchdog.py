"""systemd watchdog: WATCHDOG=1 pings that stop when the agent is really stuck.

The pings come from a task on the agent's event loop, so they stop by
themselves when the loop is blocked: nothing else sends them, and no other
thread does. On top of that, every tick checks the inference workers: an
onnxruntime run that has been going for longer than ``stall_timeout_s`` means a
worker is stuck (requests queued behind it will never run), so the pings stop,
an error names the model and version, and systemd (WatchdogSec=) kills and
restarts the agent. If the run finishes before that, pinging resumes.

Does nothing when systemd did not ask for a watchdog (no WATCHDOG_USEC).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.system.notify import Notifier

log = logging.getLogger("agent.system.watchdog")


@dataclass(frozen=True, slots=True)
class Run:
    """An inference run in progress: which model version, since when (monotonic)."""

    model: str
    version: str
    started: float


class Watchdog:
    def __init__(
        self,
        notifier: Notifier,
        interval_s: float,
        runs: Callable[[], Iterable[Run]],
        stall_timeout_s: float,
        status: Callable[[], str],
    ) -> None:
        self._notifier = notifier
        self._interval_s = interval_s
        self._runs = runs
        self._status = status
        self.stall_timeout_s = stall_timeout_s  # reload may change it
        self._stalled: Run | None = None

    def stalled_run(self, now: float) -> Run | None:
        """The longest-running run if it has run for longer than the stall timeout."""
        if self.stall_timeout_s <= 0:
            return None
        oldest = min(self._runs(), key=lambda r: r.started, default=None)
        if oldest is None or now - oldest.started <= self.stall_timeout_s:
            return None
        return oldest

    def tick(self) -> None:
        """One check: ping if healthy; otherwise say why not (once per stall)."""
        now = time.monotonic()
        stalled = self.stalled_run(now)
        if stalled is None:
            if self._stalled is not None:
                log.warning(
                    "inference no longer stalled; watchdog pings resumed",
                    extra={"model": self._stalled.model, "version": self._stalled.version},
                )
                self._notifier.status(self._status())
            self._notifier.notify("WATCHDOG=1")
        elif stalled != self._stalled:
            running_s = round(now - stalled.started, 1)
            log.error(
                "inference stalled: a run has not finished within server.stall_timeout_s; "
                "watchdog pings stopped, systemd will restart the agent",
                extra={
                    "model": stalled.model,
                    "version": stalled.version,
                    "running_s": running_s,
                    "stall_timeout_s": self.stall_timeout_s,
                },
            )
            self._notifier.status(
                f"inference stalled: model {stalled.model} version {stalled.version} has run "
                f"for {running_s:g} s (limit {self.stall_timeout_s:g} s); watchdog pings stopped"
            )
        self._stalled = stalled

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self._interval_s)


def start_watchdog(
    notifier: Notifier,
    runs: Callable[[], Iterable[Run]],
    stall_timeout_s: float,
    status: Callable[[], str],
) -> tuple[Watchdog, asyncio.Task[None]] | None:
    """Start pinging on the running loop if systemd set a watchdog for this process."""
    interval = notifier.watchdog_interval() if notifier.enabled else None
    if interval is None:
        return None
    watchdog = Watchdog(notifier, interval, runs, stall_timeout_s, status)
    log.info(
        "systemd watchdog on",
        extra={"ping_interval_s": interval, "stall_timeout_s": stall_timeout_s},
    )
    return watchdog, asyncio.get_running_loop().create_task(watchdog.run())
