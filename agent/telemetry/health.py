"""Health figures: the host, the agent process and every served model version.

Model figures are copied out of each version's ``ModelStats`` on the event-loop
thread (the only thread that writes them) into :class:`ModelSnapshot`; from
there everything is plain data. Latency percentiles come from the fixed-bucket
histogram in ``ModelStats.latency`` (never from stored samples), interpolated
linearly inside the bucket that holds the rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from agent.serving.stats import LATENCY_BOUNDS_NS

if TYPE_CHECKING:
    from agent.serving.model_manager import ModelManager, ServingModel

HEALTH_SCHEMA = "edge.health"
MAX_TEMPERATURE_SENSORS = 32


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    name: str
    version: str
    active: bool  # the version unversioned requests go to
    activated_at: float  # when this version was loaded and started serving (epoch s)
    success: int
    failure: int
    inferences: int  # samples inferred (batch elements)
    executions: int  # onnxruntime runs
    success_ns: int
    queue_ns: int
    compute_infer_ns: int
    latency: tuple[int, ...]  # counts per LATENCY_BOUNDS_NS bucket (+ overflow)
    batch_sizes: dict[int, int]  # batch size -> onnxruntime runs
    in_flight: int  # requests queued or running
    queue_depth: int  # requests waiting for a worker
    last_inference_ms: int
    compute_input_ns: int = 0  # successful requests' share of their runs' input copies
    compute_output_ns: int = 0

    @property
    def key(self) -> tuple[str, str, float]:
        return self.name, self.version, self.activated_at


def snapshot_models(
    models: ModelManager,
    serving: Iterable[ServingModel] | None = None,
    active_keys: set[tuple[str, str]] | None = None,
) -> list[ModelSnapshot]:
    """Copy the counters of ``serving`` (default: every serving version) on the loop thread.

    ``active_keys`` says which versions are active when the manager no longer
    knows (the final report, after the versions were released on shutdown).
    """
    out: list[ModelSnapshot] = []
    for m in models.serving() if serving is None else serving:
        s = m.stats
        if active_keys is not None:
            active = (m.spec.name, m.spec.version) in active_keys
        else:
            try:
                active = models.resolve(m.spec.name) is m
            except Exception:  # the name is not ready: nothing is active for it
                active = False
        out.append(
            ModelSnapshot(
                name=m.spec.name,
                version=m.spec.version,
                active=active,
                activated_at=m.loaded_at,
                success=s.success.count,
                failure=s.fail.count,
                inferences=s.inference_count,
                executions=s.execution_count,
                success_ns=s.success.ns,
                queue_ns=s.queue.ns,
                compute_infer_ns=s.compute_infer.ns,
                latency=tuple(s.latency),
                batch_sizes={size: b.compute_infer.count for size, b in s.batches.copy().items()},
                in_flight=m.scheduler.in_flight,
                queue_depth=m.scheduler.queued(),
                last_inference_ms=s.last_inference_ms,
                compute_input_ns=s.compute_input.ns,
                compute_output_ns=s.compute_output.ns,
            )
        )
    return out


def latency_percentiles(
    counts: Sequence[int], quantiles: Sequence[float] = (0.5, 0.95, 0.99)
) -> list[float | None]:
    """Quantiles (seconds) of the histogram ``counts`` over ``LATENCY_BOUNDS_NS``.

    Inside the bucket holding the rank the value is interpolated linearly; a
    rank in the overflow bucket reports the last bound (a lower bound). None
    when the histogram is empty.
    """
    total = sum(counts)
    if total == 0:
        return [None for _ in quantiles]
    out: list[float | None] = []
    for q in quantiles:
        rank = q * total
        cum = 0
        value: float | None = None
        for i, c in enumerate(counts):
            if c and cum + c >= rank:
                if i >= len(LATENCY_BOUNDS_NS):
                    value = LATENCY_BOUNDS_NS[-1] / 1e9
                else:
                    lo = LATENCY_BOUNDS_NS[i - 1] if i else 0
                    hi = LATENCY_BOUNDS_NS[i]
                    value = (lo + (hi - lo) * max(0.0, rank - cum) / c) / 1e9
                break
            cum += c
        out.append(value)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def model_health(
    snap: ModelSnapshot, previous: ModelSnapshot | None, interval_s: float | None
) -> dict[str, Any]:
    """One model version in the health message.

    Counters are cumulative since the version was loaded; ``interval`` holds the
    requests and latency percentiles since the previous health message.
    """
    if previous is not None and previous.key == snap.key:
        delta = [a - b for a, b in zip(snap.latency, previous.latency, strict=True)]
        d_success = snap.success - previous.success
        d_failure = snap.failure - previous.failure
    else:
        delta = list(snap.latency)
        d_success, d_failure = snap.success, snap.failure
    p50, p95, p99 = latency_percentiles(delta)
    t50, t95, t99 = latency_percentiles(snap.latency)
    return {
        "name": snap.name,
        "version": snap.version,
        "active": snap.active,
        "activated_at": round(snap.activated_at, 3),
        "requests": {"success": snap.success, "failure": snap.failure},
        "inferences": snap.inferences,
        "executions": snap.executions,
        "latency_ms": {"p50": _ms(t50), "p95": _ms(t95), "p99": _ms(t99),
                       "mean": _ms(snap.success_ns / snap.success / 1e9) if snap.success else None},
        "interval": {
            "seconds": None if interval_s is None else round(interval_s, 3),
            "success": d_success,
            "failure": d_failure,
            "latency_ms": {"p50": _ms(p50), "p95": _ms(p95), "p99": _ms(p99)},
        },
        "queue_depth": snap.queue_depth,
        "in_flight": snap.in_flight,
        "batch_sizes": {str(k): v for k, v in sorted(snap.batch_sizes.items())},
        "last_inference_at": snap.last_inference_ms / 1000 if snap.last_inference_ms else None,
    }


class HostProbe:
    """psutil readings of the host and this process (blocking but quick: call off the loop)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.process = psutil.Process(os.getpid())
        self.started_at = self.process.create_time()
        # cpu_percent measures since the previous call: prime both.
        psutil.cpu_percent(None)
        self.process.cpu_percent(None)

    def host(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(None),
            "cpu_count": psutil.cpu_count() or 0,
            "load_avg": [round(x, 3) for x in os.getloadavg()],
            "memory": {
                "total_bytes": mem.total,
                "available_bytes": mem.available,
                "percent": mem.percent,
            },
            "disk": self.disk(),
            "temperatures_c": self.temperatures(),
            "boot_time": psutil.boot_time(),
        }
        return out

    def disk(self) -> dict[str, Any]:
        path = self.state_dir if self.state_dir.exists() else self.state_dir.parent
        try:
            du = psutil.disk_usage(str(path))
        except OSError:
            return {"path": str(self.state_dir), "error": "unavailable"}
        return {
            "path": str(self.state_dir),
            "total_bytes": du.total,
            "free_bytes": du.free,
            "percent": du.percent,
        }

    @staticmethod
    def temperatures() -> dict[str, float]:
        """``sensor/label`` -> degrees Celsius, where the platform exposes them."""
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:
            return {}
        try:
            sensors = read()
        except (OSError, RuntimeError):
            return {}
        out: dict[str, float] = {}
        for sensor, entries in sorted(sensors.items()):
            for i, entry in enumerate(entries):
                if len(out) >= MAX_TEMPERATURE_SENSORS:
                    return out
                if entry.current is None or not math.isfinite(entry.current):
                    continue
                out[f"{sensor}/{entry.label or i}"] = round(float(entry.current), 1)
        return out

    def process_info(self) -> dict[str, Any]:
        p = self.process
        with p.oneshot():
            info: dict[str, Any] = {
                "pid": p.pid,
                "rss_bytes": p.memory_info().rss,
                "threads": p.num_threads(),
                "open_files": _open_files(p),
                "cpu_percent": p.cpu_percent(None),
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
            }
        return info


def _open_files(p: psutil.Process) -> int:
    try:
        return int(p.num_fds())  # every descriptor (files, sockets, pipes) on POSIX
    except (AttributeError, psutil.Error):
        try:
            return len(p.open_files())
        except psutil.Error:
            return -1


def models_health(
    snaps: Iterable[ModelSnapshot],
    previous: dict[tuple[str, str], ModelSnapshot],
    interval_s: float | None,
) -> list[dict[str, Any]]:
    return [
        model_health(s, previous.get((s.name, s.version)), interval_s)
        for s in sorted(snaps, key=lambda s: (s.name, int(s.version) if s.version.isdigit() else 0))
    ]
