"""Scheduling through a real agent: dynamic batching, bounded queues, deadlines,
parallel instances.

Timing is never asserted against wall-clock budgets. What a test concludes it
reads from the model statistics the agent reports (execution and inference
counts, batch sizes, summed compute time) or from status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess, start_serving, write_toml
from tests.serving_models import (
    SlowModel,
    build_slow_model,
    make_repository,
    row_wise_model,
    run_direct,
    serving_config,
)

CALL_TIMEOUT_S = 30.0

ROW_WISE_CONFIG = """
name: "rowwise"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 20000
  preferred_batch_size: [ 4, 8 ]
}
"""

LONE_CLIENT_DELAY_US = 200_000  # far above any request's own time here
LONE_CLIENT_CONFIG = f"""
name: "lonely"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching {{
  max_queue_delay_microseconds: {LONE_CLIENT_DELAY_US}
  preferred_batch_size: [ 8 ]
}}
"""

SLOW_SERIAL_CONFIG = """
name: "slow_serial"
max_batch_size: 0
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

SLOW_PARALLEL_CONFIG = """
name: "slow_parallel"
max_batch_size: 0
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

DEADLINE_SERIAL_CONFIG = """
name: "deadline_serial"
max_batch_size: 0
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

DEADLINE_BATCHED_CONFIG = """
name: "deadline_batched"
max_batch_size: 2
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

SLOW_QUEUE2_CONFIG = """
name: "slow_queue2"
max_batch_size: 2
dynamic_batching {
  max_queue_delay_microseconds: 0
  default_queue_policy { max_queue_size: 2 }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

SLOW_DIRECT_CONFIG = """
name: "slow_direct"
max_batch_size: 0
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def slow() -> SlowModel:
    model = build_slow_model(target_ms=150.0)
    assert model.run_ms > 20, f"slow model runs in {model.run_ms:.1f} ms: too fast to test with"
    return model


def _start(tmp: Path, models: dict[str, tuple[bytes, str | None]], **sections: Any) -> AgentProcess:
    repo = make_repository(tmp / "models", models)
    # Worker threads: batches form only there (a model shorter than a thread hop
    # would otherwise run inline, one request at a time; tests/test_inline_execution.py).
    runtime = {"intra_op_threads": 1, "execution": "worker"}
    config = serving_config(tmp, repo, runtime=runtime, **sections)
    return start_serving(write_toml(tmp / "agent.toml", config))


@pytest.fixture(scope="module")
def very_slow() -> SlowModel:
    """For deadline tests: one run outlasts any plausible delay in sending a request."""
    model = build_slow_model(target_ms=800.0)
    assert model.run_ms > 500, f"slow model runs in {model.run_ms:.1f} ms: too fast to test with"
    return model


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, slow: SlowModel, very_slow: SlowModel
) -> Iterator[AgentProcess]:
    agent = _start(
        tmp_path_factory.mktemp("batching"),
        {
            "rowwise": (row_wise_model(), ROW_WISE_CONFIG),
            "lonely": (row_wise_model(), LONE_CLIENT_CONFIG),
            "slow_serial": (slow.onnx_bytes, SLOW_SERIAL_CONFIG),
            "slow_parallel": (slow.onnx_bytes, SLOW_PARALLEL_CONFIG),
            "deadline_serial": (very_slow.onnx_bytes, DEADLINE_SERIAL_CONFIG),
            "deadline_batched": (very_slow.onnx_bytes, DEADLINE_BATCHED_CONFIG),
        },
    )
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def bounded_agent(
    tmp_path_factory: pytest.TempPathFactory, slow: SlowModel
) -> Iterator[AgentProcess]:
    """Small queues: per model from config.pbtxt, and the runtime default of 2."""
    tmp = tmp_path_factory.mktemp("bounded")
    repo = make_repository(
        tmp / "models",
        {
            "slow_queue2": (slow.onnx_bytes, SLOW_QUEUE2_CONFIG),
            "slow_direct": (slow.onnx_bytes, SLOW_DIRECT_CONFIG),
        },
    )
    config = serving_config(
        tmp, repo, runtime={"intra_op_threads": 1, "default_max_queue_size": 2}
    )
    agent = AgentProcess(write_toml(tmp / "agent.toml", config))
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


# -- helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    inference_count: int
    execution_count: int
    success: int
    fail: int
    compute_infer_ns: int
    batch_executions: dict[int, int]  # batch size -> onnxruntime runs
    queue_ns: int = 0


def stats(agent: AgentProcess, model: str) -> Stats:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        response = client.get_inference_statistics(model)
    finally:
        client.close()
    (s,) = response.model_stats
    return Stats(
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        success=s.inference_stats.success.count,
        fail=s.inference_stats.fail.count,
        compute_infer_ns=s.inference_stats.compute_infer.ns,
        batch_executions={b.batch_size: b.compute_infer.count for b in s.batch_stats},
        queue_ns=s.inference_stats.queue.ns,
    )


def tensor(name: str, array: np.ndarray[Any, Any], datatype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def slow_input(batch: int, fill: float) -> tuple[np.ndarray[Any, Any], list[grpcclient.InferInput]]:
    x = np.full((batch, 4), fill, np.float32)
    return x, [tensor("x", x, "FP32")]


async def slow_infer(
    client: aioclient.InferenceServerClient,
    model: str,
    batch: int,
    fill: float,
    client_timeout: float = CALL_TIMEOUT_S,
) -> str:
    """One request to a slow model; returns "OK" (output checked) or the status code."""
    x, inputs = slow_input(batch, fill)
    try:
        result = await client.infer(model, inputs, client_timeout=client_timeout)
    except InferenceServerException as exc:
        return str(exc.status())
    assert np.array_equal(result.as_numpy("y"), x)
    return "OK"


# -- dynamic batching ----------------------------------------------------------------


def test_concurrent_requests_are_batched_and_split_back_exactly(agent: AgentProcess) -> None:
    rng = np.random.default_rng(1234)
    requests: list[dict[str, np.ndarray[Any, Any]]] = []
    for i in range(48):
        batch = int(rng.integers(1, 4))
        requests.append(
            {
                "x": rng.standard_normal((batch, 4)).astype(np.float32),
                "k": rng.integers(-(2**40), 2**40, size=(batch, 2), dtype=np.int64),
                "tag": np.array(
                    [[f"req{i}-row{r}-é".encode()] for r in range(batch)], dtype=np.object_
                ),
            }
        )
    before = stats(agent, "rowwise")

    async def fire() -> list[Any]:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            return await asyncio.gather(
                *(
                    client.infer(
                        "rowwise",
                        [
                            tensor("x", r["x"], "FP32"),
                            tensor("k", r["k"], "INT64"),
                            tensor("tag", r["tag"], "BYTES"),
                        ],
                        request_id=f"req{i}",
                        client_timeout=CALL_TIMEOUT_S,
                    )
                    for i, r in enumerate(requests)
                )
            )
        finally:
            await client.close()

    results = asyncio.run(fire())
    model = row_wise_model()
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.get_response().id == f"req{i}"
        # What onnxruntime gives for this request's input on its own.
        text = np.array([[v.decode() for v in row] for row in request["tag"]], dtype=np.object_)
        direct = run_direct(model, {**request, "tag": text})
        np.testing.assert_array_equal(result.as_numpy("y"), direct["y"])
        np.testing.assert_array_equal(result.as_numpy("k_sum"), direct["k_sum"])
        served_tags = result.as_numpy("tag_out")
        assert served_tags.shape == direct["tag_out"].shape == request["tag"].shape
        assert served_tags.reshape(-1).tolist() == [
            t.encode() for t in direct["tag_out"].reshape(-1)
        ]

    after = stats(agent, "rowwise")
    samples = sum(len(r["x"]) for r in requests)
    assert after.inference_count - before.inference_count == samples
    assert after.success - before.success == len(requests)
    executions = after.execution_count - before.execution_count
    assert 0 < executions < len(requests), f"{executions} runs for {len(requests)} requests"
    merged = {
        size: n - before.batch_executions.get(size, 0)
        for size, n in after.batch_executions.items()
        if n - before.batch_executions.get(size, 0) > 0
    }
    assert max(merged) > 3, f"batch sizes run: {merged}"  # larger than any single request
    assert max(merged) <= 8  # never above max_batch_size
    assert sum(size * n for size, n in merged.items()) == samples


def test_a_lone_client_stops_paying_the_queue_delay_and_load_brings_batching_back(
    agent: AgentProcess,
) -> None:
    """max_queue_delay is an upper bound: once waits gather nobody, requests run at once."""

    def one(client: grpcclient.InferenceServerClient, i: int) -> None:
        x = np.full((1, 4), i, np.float32)
        k = np.zeros((1, 2), np.int64)
        tag = np.array([[b"t"]], dtype=np.object_)
        result = client.infer(
            "lonely",
            [tensor("x", x, "FP32"), tensor("k", k, "INT64"), tensor("tag", tag, "BYTES")],
            client_timeout=CALL_TIMEOUT_S,
        )
        assert result.as_numpy("y").shape == (1, 4)

    before = stats(agent, "lonely")
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        for i in range(30):  # one at a time: nothing can ever join a batch
            one(client, i)
    finally:
        client.close()
    after = stats(agent, "lonely")
    queued_s = (after.queue_ns - before.queue_ns) / 1e9
    # Every request waiting the whole delay would queue 30 x 0.2 s = 6 s; the
    # first few waits (scheduler.FRUITLESS_WAITS) are all it pays.
    assert queued_s < 10 * LONE_CLIENT_DELAY_US / 1e6, f"{queued_s:.2f} s queued"

    async def burst() -> None:
        aio = aioclient.InferenceServerClient(agent.address)
        try:
            x = np.ones((1, 4), np.float32)
            k = np.zeros((1, 2), np.int64)
            tag = np.array([[b"t"]], dtype=np.object_)
            await asyncio.gather(
                *(
                    aio.infer(
                        "lonely",
                        [tensor("x", x, "FP32"), tensor("k", k, "INT64"),
                         tensor("tag", tag, "BYTES")],
                        client_timeout=CALL_TIMEOUT_S,
                    )
                    for _ in range(40)
                )
            )
        finally:
            await aio.close()

    # Batching comes back once two requests are queued at once. On a loaded 2-core
    # host one burst's requests can trickle in no faster than they run, so up to
    # three bursts (bounded), stopping at the first that batches.
    for _ in range(3):
        asyncio.run(burst())
        final = stats(agent, "lonely")
        grew = {
            size: n - after.batch_executions.get(size, 0)
            for size, n in final.batch_executions.items()
            if n - after.batch_executions.get(size, 0) > 0
        }
        if max(grew) > 1:
            break
    assert max(grew) > 1, f"batch sizes run under load: {grew}"


# -- bounded queues --------------------------------------------------------------


def _flood(agent: AgentProcess, model: str, count: int, batch: int) -> list[str]:
    async def run() -> list[str]:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            return list(
                await asyncio.gather(*(slow_infer(client, model, batch, i) for i in range(count)))
            )
        finally:
            await client.close()

    return asyncio.run(run())


def _flood_until_full_queue_admitted(agent: AgentProcess, model: str, batch: int) -> None:
    """Floods of 16: each is answered OK or RESOURCE_EXHAUSTED (some of both), as the
    model's statistics count them; at least one flood gets the one running and the two
    queued through. On a loaded host the worker may not have taken the first request
    off the queue before the next two arrive (then only two fit), so up to three
    floods, stopping at the first that admits three."""
    ok = 0
    outcomes: list[str] = []
    for _ in range(3):
        before = stats(agent, model)
        outcomes = _flood(agent, model, count=16, batch=batch)
        ok = outcomes.count("OK")
        full = outcomes.count("StatusCode.RESOURCE_EXHAUSTED")
        assert ok + full == len(outcomes), outcomes
        assert full >= 1, outcomes
        after = stats(agent, model)
        assert after.execution_count - before.execution_count == ok
        assert after.fail - before.fail == full
        if ok >= 3:
            break
    assert ok >= 3, outcomes  # the one running and the two queued


def test_dynamic_batching_queue_full_answers_resource_exhausted(
    bounded_agent: AgentProcess,
) -> None:
    # Batch 2 = max_batch_size: no two requests can share a run, so one runs and at
    # most 2 (max_queue_size) wait; a flood of 16 must see RESOURCE_EXHAUSTED.
    _flood_until_full_queue_admitted(bounded_agent, "slow_queue2", batch=2)


def test_queue_full_message_names_the_model(bounded_agent: AgentProcess) -> None:
    async def run() -> list[str]:
        client = aioclient.InferenceServerClient(bounded_agent.address)
        messages: list[str] = []

        async def one(i: int) -> None:
            _, inputs = slow_input(2, i)
            try:
                await client.infer("slow_queue2", inputs, client_timeout=CALL_TIMEOUT_S)
            except InferenceServerException as exc:
                messages.append(f"{exc.status()} {exc.message()}")

        try:
            await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()
        return messages

    messages = asyncio.run(run())
    assert messages, "no request was rejected"
    for message in messages:
        assert message.startswith("StatusCode.RESOURCE_EXHAUSTED"), message
        assert "'slow_queue2'" in message and "queue is full" in message, message


def test_direct_scheduler_queue_full_answers_resource_exhausted(
    bounded_agent: AgentProcess,
) -> None:
    # No dynamic batching, one instance, runtime.default_max_queue_size = 2:
    # one runs, two wait, the rest of a flood is turned away.
    _flood_until_full_queue_admitted(bounded_agent, "slow_direct", batch=1)


def test_queue_frees_up_after_a_flood(bounded_agent: AgentProcess) -> None:
    async def run() -> list[str]:
        client = aioclient.InferenceServerClient(bounded_agent.address)
        try:
            return [
                await slow_infer(client, model, batch, 7.0)
                for model, batch in (("slow_queue2", 2), ("slow_direct", 1))
            ]
        finally:
            await client.close()

    _flood(bounded_agent, "slow_direct", count=8, batch=1)
    assert asyncio.run(run()) == ["OK", "OK"]


# -- deadlines ---------------------------------------------------------------------


@pytest.mark.parametrize(("model", "batch"), [("deadline_serial", 1), ("deadline_batched", 2)])
def test_request_whose_deadline_passes_in_the_queue_is_never_run(
    agent: AgentProcess, model: str, batch: int
) -> None:
    # Three slow requests occupy the single instance (batch = max_batch_size, so
    # they cannot merge). The late request, sent once the first is surely running,
    # has a deadline far shorter than what is left of that first run (which
    # takes more than 0.5 s, checked by the very_slow fixture): whatever
    # its place in the queue, its deadline passes before an instance is free.
    busy_count = 3
    head_start_s = 0.15
    short_timeout = 0.1
    before = stats(agent, model)

    async def run() -> tuple[list[str], str, str]:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            busy = [
                asyncio.ensure_future(slow_infer(client, model, batch, float(i)))
                for i in range(busy_count)
            ]
            await asyncio.sleep(head_start_s)
            late = await slow_infer(client, model, 1, 99.0, client_timeout=short_timeout)
            done = list(await asyncio.gather(*busy))
            # FIFO on one instance: once this one is answered, the late request
            # would have run by now if it were ever going to.
            after = await slow_infer(client, model, batch, 5.0)
            return done, late, after
        finally:
            await client.close()

    busy, late, after = asyncio.run(run())
    assert busy == ["OK"] * busy_count
    assert late == "StatusCode.DEADLINE_EXCEEDED"
    assert after == "OK"
    # The server side: it saw the late request, counted it as failed, never ran it.
    now = stats(agent, model)
    runs = busy_count + 1
    assert now.execution_count - before.execution_count == runs
    assert now.inference_count - before.inference_count == runs * batch
    assert now.success - before.success == runs
    assert now.fail - before.fail == 1


def test_run_abandoned_mid_way_is_still_counted(agent: AgentProcess) -> None:
    # The deadline passes while the request is already running: onnxruntime cannot be
    # interrupted, so the run completes and is counted as an execution, while the
    # request itself is a failure (its client has gone).
    timeout = 0.15  # a run takes more than 0.5 s (checked by the very_slow fixture)
    before = stats(agent, "deadline_serial")

    async def run() -> tuple[str, str]:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            late = await slow_infer(client, "deadline_serial", 1, 3.0, client_timeout=timeout)
            after = await slow_infer(client, "deadline_serial", 1, 4.0)
            return late, after
        finally:
            await client.close()

    late, after = asyncio.run(run())
    assert (late, after) == ("StatusCode.DEADLINE_EXCEEDED", "OK")
    now = stats(agent, "deadline_serial")
    assert now.execution_count - before.execution_count == 2
    assert now.inference_count - before.inference_count == 1
    assert (now.success - before.success, now.fail - before.fail) == (1, 1)


# -- parallel instances ---------------------------------------------------------------


def _overlap_ratio(agent: AgentProcess, model: str) -> float:
    """Two concurrent requests: server compute time summed over both, divided by
    the wall time enclosing both. Above 1 means the two runs overlapped in time;
    runs one after another can never exceed 1."""

    async def pair(warm_up: bool) -> int:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            if warm_up:
                assert await slow_infer(client, model, 1, 0.0) == "OK"
                return 0
            start = time.perf_counter_ns()
            outcomes = await asyncio.gather(
                slow_infer(client, model, 1, 1.0), slow_infer(client, model, 1, 2.0)
            )
            wall = time.perf_counter_ns() - start
            assert list(outcomes) == ["OK", "OK"]
            return wall
        finally:
            await client.close()

    asyncio.run(pair(warm_up=True))
    before = stats(agent, model)
    wall_ns = asyncio.run(pair(warm_up=False))
    after = stats(agent, model)
    assert after.execution_count - before.execution_count == 2
    return (after.compute_infer_ns - before.compute_infer_ns) / wall_ns


def test_two_instances_run_two_requests_at_once(agent: AgentProcess) -> None:
    ratios = []
    for _ in range(3):
        ratios.append(_overlap_ratio(agent, "slow_parallel"))
        if ratios[-1] > 1.3:
            break
    assert max(ratios) > 1.3, f"compute/wall ratios with 2 instances: {ratios}"


def test_one_instance_runs_requests_one_at_a_time(agent: AgentProcess) -> None:
    # The control for the test above: with one instance the ratio cannot exceed 1.
    ratios = [_overlap_ratio(agent, "slow_serial") for _ in range(2)]
    assert max(ratios) < 1.05, f"compute/wall ratios with 1 instance: {ratios}"
