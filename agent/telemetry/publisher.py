"""Telemetry upstream: periodic health and drift windows -> outbox -> MQTT.

``TelemetryService`` runs on the agent's event loop:

* every ``health_interval_s`` it copies the model statistics (on the loop),
  reads the host and process figures (on a worker thread) and queues an
  ``edge.health`` message;
* every ``drift_window_s`` it closes the drift windows and queues one
  ``edge.drift`` message with every profiled model version's statistics and
  any threshold crossings (``events``);
* a sender publishes what the outbox holds, oldest first, QoS 1, a bounded
  batch at a time, and deletes each message when its PUBACK arrives. Nothing
  is published while the broker is away; everything waits (durably, bounded)
  in the outbox, across agent restarts.

Without MQTT the outbox is not used; drift and health still feed the
Prometheus endpoint and the logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.common.buffers import as_bytes
from agent.telemetry.drift.monitor import ClosedWindow, DriftMonitor, VersionKey
from agent.telemetry.drift.profile_io import PROFILE_FILENAME, parse_profile
from agent.telemetry.drift.profiles import Band, DriftThresholds
from agent.telemetry.drift.statistics import WindowResult, compare_window, is_crossing, severity
from agent.telemetry.health import (
    HEALTH_SCHEMA,
    HostProbe,
    ModelSnapshot,
    models_health,
    snapshot_models,
)
from agent.telemetry.outbox import OUTBOX_FILENAME, Entry, Outbox, OutboxError, OutboxLimits, Stamp

if TYPE_CHECKING:
    from agent.config import TelemetryConfig
    from agent.mqtt.client import MqttClient
    from agent.serving.model_manager import ModelManager, ModelReader, ServingModel
    from agent.telemetry.metrics import MetricsServer, MetricsSnapshot

log = logging.getLogger("agent.telemetry")

DRIFT_SCHEMA = "edge.drift"
SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 60 * 1024  # under the fleet protocol's 64 KiB JSON limit
PUBLISH_BATCH = 32
ACK_TIMEOUT_S = 60.0


def thresholds_for(config: TelemetryConfig, model: str) -> DriftThresholds:
    """The default thresholds with the model's own overrides on top."""
    merged: dict[str, Any] = {**config.thresholds, **config.model_thresholds.get(model, {})}
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "min_samples":
            kwargs[key] = int(value)
        else:
            kwargs[key] = Band(float(value[0]), float(value[1])) if value else None
    return DriftThresholds(**kwargs)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


@dataclass(slots=True)
class MqttTarget:
    client: MqttClient
    prefix: str
    device: str

    def topic(self, kind: str) -> str:
        return f"{self.prefix}/devices/{self.device}/{kind}"


@dataclass(slots=True)
class _State:
    last_health: dict[tuple[str, str], ModelSnapshot] = field(default_factory=dict)
    last_serving: list[ServingModel] = field(default_factory=list)
    last_health_at: float | None = None
    drift_status: dict[VersionKey, str] = field(default_factory=dict)
    last_drift: dict[tuple[str, str], WindowResult] = field(default_factory=dict)
    published: int = 0


