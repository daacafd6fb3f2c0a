"""Requests that make the model fail are the client's doing, not the model's fault.

The agent runs in this process (real grpc.aio server on port 0, real
onnxruntime), called over gRPC with the agent's own stubs, so that the
version's ``ModelStats.faults``, the count a fleet probation judges, can be
read directly: a hostile client sending bad indices or absurd shapes must not
move it, and a batch that fails only because of its size is not a fault either
(its members are retried and succeed). The agent makes onnxruntime's
process-wide thread pools, so it runs in a fresh interpreter of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from agent.app import Agent
from agent.config import build_config
from agent.wire import grpc_service_pb2 as pb
from agent.wire import grpc_service_pb2_grpc as pb_grpc
from tests.batch_isolation_models import embed_expected, isolation_models
from tests.serving_models import make_repository, serving_config

TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def infer_request(model: str, name: str, array: np.ndarray[Any, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
    request.raw_input_contents.append(array.astype(np.int64).tobytes())
    return request


async def call(stub: Any, request: pb.ModelInferRequest) -> Any:
    try:
        return await stub.ModelInfer(request, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return exc


def test_bad_content_and_oversized_batches_are_no_model_fault(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_batch_isolation_faults", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (
        done.stdout[-3000:] + done.stderr[-3000:]
    )


def check(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "models", isolation_models())
    config = build_config(serving_config(tmp_path, repo, runtime={"intra_op_threads": 1}))

    async def go() -> None:
        agent = Agent(config)
        await agent.start()
        try:
            channel = grpc.aio.insecure_channel(agent.bound[0])
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # A burst into one dynamic batch, one request with an index past the table.
            idx = [np.array([[i % 10, (i * 3) % 10]]) for i in range(8)]
            idx[5] = np.array([[1, 99]])
            results = await asyncio.gather(
                *(call(stub, infer_request("embed", "idx", a)) for a in idx)
            )
            for i, (a, result) in enumerate(zip(idx, results, strict=True)):
                if i == 5:
                    assert isinstance(result, grpc.aio.AioRpcError)
                    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result.details()
                else:
                    assert not isinstance(result, grpc.aio.AioRpcError), result.details()
                    emb = np.frombuffer(result.raw_output_contents[0], np.float32)
                    np.testing.assert_array_equal(emb.reshape(1, 2, 3), embed_expected(a))
            # Unbatched, the same.
            alone = await call(stub, infer_request("embed_direct", "idx", np.array([[0, 10]])))
            assert alone.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A batch only too large for the model: every member succeeds.
            sized = await asyncio.gather(
                *(call(stub, infer_request("sized", "x", np.array([[i]]))) for i in range(8))
            )
            assert all(not isinstance(r, grpc.aio.AioRpcError) for r in sized), sized
            # An empty tensor with enormous dimensions.
            huge = pb.ModelInferRequest(model_name="free2d")
            huge.inputs.add(name="x", datatype="FP32", shape=[0, 2**62])
            huge.raw_input_contents.append(b"")
            refused = await call(stub, huge)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
            await channel.close()

            embed = agent.models.resolve("embed").stats
            assert (embed.success.count, embed.fail.count, embed.faults) == (7, 1, 0)
            direct = agent.models.resolve("embed_direct").stats
            assert (direct.fail.count, direct.faults) == (1, 0)
            stats = agent.models.resolve("sized").stats
            assert (stats.success.count, stats.fail.count, stats.faults) == (8, 0, 0)
            free = agent.models.resolve("free2d").stats
            assert (free.fail.count, free.faults) == (1, 0)
            assert agent.models.is_ready("embed")
        finally:
            await agent.stop()

    asyncio.run(go())


if __name__ == "__main__":
    check(Path(sys.argv[1]))
    print("OK")
