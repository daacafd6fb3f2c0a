"""A Prometheus endpoint on 127.0.0.1 (``telemetry.prometheus_address``).

Nothing happens per request: at scrape time a custom collector asks for one
snapshot of every served version's ``ModelStats`` (copied on the event loop)
plus the last drift window, and turns it into metric families. The HTTP
server is ``prometheus_client``'s own, on a daemon thread, with a private
registry (this collector plus the standard process and platform collectors).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from agent.serving.stats import LATENCY_BOUNDS_NS
from agent.telemetry.drift.statistics import WindowResult, severity
from agent.telemetry.health import HostProbe, ModelSnapshot

log = logging.getLogger("agent.telemetry.metrics")

PREFIX = "edge_agent"


@dataclass(slots=True)
class MetricsSnapshot:
    models: list[ModelSnapshot]
    drift: dict[tuple[str, str], WindowResult] = field(default_factory=dict)
    drift_sampled: int = 0
    drift_dropped: int = 0
    drift_processed: int = 0
    outbox_messages: int = 0
    outbox_bytes: int = 0
    outbox_dropped_total: int = 0
    published_total: int = 0


SnapshotSource = Callable[[], MetricsSnapshot]


class AgentCollector(Collector):
    def __init__(self, source: SnapshotSource, host: HostProbe) -> None:
        self._source = source
        self._host = host

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._source()
        except Exception as exc:  # a stuck or stopping loop: report what we can
            log.warning("metrics snapshot unavailable", extra={"reason": repr(exc)})
            snap = None
        if snap is not None:
            yield from _model_metrics(snap.models)
            yield from _drift_metrics(snap)
            yield from _telemetry_metrics(snap)
        yield from _host_metrics(self._host)


def _model_metrics(models: list[ModelSnapshot]) -> Iterator[Metric]:
    labels = ["model", "version"]
    requests = CounterMetricFamily(
        f"{PREFIX}_model_requests", "Inference requests by outcome", labels=[*labels, "outcome"]
    )
    inferences = CounterMetricFamily(
        f"{PREFIX}_model_inferences", "Samples inferred (batch elements)", labels=labels
    )
    executions = CounterMetricFamily(
        f"{PREFIX}_model_executions", "onnxruntime runs", labels=labels
    )
    batches = CounterMetricFamily(
        f"{PREFIX}_model_batch_executions", "onnxruntime runs by batch size",
        labels=[*labels, "batch_size"],
    )
    queue_s = CounterMetricFamily(
        f"{PREFIX}_model_queue_seconds", "Time successful requests spent queued", labels=labels
    )
    infer_s = CounterMetricFamily(
        f"{PREFIX}_model_compute_infer_seconds", "Time spent in onnxruntime", labels=labels
    )
    latency = HistogramMetricFamily(
        f"{PREFIX}_model_request_duration_seconds",
        "Latency of successful requests, as the agent measures it", labels=labels,
    )
    in_flight = GaugeMetricFamily(
        f"{PREFIX}_model_in_flight", "Requests queued or running", labels=labels
    )
    depth = GaugeMetricFamily(
        f"{PREFIX}_model_queue_depth", "Requests waiting for a worker", labels=labels
    )
    active = GaugeMetricFamily(
        f"{PREFIX}_model_active",
        "1 for the version that unversioned requests go to", labels=labels,
    )
    loaded = GaugeMetricFamily(
        f"{PREFIX}_model_activated_timestamp_seconds",
        "When the version was loaded and started serving", labels=labels,
    )
    for m in models:
        lv = [m.name, m.version]
        requests.add_metric([*lv, "success"], m.success)
        requests.add_metric([*lv, "failure"], m.failure)
        inferences.add_metric(lv, m.inferences)
        executions.add_metric(lv, m.executions)
        for size, count in sorted(m.batch_sizes.items()):
            batches.add_metric([*lv, str(size)], count)
        queue_s.add_metric(lv, m.queue_ns / 1e9)
        infer_s.add_metric(lv, m.compute_infer_ns / 1e9)
        cum = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(LATENCY_BOUNDS_NS, m.latency, strict=False):
            cum += count
            buckets.append((repr(bound / 1e9), cum))
        buckets.append(("+Inf", sum(m.latency)))
        latency.add_metric(lv, buckets, m.success_ns / 1e9)
        in_flight.add_metric(lv, m.in_flight)
        depth.add_metric(lv, m.queue_depth)
        active.add_metric(lv, 1 if m.active else 0)
        loaded.add_metric(lv, m.activated_at)
    yield from (requests, inferences, executions, batches, queue_s, infer_s, latency,
                in_flight, depth, active, loaded)
    yield from _triton_metrics(models)


# Triton's names for the same counters (its /metrics, labels model and version), so
# that dashboards made for Triton work unchanged. Untyped, not counter: a counter
# family would be exposed with a "_total" suffix, and Triton's names have none.
# (name, help, ModelSnapshot field, divisor: ns -> us)
_TRITON_COUNTERS: tuple[tuple[str, str, str, int], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests",
     "success", 1),
    ("nv_inference_request_failure", "Number of failed inference requests", "failure", 1),
    ("nv_inference_count", "Number of inferences performed (batch elements)",
     "inferences", 1),
    ("nv_inference_exec_count", "Number of model executions (onnxruntime runs)",
     "executions", 1),
    ("nv_inference_request_duration_us",
     "Cumulative duration of successful inference requests, microseconds", "success_ns", 1000),
    ("nv_inference_queue_duration_us",
     "Cumulative time successful requests spent queued, microseconds", "queue_ns", 1000),
    ("nv_inference_compute_input_duration_us",
     "Cumulative input preparation time of successful requests, microseconds",
     "compute_input_ns", 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative model execution time of successful requests, microseconds",
     "compute_infer_ns", 1000),
    ("nv_inference_compute_output_duration_us",
     "Cumulative output extraction time of successful requests, microseconds",
     "compute_output_ns", 1000),
)


def _triton_metrics(models: list[ModelSnapshot]) -> Iterator[Metric]:
    labels = ["model", "version"]
    for name, doc, attr, divisor in _TRITON_COUNTERS:
        family = UnknownMetricFamily(name, doc, labels=labels)
        for m in models:
            value: int = getattr(m, attr)
            family.add_metric([m.name, m.version], value // divisor if divisor > 1 else value)
        yield family
    pending = GaugeMetricFamily(
        "nv_inference_pending_request_count",
        "Requests received and not yet executing (queued)", labels=labels,
    )
    for m in models:
        pending.add_metric([m.name, m.version], m.queue_depth)
    yield pending


_DRIFT_METRICS = (
    ("psi", "Population stability index of the last drift window"),
    ("js", "Jensen-Shannon distance (base 2) of the last drift window"),
    ("ks", "KS statistic (binned) of the last drift window"),
    ("wasserstein", "Wasserstein-1 / reference std of the last drift window"),
    ("missing_rate", "Missing (NaN/empty) rate in the last drift window"),
    ("out_of_range_rate", "Out-of-reference-range rate in the last drift window"),
)


def _drift_metrics(snap: MetricsSnapshot) -> Iterator[Metric]:
    status = GaugeMetricFamily(
        f"{PREFIX}_drift_status",
        "Drift status of the last window: -1 insufficient data, 0 ok, 1 warn, 2 drift",
        labels=["model", "version"],
    )
    labels = ["model", "version", "role", "feature"]
    families: dict[str, GaugeMetricFamily] = {
        name: GaugeMetricFamily(f"{PREFIX}_drift_{name}", doc, labels=labels)
        for name, doc in _DRIFT_METRICS
    }
    for (model, version), result in sorted(snap.drift.items()):
        status.add_metric([model, version], severity(result.status))
        for f in result.features:
            values: dict[str, Any] = {
                "psi": f.psi, "js": f.js, "ks": f.ks, "wasserstein": f.wasserstein,
                "missing_rate": f.missing_rate, "out_of_range_rate": f.out_of_range_rate,
            }
            for name, value in values.items():
                if value is not None:
                    families[name].add_metric([model, version, f.role, f.name], value)
    yield status
    yield from families.values()


def _telemetry_metrics(snap: MetricsSnapshot) -> Iterator[Metric]:
    samples = CounterMetricFamily(
        f"{PREFIX}_drift_samples", "Requests sampled for drift monitoring, by fate",
        labels=["fate"],
    )
    samples.add_metric(["sampled"], snap.drift_sampled)
    samples.add_metric(["dropped_queue_full"], snap.drift_dropped)
    samples.add_metric(["processed"], snap.drift_processed)
    yield samples
    yield GaugeMetricFamily(
        f"{PREFIX}_telemetry_outbox_messages", "Telemetry messages waiting for a PUBACK",
        value=snap.outbox_messages,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_telemetry_outbox_bytes", "Bytes of telemetry waiting for a PUBACK",
        value=snap.outbox_bytes,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_telemetry_outbox_dropped", "Telemetry messages dropped unsent (outbox bounds)",
        value=snap.outbox_dropped_total,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_telemetry_published", "Telemetry messages acknowledged by the broker",
        value=snap.published_total,
    )


def _host_metrics(host: HostProbe) -> Iterator[Metric]:
    mem = psutil.virtual_memory()
    yield GaugeMetricFamily(
        f"{PREFIX}_host_memory_available_bytes", "Host memory available", value=mem.available
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_host_memory_total_bytes", "Host memory", value=mem.total
    )
    load = GaugeMetricFamily(
        f"{PREFIX}_host_load_average", "Host load average", labels=["period"]
    )
    for period, value in zip(("1m", "5m", "15m"), psutil.getloadavg(), strict=True):
        load.add_metric([period], value)
    yield load
    cpu = CounterMetricFamily(
        f"{PREFIX}_host_cpu_seconds", "Host CPU time by mode (all CPUs)", labels=["mode"]
    )
    for mode, value in psutil.cpu_times()._asdict().items():
        cpu.add_metric([mode], value)
    yield cpu
    disk = host.disk()
    if "free_bytes" in disk:
        yield GaugeMetricFamily(
            f"{PREFIX}_state_disk_free_bytes", "Free space on the state directory's file system",
            value=disk["free_bytes"],
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_state_disk_total_bytes", "Size of the state directory's file system",
            value=disk["total_bytes"],
        )
    temps = host.temperatures()
    if temps:
        t = GaugeMetricFamily(
            f"{PREFIX}_host_temperature_celsius", "Temperature sensors", labels=["sensor"]
        )
        for sensor, value in temps.items():
            t.add_metric([sensor], value)
        yield t


class MetricsServer:
    """The HTTP endpoint; ``start`` binds (raises OSError if it cannot), ``stop`` closes."""

    def __init__(self, address: str, source: SnapshotSource, host: HostProbe) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(source, host))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self.bound = ""

    def start(self) -> str:
        host, _, port = self.address.rpartition(":")
        self._httpd, self._thread = start_http_server(int(port), host, self.registry)
        bound_host, bound_port = self._httpd.server_address[:2]
        self.bound = f"{bound_host}:{bound_port}"
        return self.bound

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