class TelemetryService:
    def __init__(
        self,
        config: TelemetryConfig,
        models: ModelManager,
        reader: ModelReader,
        state_dir: Path,
        version_dir: Callable[[str, str], Path],
    ) -> None:
        self.config = config
        self.models = models
        self._reader = reader
        self._version_dir = version_dir
        self.state_dir = state_dir
        self.host = HostProbe(state_dir)
        self.monitor = DriftMonitor(
            config.sample_rate, self._load_profile, capacity=config.sample_queue
        )
        self.outbox: Outbox | None = None
        self.mqtt: MqttTarget | None = None
        self.metrics: MetricsServer | None = None
        self.metrics_address = ""
        self._state = _State()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # -- wiring -------------------------------------------------------------------------------

    def attach_mqtt(self, client: MqttClient, prefix: str, device: str) -> None:
        """Publish through ``client`` (the agent's one MQTT connection); call before start."""
        self.mqtt = MqttTarget(client, prefix, device)

    @property
    def tap(self) -> Callable[..., None] | None:
        """The data plane's per-request hook (None when drift sampling is off)."""
        return self.monitor.tap if self.config.sample_rate > 0 else None

    def _load_profile(self, model: str, version: str) -> Any:
        directory = self._version_dir(model, version)
        if not (directory / PROFILE_FILENAME).is_file():
            return None
        data = self._reader(directory, PROFILE_FILENAME)  # verified with the model's signature
        return parse_profile(as_bytes(data), f"{directory / PROFILE_FILENAME}")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        if self.mqtt is not None:
            limits = OutboxLimits(
                cfg.outbox_max_messages, cfg.outbox_max_bytes, cfg.outbox_max_age_s
            )
            self.outbox = await asyncio.to_thread(
                Outbox, self.state_dir / OUTBOX_FILENAME, limits
            )
        if cfg.prometheus_address:
            # prometheus_client only when an endpoint is configured (megabytes otherwise idle).
            from agent.telemetry.metrics import MetricsServer

            server = MetricsServer(cfg.prometheus_address, self.metrics_snapshot, self.host)
            try:
                self.metrics_address = await asyncio.to_thread(server.start)
                self.metrics = server
                log.info("prometheus endpoint listening",
                         extra={"address": self.metrics_address, "path": "/metrics"})
            except OSError as exc:
                # Metrics are not worth refusing to serve predictions for.
                log.error("prometheus endpoint not started",
                          extra={"address": cfg.prometheus_address, "reason": str(exc)})
        if cfg.sample_rate > 0:
            self.monitor.start()
        self._tasks = [
            asyncio.create_task(self._every(cfg.health_interval_s, self.queue_health)),
            asyncio.create_task(self._every(cfg.drift_window_s, self.queue_drift)),
        ]
        if self.mqtt is not None:
            self._tasks.append(asyncio.create_task(self._sender()))
            self.mqtt.client.on_connected(self._on_connected)
        log.info(
            "telemetry started",
            extra={
                "health_interval_s": cfg.health_interval_s,
                "drift_window_s": cfg.drift_window_s,
                "sample_rate": cfg.sample_rate,
                "mqtt": self.mqtt is not None,
                "outbox_pending": self.outbox.count if self.outbox else 0,
            },
        )

    async def _on_connected(self) -> None:
        self._wake.set()

    async def stop(self, flush_timeout_s: float = 3.0) -> None:
        """Final health and drift, then publish what the outbox holds (bounded), close."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await asyncio.to_thread(self.monitor.stop)
        with contextlib.suppress(Exception):
            await self.queue_drift()
        with contextlib.suppress(Exception):
            await self.queue_health()
        if self.outbox is not None and self.mqtt is not None:
            try:
                await asyncio.wait_for(self.flush(), flush_timeout_s)
            except (TimeoutError, Exception) as exc:
                log.warning(
                    "telemetry not all published before stop; it stays in the outbox",
                    extra={"pending": self.outbox.count, "reason": repr(exc)},
                )
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
            self.outbox = None

    # -- periodic work ------------------------------------------------------------------------

    async def _every(self, interval_s: float, job: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval_s
            if next_at < loop.time():  # fell behind (suspend, overload): skip, don't burst
                next_at = loop.time() + interval_s
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("telemetry job failed")

    async def queue_health(self) -> None:
        serving = self.models.serving()
        st = self._state
        if serving or not self._stopping:
            snaps = snapshot_models(self.models, serving)  # on the loop: ModelStats' writer
            st.last_serving = serving
        else:  # the final report, after shutdown released the versions: their last counts
            active = {k for k, s in st.last_health.items() if s.active}
            snaps = snapshot_models(self.models, st.last_serving, active)
        host, process = await asyncio.to_thread(
            lambda: (self.host.host(), self.host.process_info())
        )
        now = time.time()
        interval = None if st.last_health_at is None else now - st.last_health_at
        body: dict[str, Any] = {
            "agent": {
                "version": __version__,
                "pid": process["pid"],
                "started_at": process["started_at"],
                "uptime_s": process["uptime_s"],
                "stopping": self._stopping,
            },
            "host": host,
            "process": {k: process[k] for k in ("rss_bytes", "threads", "open_files",
                                                 "cpu_percent")},
            "models": models_health(snaps, st.last_health, interval),
            # Versions and repository entries that are not serving, with the reason.
            "unavailable": self.models.unavailable(),
            # On-device variants (agent/serving/optimizer.py): which serves, gain, error.
            "optimizations": _optimizations(self._reader, snaps),
            "telemetry": self._telemetry_counters(),
        }
        st.last_health = {(s.name, s.version): s for s in snaps}
        st.last_health_at = now
        _fit_models(body, MAX_MESSAGE_BYTES)
        await self._queue("health", HEALTH_SCHEMA, body)

    def _telemetry_counters(self) -> dict[str, Any]:
        c = self.monitor.counters
        return {
            "drift_sample_rate": self.config.sample_rate,
            "drift_sampled": c.sampled,
            "drift_dropped_queue_full": c.dropped_full,
            "drift_processed": c.processed,
            "drift_no_profile": c.no_profile,
            "outbox_messages": self.outbox.count if self.outbox else 0,
            "outbox_bytes": self.outbox.size_bytes if self.outbox else 0,
            "published": self._state.published,
        }

    async def queue_drift(self) -> None:
        alive = [(m.spec.name, m.spec.version, m.loaded_at) for m in self.models.serving()]

        def close_and_compare() -> list[tuple[ClosedWindow, WindowResult, DriftThresholds]]:
            for key in alive:  # make sure every served version's profile is known
                self.monitor.profile_for(*key)
            if self.config.sample_rate > 0:
                self.monitor.drain()
            out = []
            for closed in self.monitor.rollover(alive):
                thresholds = thresholds_for(self.config, closed.model)
                out.append((closed, compare_window(closed.window, thresholds), thresholds))
            return out

        results = await asyncio.to_thread(close_and_compare)
        if not results:
            return
        st = self._state
        models: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for closed, result, thresholds in results:
            key = (closed.model, closed.version, closed.window.profile.created_at)
            st.last_drift[(closed.model, closed.version)] = result
            previous = st.drift_status.get(key)
            if is_crossing(previous, result.status):
                event = {
                    "model": closed.model,
                    "version": closed.version,
                    "from": previous or "ok",
                    "to": result.status,
                    "drifting": result.drifting,
                    "warning": result.warning,
                }
                events.append(event)
                level = logging.WARNING if severity(result.status) > 0 else logging.INFO
                log.log(level, "drift status changed", extra=event)
            if result.status != "insufficient_data":
                st.drift_status[key] = result.status
            models.append(_model_drift(closed, result, thresholds))
        first = results[0][0]
        c = self.monitor.counters
        body = {
            "window": {
                "start": round(first.started_at, 3),
                "end": round(first.ended_at, 3),
                "duration_s": round(first.ended_at - first.started_at, 3),
            },
            "sampling": {
                "rate": self.config.sample_rate,
                "sampled": c.sampled,
                "dropped_queue_full": c.dropped_full,
            },
            "models": models,
            "events": events,
        }
        _fit(body, MAX_MESSAGE_BYTES)
        await self._queue("drift", DRIFT_SCHEMA, body)

    async def _queue(self, kind: str, schema: str, body: dict[str, Any]) -> None:
        if self.outbox is None or self.mqtt is None:
            return
        target = self.mqtt

        def build(stamp: Stamp) -> bytes:
            return encode({
                "schema": schema,
                "version": SCHEMA_VERSION,
                "device": target.device,
                "ts": round(stamp.ts, 3),
                "seq": stamp.seq,
                "message_id": stamp.message_id,
                "dropped": stamp.dropped,
                "dropped_total": stamp.dropped_total,
                **body,
            })

        outbox = self.outbox
        try:
            await asyncio.to_thread(outbox.put, target.topic(kind), build)
        except OutboxError as exc:
            log.error("telemetry message not queued", extra={"kind": kind, "reason": str(exc)})
            return
        self._wake.set()

    # -- sending ----------------------------------------------------------------------------

    async def _sender(self) -> None:
        assert self.mqtt is not None
        client = self.mqtt.client
        while True:
            await client.connected.wait()
            self._wake.clear()  # before looking: a message queued from now on wakes us
            sent = await self._send_batch()
            if sent == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 5.0)

    async def _send_batch(self) -> int:
        """Publish the oldest batch; delete what was acknowledged. Returns how many."""
        outbox, target = self.outbox, self.mqtt
        if outbox is None or target is None:
            return 0
        entries = await asyncio.to_thread(outbox.pending, PUBLISH_BATCH)
        if not entries:
            return 0
        # Publish in seq order (paho sends in call order on one connection), then wait
        # for all the PUBACKs together.
        waits = [
            asyncio.ensure_future(target.client.publish(e.topic, e.payload, qos=1))
            for e in entries
        ]
        done, pending = await asyncio.wait(waits, timeout=ACK_TIMEOUT_S)
        for p in pending:
            p.cancel()
        acked = [e.seq for e, w in zip(entries, waits, strict=True)
                 if w in done and not w.cancelled() and w.exception() is None]
        failed = [w.exception() for w in done if not w.cancelled() and w.exception() is not None]
        await asyncio.to_thread(outbox.ack, acked)
        self._state.published += len(acked)
        if failed or pending:
            log.warning(
                "telemetry publish not acknowledged; will retry",
                extra={"acked": len(acked), "unacked": len(entries) - len(acked),
                       "reason": repr(failed[0]) if failed else "timeout"},
            )
            await asyncio.sleep(1.0)
            return 0
        return len(entries)

    async def flush(self) -> None:
        """Publish until the outbox is empty or the broker is away (used on stop;
        bounded by the caller). What is left waits in the outbox for the next start."""
        if self.mqtt is None or self.outbox is None:
            return
        while self.outbox.count and self.mqtt.client.connected.is_set():
            if not await self._send_batch():
                break

    # -- metrics ----------------------------------------------------------------------------

    def metrics_snapshot(self, timeout_s: float = 2.0) -> MetricsSnapshot:
        """Called on the scrape thread: the model counters are copied on the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("no event loop")
        future: concurrent.futures.Future[list[ModelSnapshot]] = concurrent.futures.Future()

        def copy() -> None:
            try:
                future.set_result(snapshot_models(self.models))
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(copy)
        models = future.result(timeout_s)
        c = self.monitor.counters
        outbox = self.outbox
        from agent.telemetry.metrics import MetricsSnapshot  # loaded by start() already

        return MetricsSnapshot(
            models=models,
            drift=dict(self._state.last_drift),
            drift_sampled=c.sampled,
            drift_dropped=c.dropped_full,
            drift_processed=c.processed,
            outbox_messages=outbox.count if outbox else 0,
            outbox_bytes=outbox.size_bytes if outbox else 0,
            outbox_dropped_total=outbox.dropped_total() if outbox else 0,
            published_total=self._state.published,
        )

    def pending(self) -> list[Entry]:
        return self.outbox.pending(10_000) if self.outbox else []


