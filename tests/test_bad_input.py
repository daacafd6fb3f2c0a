"""Bad requests, sent as users send them, against a real agent process.

Each case checks the gRPC status code and that the message names the input (or
model, or output) and what is wrong with it. Requests tritonclient would never
build are crafted with its own ``service_pb2`` messages and sent over a raw gRPC
stub. At the end the server must still be live and still answer good requests.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterator
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
from tests.serving_models import (
    grid_model,
    make_repository,
    scale_and_echo_model,
    serving_config,
)

CALL_TIMEOUT_S = 10.0  # every call is bounded: a stalled server fails the test

CHECKER_CONFIG = """
name: "checker"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [
  { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "tag" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "y" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "tag_out" data_type: TYPE_STRING dims: [ 1 ] }
]
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("bad_input")
    repo = make_repository(
        tmp / "models",
        {"checker": (scale_and_echo_model(), CHECKER_CONFIG), "grid": (grid_model(), None)},
    )
    agent = AgentProcess(write_toml(tmp / "agent.toml", serving_config(tmp, repo)))
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(agent.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(agent: AgentProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(agent.address)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


# -- helpers ---------------------------------------------------------------


def infer_input(name: str, array: np.ndarray[Any, Any], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def good_checker_inputs(batch: int = 1) -> list[grpcclient.InferInput]:
    x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
    tag = np.array([[f"t{i}".encode()] for i in range(batch)], dtype=np.object_)
    return [infer_input("x", x, "FP32"), infer_input("tag", tag, "BYTES")]


def bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def raw_request(
    model: str,
    tensors: list[tuple[str, str, list[int]]],
    raw: list[bytes],
    outputs: list[str] | None = None,
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    for out in outputs or []:
        request.outputs.add(name=out)
    return request


def checker_raw(x: bytes, tag: bytes, x_shape: list[int] | None = None,
                tag_shape: list[int] | None = None) -> service_pb2.ModelInferRequest:
    return raw_request(
        "checker",
        [("x", "FP32", x_shape or [1, 4]), ("tag", "BYTES", tag_shape or [1, 1])],
        [x, tag],
    )


GOOD_X = np.arange(4, dtype=np.float32).tobytes()
GOOD_TAG = bytes_element(b"ok")


def client_error(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), str(info.value.message())


def stub_error(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest
) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    error: Any = info.value
    return str(error.code()), str(error.details())


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def assert_names(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"


# -- unknown model / version ------------------------------------------------


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    status, message = client_error(
        lambda: client.infer("no_such_model", good_checker_inputs(), client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.NOT_FOUND"
    assert_names(message, "unknown model", "'no_such_model'")


def test_unknown_version(client: grpcclient.InferenceServerClient) -> None:
    status, message = client_error(
        lambda: client.infer(
            "checker", good_checker_inputs(), model_version="9", client_timeout=CALL_TIMEOUT_S
        )
    )
    assert status == "StatusCode.NOT_FOUND"
    assert_names(message, "unknown version", "'9'", "'checker'")


def test_path_like_model_name_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    status, message = client_error(
        lambda: client.infer("../checker", good_checker_inputs(), client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.NOT_FOUND"
    assert_names(message, "'../checker'")


# -- which inputs ----------------------------------------------------------


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    only_x = good_checker_inputs()[:1]
    status, message = client_error(
        lambda: client.infer("checker", only_x, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "missing input", "'tag'")


def test_unknown_extra_input(client: grpcclient.InferenceServerClient) -> None:
    extra = infer_input("bogus", np.zeros((1, 4), np.float32), "FP32")
    status, message = client_error(
        lambda: client.infer(
            "checker", [*good_checker_inputs(), extra], client_timeout=CALL_TIMEOUT_S
        )
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "unexpected input", "'bogus'", "x", "tag")


def test_duplicate_input(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request(
        "checker",
        [("x", "FP32", [1, 4]), ("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])],
        [GOOD_X, GOOD_X, GOOD_TAG],
    )
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "'x'", "more than once")


def test_requested_output_that_does_not_exist(client: grpcclient.InferenceServerClient) -> None:
    outputs = [grpcclient.InferRequestedOutput("y"), grpcclient.InferRequestedOutput("nope")]
    status, message = client_error(
        lambda: client.infer(
            "checker", good_checker_inputs(), outputs=outputs, client_timeout=CALL_TIMEOUT_S
        )
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "requested output 'nope'", "y", "tag_out")


def test_output_requested_twice(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = checker_raw(GOOD_X, GOOD_TAG)
    request.outputs.add(name="y")
    request.outputs.add(name="y")
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "'y'", "more than once")


# -- datatype and shape ------------------------------------------------------


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    inputs = [infer_input("x", np.zeros((1, 4), np.float64), "FP64"), good_checker_inputs()[1]]
    status, message = client_error(
        lambda: client.infer("checker", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "FP64", "FP32")


def test_unknown_datatype_name(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request(
        "checker", [("x", "FP8", [1, 4]), ("tag", "BYTES", [1, 1])], [GOOD_X, GOOD_TAG]
    )
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "FP8")


def test_wrong_rank(client: grpcclient.InferenceServerClient) -> None:
    inputs = [infer_input("x", np.zeros(4, np.float32), "FP32"), good_checker_inputs()[1]]
    status, message = client_error(
        lambda: client.infer("checker", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "[4]", "rank 2")


def test_wrong_rank_without_batching(client: grpcclient.InferenceServerClient) -> None:
    inputs = [
        infer_input("m", np.zeros((1, 2, 3), np.int32), "INT32"),
        infer_input("words", np.array([b"a"], np.object_), "BYTES"),
    ]
    status, message = client_error(
        lambda: client.infer("grid", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'm'", "rank 3", "[-1, 3]")


def test_wrong_fixed_dimension(client: grpcclient.InferenceServerClient) -> None:
    inputs = [infer_input("x", np.zeros((1, 5), np.float32), "FP32"), good_checker_inputs()[1]]
    status, message = client_error(
        lambda: client.infer("checker", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "[1, 5]", "[-1, 4]")


def test_negative_dimension(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    status, message = stub_error(stub, checker_raw(GOOD_X, GOOD_TAG, x_shape=[-1, 4]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "negative dimension")

    request = raw_request(
        "grid",
        [("m", "INT32", [2, -3]), ("words", "BYTES", [1])],
        [b"\0" * 24, bytes_element(b"w")],
    )
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'm'", "negative dimension")


def test_batch_above_max_batch_size(client: grpcclient.InferenceServerClient) -> None:
    status, message = client_error(
        lambda: client.infer("checker", good_checker_inputs(batch=5), client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "batch size 5", "max_batch_size", "1..4")


def test_empty_batch(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    status, message = stub_error(stub, checker_raw(b"", b"", x_shape=[0, 4], tag_shape=[0, 1]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "batch size 0")


def test_inputs_disagree_on_batch_size(client: grpcclient.InferenceServerClient) -> None:
    inputs = [good_checker_inputs(batch=2)[0], good_checker_inputs(batch=1)[1]]
    status, message = client_error(
        lambda: client.infer("checker", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "'tag'", "batch size 1", "2")


def test_enormous_dimensions_are_rejected_without_allocating(
    agent: AgentProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    rss_before = rss_bytes(agent.pid)
    cases = [
        # batching model: the batch dimension is checked against max_batch_size
        (checker_raw(b"\0" * 32, GOOD_TAG, x_shape=[2**40, 8]), "input 'x'"),
        (checker_raw(b"\0" * 32, GOOD_TAG, x_shape=[1, 2**40]), "input 'x'"),
        # no batching, dynamic dims: only the data actually sent bounds the element count
        (
            raw_request(
                "grid",
                [("m", "INT32", [2**40, 3]), ("words", "BYTES", [1])],
                [b"\0" * 32, bytes_element(b"w")],
            ),
            "input 'm'",
        ),
        (
            raw_request(
                "grid",
                [("m", "INT32", [1, 3]), ("words", "BYTES", [2**40])],
                [b"\0" * 12, b"\0" * 32],
            ),
            "input 'words'",
        ),
        (
            raw_request(
                "grid",
                [("m", "INT32", [2**62, 3]), ("words", "BYTES", [1])],
                [b"", bytes_element(b"w")],
            ),
            "input 'm'",
        ),
    ]
    for request, names in cases:
        started = time.monotonic()
        status, message = stub_error(stub, request)
        elapsed = time.monotonic() - started
        assert status == "StatusCode.INVALID_ARGUMENT", message
        assert_names(message, names)
        assert elapsed < 5.0, f"rejecting {list(request.inputs[0].shape)} took {elapsed:.2f}s"
    grown = rss_bytes(agent.pid) - rss_before
    assert grown < 64 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB on rejected requests"


def test_enormous_dimension_message_says_data_is_too_short(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = raw_request(
        "grid",
        [("m", "INT32", [2**40, 3]), ("words", "BYTES", [1])],
        [b"\0" * 32, bytes_element(b"w")],
    )
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'm'", str(2**40), "got 32 bytes", "INT32", f"needs {2**40 * 12}")


# -- raw bytes -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 15, 17, 32])
def test_raw_byte_count_not_matching_shape(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, size: int
) -> None:
    status, message = stub_error(stub, checker_raw(b"\1" * size, GOOD_TAG))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'")
    assert_names(message, f"got {size} bytes", "needs 16")


def test_raw_byte_count_message_names_datatype(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    status, message = stub_error(stub, checker_raw(b"\1" * 17, GOOD_TAG))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "got 17 bytes", "[1, 4]", "FP32", "needs 16")


@pytest.mark.parametrize(
    ("label", "shape", "data", "problem"),
    [
        # the 4-byte length prefix of the only element is cut short
        ("truncated prefix", [1, 1], b"\x05\x00", "got 2 bytes"),
        # the second element has no room for its prefix
        ("truncated second prefix", [2, 1], bytes_element(b"abcd") + b"\x01\x00",
         "ends after 1 of 2 elements"),
        # a length that runs past the end of the data
        ("overlong length", [1, 1], struct.pack("<I", 16) + b"abc", "declares 16 bytes"),
        ("huge length", [1, 1], struct.pack("<I", 2**32 - 1) + b"abc",
         f"declares {2**32 - 1} bytes"),
        # bytes after the last element
        ("leftover bytes", [1, 1], bytes_element(b"ab") + b"zz", "2 bytes left over"),
    ],
)
def test_malformed_bytes_length_prefixes(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    label: str,
    shape: list[int],
    data: bytes,
    problem: str,
) -> None:
    x = np.zeros((shape[0], 4), np.float32).tobytes()
    status, message = stub_error(
        stub, checker_raw(x, data, x_shape=[shape[0], 4], tag_shape=shape)
    )
    assert status == "StatusCode.INVALID_ARGUMENT", label
    assert_names(message, "input 'tag'", problem)


def test_non_utf8_bytes_for_a_string_input(client: grpcclient.InferenceServerClient) -> None:
    tag = np.array([[b"fine"], [b"\xff\xfe bad"]], dtype=np.object_)
    inputs = [
        infer_input("x", np.zeros((2, 4), np.float32), "FP32"),
        infer_input("tag", tag, "BYTES"),
    ]
    status, message = client_error(
        lambda: client.infer("checker", inputs, client_timeout=CALL_TIMEOUT_S)
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'tag'", "element 1", "UTF-8")


def test_non_utf8_bytes_in_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("checker", [("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])], [])
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    request.inputs[1].contents.bytes_contents.append(b"\xc3\x28")
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'tag'", "UTF-8")


# -- typed contents -------------------------------------------------------------


def test_both_typed_and_raw_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = checker_raw(GOOD_X, GOOD_TAG)
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "both")


def test_raw_input_contents_count_not_matching_inputs(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = raw_request(
        "checker", [("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])], [GOOD_X]
    )
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "raw_input_contents", "1 entries", "2 inputs")


def test_typed_value_count_not_matching_shape(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = raw_request("checker", [("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])], [])
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    request.inputs[1].contents.bytes_contents.append(b"ok")
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "got 3 values", "needs 4")


def test_no_data_at_all(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("checker", [("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])], [])
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "got 0 values", "needs 4")


def test_datatype_without_a_typed_field(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("checker", [("x", "FP16", [1, 4]), ("tag", "BYTES", [1, 1])], [])
    request.inputs[0].contents.int_contents.extend([1, 2, 3, 4])
    request.inputs[1].contents.bytes_contents.append(b"ok")
    status, message = stub_error(stub, request)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert_names(message, "input 'x'", "FP16")


def test_typed_contents_are_accepted(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    # The positive twin of the typed cases above: the same request, well formed.
    request = raw_request("checker", [("x", "FP32", [1, 4]), ("tag", "BYTES", [1, 1])], [])
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    request.inputs[1].contents.bytes_contents.append("é".encode())
    response = stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    by_name = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents,
                                             strict=True)}
    assert np.frombuffer(by_name["y"], np.float32).tolist() == [2, 4, 6, 8]
    assert by_name["tag_out"] == bytes_element("é".encode())


# -- afterwards ---------------------------------------------------------------------


def test_bad_and_good_requests_interleaved_concurrently(agent: AgentProcess) -> None:
    """A burst of bad requests does not disturb good ones sent at the same time."""

    async def burst() -> tuple[int, int]:
        client = aioclient.InferenceServerClient(agent.address)
        try:
            async def good(i: int) -> bool:
                x = np.full((1, 4), i, np.float32)
                result = await client.infer(
                    "checker",
                    [infer_input("x", x, "FP32"),
                     infer_input("tag", np.array([[b"g"]], np.object_), "BYTES")],
                    client_timeout=CALL_TIMEOUT_S,
                )
                return bool(np.array_equal(result.as_numpy("y"), x * 2))

            async def bad(i: int) -> bool:
                x = np.zeros((1, 5 + i % 3), np.float32)
                try:
                    await client.infer(
                        "checker",
                        [infer_input("x", x, "FP32"),
                         infer_input("tag", np.array([[b"b"]], np.object_), "BYTES")],
                        client_timeout=CALL_TIMEOUT_S,
                    )
                except InferenceServerException as exc:
                    return str(exc.status()) == "StatusCode.INVALID_ARGUMENT"
                return False

            results = await asyncio.gather(
                *(good(i) if i % 2 else bad(i) for i in range(60))
            )
            return sum(results[1::2]), sum(results[0::2])
        finally:
            await client.close()

    goods_ok, bads_rejected = asyncio.run(burst())
    assert goods_ok == 30
    assert bads_rejected == 30


def test_server_still_live_and_serving_after_bad_input(
    agent: AgentProcess,
    client: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    # Runs last in this module (pytest keeps file order): every case above has been sent.
    assert agent.proc.poll() is None, "the agent exited:\n" + agent.log_text()[-3000:]
    assert client.is_server_live()
    assert client.is_server_ready()
    result = client.infer("checker", good_checker_inputs(batch=3), client_timeout=CALL_TIMEOUT_S)
    np.testing.assert_array_equal(
        result.as_numpy("y"), np.arange(12, dtype=np.float32).reshape(3, 4) * 2
    )
    assert result.as_numpy("tag_out").reshape(-1).tolist() == [b"t0", b"t1", b"t2"]
    grid = client.infer(
        "grid",
        [infer_input("m", np.array([[1, 2, 3]], np.int32), "INT32"),
         infer_input("words", np.array([b"a", b"b"], np.object_), "BYTES")],
        client_timeout=CALL_TIMEOUT_S,
    )
    assert grid.as_numpy("m_plus_one").tolist() == [[2, 3, 4]]
    # Failures were counted, and rejected requests never reached onnxruntime.
    stats = client.get_inference_statistics("checker", as_json=True)["model_stats"][0]
    fails = int(stats["inference_stats"]["fail"].get("count", 0))
    assert fails >= 20
    assert "Traceback" not in agent.log_text()
