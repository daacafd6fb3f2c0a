"""Per-model-version inference statistics, in Triton's terms.

Updated only on the event-loop thread (after a worker hands its timings back),
so plain integers suffice and no lock sits on the hot path.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field

# Upper bounds (ns) of the request-latency histogram: 1, 1.5, 2, 3, 5, 7 per decade
# from 10 us to 70 s, then one bucket for anything slower. Percentiles and the
# Prometheus histogram are read from these counts (agent.telemetry.health).
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(m * 10**e) for e in range(4, 11) for m in (1, 1.5, 2, 3, 5, 7)
)


def _latency_buckets() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS_NS) + 1)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ExecutionTimings:
    """What a worker measured for one onnxruntime run (shared by the requests in it)."""

    batch_size: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # samples (batch elements) inferred
    execution_count: int = 0  # onnxruntime runs
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # Successful requests by latency: latency[i] counts those <= LATENCY_BOUNDS_NS[i].
    latency: list[int] = field(default_factory=_latency_buckets)
    # The failed requests (of ``fail``) that are the model's or the server's fault,
    # not the client's (see agent.serving.dataplane): what a fleet probation judges.
    faults: int = 0

    def record_execution(self, t: ExecutionTimings) -> None:
        self.execution_count += 1
        stats = self.batches.get(t.batch_size)
        if stats is None:
            stats = self.batches[t.batch_size] = BatchStats()
        stats.compute_input.add(t.input_ns)
        stats.compute_infer.add(t.infer_ns)
        stats.compute_output.add(t.output_ns)

    def record_success(
        self, request_ns: int, queue_ns: int, batch_size: int, t: ExecutionTimings
    ) -> None:
        self.success.add(request_ns)
        self.latency[bisect_left(LATENCY_BOUNDS_NS, request_ns)] += 1
        self.queue.add(queue_ns)
        self.compute_input.add(t.input_ns)
        self.compute_infer.add(t.infer_ns)
        self.compute_output.add(t.output_ns)
        self.inference_count += batch_size
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, request_ns: int, fault: bool) -> None:
        self.fail.add(request_ns)
        if fault:
            self.faults += 1