def _optimizations(reader: object, snaps: list[Any]) -> list[dict[str, Any]]:
    reports = getattr(reader, "optimization_reports", None)
    found = [] if reports is None else list(reports([(s.name, s.version) for s in snaps]))
    return found[:32]  # bounded like the rest of the message


def _model_drift(
    closed: ClosedWindow, result: WindowResult, thresholds: DriftThresholds
) -> dict[str, Any]:
    features = sorted(result.features, key=lambda f: -severity(f.status))
    return {
        "name": closed.model,
        "version": closed.version,
        "status": result.status,
        "requests": result.requests,
        "drifting": result.drifting,
        "warning": result.warning,
        "shape_mismatches": result.shape_mismatches,
        "thresholds": thresholds.as_dict(),
        "features": [f.as_dict() for f in features],
        "features_omitted": 0,
    }


def _fit(body: dict[str, Any], limit: int) -> None:
    """Drop the least severe features (counting them) until the message fits ``limit``."""
    size = len(encode(body)) + 512  # room for the envelope fields
    if size <= limit:
        return
    entries = [
        (m, i, len(encode(f)) + 1)
        for m in body["models"]
        for i, f in enumerate(m["features"])
    ]
    # Least severe first, from the end of each model's list (sorted most severe first).
    entries.sort(key=lambda e: (severity(e[0]["features"][e[1]]["status"]), -e[1]))
    drop: dict[int, set[int]] = {}
    for m, i, n in entries:
        if size <= limit:
            break
        drop.setdefault(id(m), set()).add(i)
        size -= n
    for m in body["models"]:
        gone = drop.get(id(m), set())
        if gone:
            m["features"] = [f for i, f in enumerate(m["features"]) if i not in gone]
            m["features_omitted"] = len(gone)


def _fit_models(body: dict[str, Any], limit: int) -> None:
    """Health of very many model versions: keep the active ones first, count the rest."""
    models: list[dict[str, Any]] = body["models"]
    body["models_omitted"] = 0
    size = len(encode(body)) + 512
    if size <= limit:
        return
    order = sorted(range(len(models)), key=lambda i: (not models[i]["active"], i))
    keep: set[int] = set()
    budget = limit - 512 - (size - sum(len(encode(m)) + 1 for m in models))
    for i in order:
        n = len(encode(models[i])) + 1
        if n > budget:
            break
        keep.add(i)
        budget -= n
    body["models"] = [m for i, m in enumerate(models) if i in keep]
    body["models_omitted"] = len(models) - len(keep)
