"""A request whose content makes the model fail must not fail anyone else's.

Through a real agent and tritonclient: concurrent requests share a dynamic
batch; one of them carries an out-of-range Gather index. Only that one fails,
with INVALID_ARGUMENT and onnxruntime's message, and the others get their own
correct outputs. A batch that fails only because of its size (each member
succeeds alone) is retried so that every member succeeds. Shapes whose element
count is zero but whose dimensions are enormous are refused by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess, write_toml
from tests.batch_isolation_models import SIZED_LIMIT, embed_expected, isolation_models
from tests.serving_models import make_repository, serving_config

CALL_TIMEOUT_S = 30.0
BURST = 8  # requests per burst: the models' max_batch_size
BAD = 3  # which request of a burst carries the bad index
MAX_BURSTS = 3  # a loaded host may split a burst; retry it (bounded) until it batches


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("isolation")
    repo = make_repository(tmp / "models", isolation_models())
    # Worker threads: batches form only there (tests/test_inline_execution.py).
    config = serving_config(tmp, repo, runtime={"intra_op_threads": 1, "execution": "worker"})
    agent = AgentProcess(write_toml(tmp / "agent.toml", config))
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


def tensor(name: str, array: np.ndarray[Any, Any], datatype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def batch_runs(agent: AgentProcess, model: str) -> dict[int, int]:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        (s,) = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return {b.batch_size: b.compute_infer.count for b in s.batch_stats}


def counts(agent: AgentProcess, model: str) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        (s,) = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return s.inference_stats.success.count, s.inference_stats.fail.count


def grew(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def burst(address: str, model: str, inputs: list[list[grpcclient.InferInput]]) -> list[Any]:
    """Send every request at once; each result is an InferResult or the exception."""
    client = aioclient.InferenceServerClient(address)
    try:
        return await asyncio.gather(
            *(client.infer(model, i, client_timeout=CALL_TIMEOUT_S) for i in inputs),
            return_exceptions=True,
        )
    finally:
        await client.close()


def embed_requests(burst_no: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(burst_no)
    requests = [rng.integers(-10, 10, size=(1, 2), dtype=np.int64) for _ in range(BURST)]
    requests[BAD] = np.array([[2, 10]], np.int64)  # 10 is past the table's last row
    return requests


def check_embed_burst(results: list[Any], requests: list[np.ndarray[Any, Any]]) -> None:
    for i, (idx, result) in enumerate(zip(requests, results, strict=True)):
        if i == BAD:
            assert isinstance(result, InferenceServerException), f"bad request answered: {result}"
            assert str(result.status()) == "StatusCode.INVALID_ARGUMENT", result.message()
            message = str(result.message())
            for fragment in ("'embed", "input", "idx=10"):  # model, cause, onnxruntime's words
                assert fragment in message, f"{fragment!r} not in {message!r}"
        else:
            assert not isinstance(result, BaseException), f"good request {i} failed: {result}"
            np.testing.assert_array_equal(result.as_numpy("emb"), embed_expected(idx))


def test_a_bad_index_fails_only_its_own_request_in_a_dynamic_batch(agent: AgentProcess) -> None:
    ok_before, fail_before = counts(agent, "embed")
    runs_before = batch_runs(agent, "embed")
    batched = False
    for n in range(MAX_BURSTS):
        requests = embed_requests(n)
        results = asyncio.run(
            burst(agent.address, "embed", [[tensor("idx", r, "INT64")] for r in requests])
        )
        check_embed_burst(results, requests)
        runs = batch_runs(agent, "embed")
        # The good requests ran batched (with the bad one, before it was set apart).
        batched = max(grew(runs_before, runs), default=0) > 1
        runs_before = runs
        if batched:
            break
    assert batched, "no burst formed a batch: nothing was tested"
    ok, fail = counts(agent, "embed")
    assert fail - fail_before == n + 1  # one bad request per burst
    assert ok - ok_before == (n + 1) * (BURST - 1)
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        assert client.is_model_ready("embed")
    finally:
        client.close()


def test_a_bad_index_without_batching_is_invalid_argument(agent: AgentProcess) -> None:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(
                "embed_direct",
                [tensor("idx", np.array([[0, -11]], np.int64), "INT64")],
                client_timeout=CALL_TIMEOUT_S,
            )
        assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert "'embed_direct'" in str(info.value.message())
        assert "idx=-11" in str(info.value.message())
        good = client.infer(
            "embed_direct",
            [tensor("idx", np.array([[0, 9]], np.int64), "INT64")],
            client_timeout=CALL_TIMEOUT_S,
        )
        np.testing.assert_array_equal(good.as_numpy("emb"), embed_expected(np.array([[0, 9]])))
    finally:
        client.close()


def test_a_batch_too_large_for_the_model_is_retried_in_parts(agent: AgentProcess) -> None:
    """Each request succeeds alone; only their batch is too large: nobody fails."""
    ok_before, fail_before = counts(agent, "sized")
    runs_before = batch_runs(agent, "sized")
    xs = [np.array([[i]], np.int64) for i in range(BURST)]
    results = asyncio.run(burst(agent.address, "sized", [[tensor("x", x, "INT64")] for x in xs]))
    for x, result in zip(xs, results, strict=True):
        assert not isinstance(result, BaseException), f"request {int(x[0, 0])} failed: {result}"
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    ok, fail = counts(agent, "sized")
    assert (ok - ok_before, fail - fail_before) == (BURST, 0)
    runs = grew(runs_before, batch_runs(agent, "sized"))
    assert max(runs) <= SIZED_LIMIT  # what ran were parts the model accepts
    assert sum(size * n for size, n in runs.items()) == BURST


@pytest.mark.parametrize(
    "shape",
    [[0, 2**62], [2**62, 0], [0, 2**63 - 1], [0, 2**40]],
)
@pytest.mark.parametrize("typed", [False, True])
def test_empty_tensor_with_enormous_dimensions_is_invalid_argument(
    agent: AgentProcess, shape: list[int], typed: bool
) -> None:
    request = service_pb2.ModelInferRequest(model_name="free2d")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    if not typed:
        request.raw_input_contents.append(b"")
    channel = grpc.insecure_channel(agent.address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    finally:
        channel.close()
    error: Any = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "input 'x'" in error.details()
    assert str(shape[0] or shape[1]) in error.details()


def test_an_empty_tensor_with_modest_dimensions_still_runs(agent: AgentProcess) -> None:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        result = client.infer(
            "free2d",
            [tensor("x", np.zeros((0, 5), np.float32), "FP32")],
            client_timeout=CALL_TIMEOUT_S,
        )
        assert result.as_numpy("y").shape == (0, 5)
    finally:
        client.close()


def test_agent_still_healthy_afterwards(agent: AgentProcess, tmp_path: Path) -> None:
    assert agent.proc.poll() is None, "the agent exited:\n" + agent.log_text()[-3000:]
    assert "Traceback" not in agent.log_text()
