"""Drift monitoring off the inference hot path.

The data plane calls :meth:`DriftMonitor.tap` once per successful request, on
the event-loop thread. The tap draws a random number, and for a sampled
request (``sample_rate``) appends *references* to the request's decoded input
arrays and serialised outputs to a bounded deque: no copy, no lock, no
signal. A full deque (by count or by the bytes it holds) drops the sample and
counts it; inference never waits.

A background thread drains the deque a few times a second, decodes the outputs,
and adds everything to the current window of each model version (against the
reference profile signed into its version directory). :meth:`rollover` closes
the windows and opens new ones.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.serving.datatypes import BYTES, NUMPY_DTYPES, decode_bytes_tensor
from agent.telemetry.drift.profiles import ReferenceProfile
from agent.telemetry.drift.statistics import DriftWindow

if TYPE_CHECKING:
    from agent.serving.inference import DecodedRequest, OutputTensor
    from agent.serving.model_manager import ServingModel
    from agent.serving.scheduler import Completed

log = logging.getLogger("agent.telemetry.drift.statistics")

# (model, version, loaded_at) identifies one loaded instance of a version.
VersionKey = tuple[str, str, float]
ProfileLoader = Callable[[str, str], ReferenceProfile | None]
_Sample = tuple[str, str, float, dict[str, Any], list["OutputTensor"], int]


@dataclass(slots=True)
class ClosedWindow:
    model: str
    version: str
    profile: ReferenceProfile
    window: DriftWindow
    started_at: float
    ended_at: float


@dataclass(slots=True)
class MonitorCounters:
    sampled: int = 0  # requests handed to the queue
    dropped_full: int = 0  # sampled but the queue was full
    processed: int = 0  # added to a window
    no_profile: int = 0  # their version has no (valid) reference profile
    errors: int = 0  # failed to decode or add


class DriftMonitor:
    def __init__(
        self,
        sample_rate: float,
        load_profile: ProfileLoader,
        capacity: int = 1024,
        max_queued_bytes: int = 64 * 1024 * 1024,
        drain_interval_s: float = 0.1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sample_rate = sample_rate
        self._load_profile = load_profile
        self._capacity = capacity
        self._max_bytes = max_queued_bytes
        self._drain_interval_s = drain_interval_s
        self._clock = clock
        self._queue: deque[_Sample] = deque()
        self._bytes_in = 0  # written by the loop thread only
        self._bytes_out = 0  # written under _drain_lock only
        self._random = random.random
        self.counters = MonitorCounters()
        self._profiles: dict[VersionKey, ReferenceProfile | None] = {}
        self._unmonitored: set[VersionKey] = set()  # read by tap, added to by the drain thread
        self._windows: dict[VersionKey, DriftWindow] = {}
        self._window_started = clock()
        self._lock = threading.Lock()  # guards _windows, _window_started and _profiles
        self._drain_lock = threading.Lock()  # one drainer at a time (it owns _bytes_out)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the hot path (event-loop thread) -------------------------------------------------

    def tap(self, model: ServingModel, decoded: DecodedRequest, done: Completed) -> None:
        if self._random() >= self.sample_rate:
            return
        spec = model.spec
        key = (spec.name, spec.version, model.loaded_at)
        if key in self._unmonitored:  # no profile: nothing to compare with
            return
        counters = self.counters
        counters.sampled += 1
        if len(self._queue) >= self._capacity or self._bytes_in - self._bytes_out > self._max_bytes:
            counters.dropped_full += 1
            return
        size = 0
        for a in decoded.feeds.values():
            size += a.nbytes
        self._bytes_in += size
        self._queue.append((*key, decoded.feeds, done.outputs, size))

    # -- the drain thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._drain_interval_s):
            try:
                self.drain()
            except Exception:  # never let the monitor die silently
                self.counters.errors += 1
                log.exception("drift monitor: drain failed")
        self.drain()

    def drain(self) -> int:
        """Move everything queued into the windows; returns how many requests.

        Called by the drain thread and before a window closes; one at a time.
        """
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> int:
        q = self._queue
        n = len(q)
        if n == 0:
            return 0
        groups: dict[VersionKey, list[_Sample]] = {}
        freed = 0
        for _ in range(n):
            item = q.popleft()
            freed += item[5]
            groups.setdefault((item[0], item[1], item[2]), []).append(item)
        self._bytes_out += freed
        for key, items in groups.items():
            profile = self._profile(key)
            if profile is None:
                self.counters.no_profile += len(items)
                continue
            wanted = {t.name for t in profile.tensors if t.role == "output"}
            inputs = [item[3] for item in items]
            try:
                outputs = [_decode_outputs(item[4], wanted) for item in items]
            except Exception:
                self.counters.errors += len(items)
                log.exception("drift monitor: cannot decode outputs", extra={"model": key[0]})
                continue
            with self._lock:
                window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = DriftWindow(profile)
                window.add(inputs, outputs)
            self.counters.processed += len(items)
        return n

    def _profile(self, key: VersionKey) -> ReferenceProfile | None:
        with self._lock:
            if key in self._profiles:
                return self._profiles[key]
        # Read (and verify) the version's profile once per loaded instance, unlocked:
        # verifying a version directory hashes all of it.
        profile: ReferenceProfile | None
        try:
            profile = self._load_profile(key[0], key[1])
        except Exception as exc:
            log.error(
                "drift profile not usable; no drift monitoring for this version",
                extra={"model": key[0], "version": key[1], "reason": str(exc)},
            )
            profile = None
        else:
            if profile is None:
                log.info(
                    "no drift profile in the version directory; drift not monitored",
                    extra={"model": key[0], "version": key[1]},
                )
        with self._lock:
            self._profiles[key] = profile
        if profile is None:
            self._unmonitored.add(key)
        return profile

    def profile_for(self, model: str, version: str, loaded_at: float) -> ReferenceProfile | None:
        """The cached profile of a version, loading it if needed (call off the loop)."""
        return self._profile((model, version, loaded_at))

    # -- windows -------------------------------------------------------------------------------

    def rollover(self, alive: Iterable[VersionKey] | None = None) -> list[ClosedWindow]:
        """Close the current windows and open empty ones.

        Versions in ``alive`` with a profile get a window even with no traffic;
        versions no longer in ``alive`` are forgotten after their last window.
        """
        alive_set = set(alive) if alive is not None else None
        now = self._clock()
        with self._lock:
            started = self._window_started
            closed = self._windows
            self._windows = {}
            self._window_started = now
            if alive_set is not None:
                for gone in [k for k in self._profiles if k not in alive_set and k not in closed]:
                    del self._profiles[gone]
                    self._unmonitored.discard(gone)
            profiles = dict(self._profiles)
        out: list[ClosedWindow] = []
        keys = set(closed)
        if alive_set is not None:
            keys |= {k for k in alive_set if profiles.get(k) is not None}
        for key in sorted(keys):
            profile = profiles.get(key)
            if profile is None:
                continue
            window = closed.get(key) or DriftWindow(profile)
            out.append(ClosedWindow(key[0], key[1], profile, window, started, now))
        return out

    @property
    def queued(self) -> int:
        return len(self._queue)


def _decode_outputs(outputs: list[OutputTensor], wanted: set[str]) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for out in outputs:
        if out.name not in wanted:
            continue
        if out.datatype == BYTES:
            count = math.prod(out.shape)
            decoded[out.name] = decode_bytes_tensor(out.name, out.raw, count).reshape(out.shape)
        else:
            decoded[out.name] = np.frombuffer(out.raw, dtype=NUMPY_DTYPES[out.datatype]).reshape(
                out.shape
            )
    return decoded
