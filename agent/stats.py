"""Per-model-version inference statistics, in Triton's terms.

Updated only on the event-loop thread (after a worker hands its timings back),
so plain integers suffice and no lock sits on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
        self.queue.add(queue_ns)
        self.compute_input.add(t.input_ns)
        self.compute_infer.add(t.infer_ns)
        self.compute_output.add(t.output_ns)
        self.inference_count += batch_size
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, request_ns: int) -> None:
        self.fail.add(request_ns)
