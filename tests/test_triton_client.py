"""Triton's own Python client (``tritonclient.grpc``, sync and asyncio) against a
real agent process serving the example repository.

Expected numbers come from running the same ONNX files with onnxruntime in this
process (the real runtime, not a stand-in), so the tests check that the agent
serves exactly what the model computes.
"""

from __future__ import annotations

import asyncio
import queue
import re
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess
from tests.conftest import EXAMPLE_MODELS, agent_config

TABULAR = "tabular_classifier"
TEXT = "text_features"
ALL = "all_dtypes"
WAIT_S = 30.0  # upper bound for anything the tests wait on

Array = np.ndarray[Any, Any]


# -- references computed with onnxruntime directly ---------------------------


def _reference(model: str, version: int, feeds: dict[str, Array]) -> dict[str, Array]:
    session = ort.InferenceSession(
        str(EXAMPLE_MODELS / model / str(version) / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _features(rows: int, seed: int) -> Array:
    return np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)


def _features_input(data: Array) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("features", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def _error_of(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


async def _aerror_of(awaitable: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        await awaitable
    return info.value


# -- all_dtypes payload -------------------------------------------------------


def _all_dtypes_arrays() -> dict[str, tuple[str, Array]]:
    """in_<t> -> (datatype, array); extremes and awkward values of every type."""
    i64 = np.iinfo(np.int64)
    u64 = np.iinfo(np.uint64)
    fp16 = np.array(
        [[0.0, -0.0, 65504.0, -65504.0], [np.inf, -np.inf, 6e-8, 1.0009765625]],
        dtype=np.float16,
    )
    fp32 = np.array(
        [
            [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0, np.inf],
            [-np.inf, 1e-45, 3.1415927, -1.5],
        ],
        dtype=np.float32,
    )
    fp64 = np.array(
        [[np.finfo(np.float64).max, 5e-324, -0.0, np.inf], [-np.inf, np.pi, -1e300, 2.5]],
        dtype=np.float64,
    )
    strings = np.array(
        [
            ["héllo wörld", "日本語テキスト", "", "emoji 🙂👍"],
            ["plain", "tab\tand\nnewline", "Ωμέγα", "x" * 300],
        ],
        dtype=np.object_,
    )
    return {
        "bool": ("BOOL", np.array([[True, False, True, True], [False, False, True, False]])),
        "int8": ("INT8", np.array([[-128, 127, 0, -1], [1, 2, -3, 4]], dtype=np.int8)),
        "int16": ("INT16", np.array([[-32768, 32767, 0, -1], [5, 6, 7, 8]], dtype=np.int16)),
        "int32": (
            "INT32",
            np.array([[-(2**31), 2**31 - 1, 0, -1], [9, 10, 11, 12]], dtype=np.int32),
        ),
        "int64": ("INT64", np.array([[i64.min, i64.max, 0, -1], [13, 14, 15, 16]], dtype=np.int64)),
        "uint8": ("UINT8", np.array([[0, 255, 1, 128], [2, 3, 4, 5]], dtype=np.uint8)),
        "uint16": ("UINT16", np.array([[0, 65535, 1, 32768], [6, 7, 8, 9]], dtype=np.uint16)),
        "uint32": (
            "UINT32",
            np.array([[0, 2**32 - 1, 1, 2**31], [10, 11, 12, 13]], dtype=np.uint32),
        ),
        "uint64": (
            "UINT64",
            np.array([[0, u64.max, 1, 2**63], [u64.max - 1, 2**63 - 1, 14, 15]], dtype=np.uint64),
        ),
        "fp16": ("FP16", fp16),
        "fp32": ("FP32", fp32),
        "fp64": ("FP64", fp64),
        "string": ("BYTES", strings),
    }


def _all_dtypes_inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for suffix, (datatype, array) in _all_dtypes_arrays().items():
        tensor = grpcclient.InferInput(f"in_{suffix}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _check_all_dtypes(result: Any) -> None:
    response = result.get_response()
    returned = {o.name: o for o in response.outputs}
    assert set(returned) == {f"out_{s}" for s in _all_dtypes_arrays()}
    for suffix, (datatype, sent) in _all_dtypes_arrays().items():
        name = f"out_{suffix}"
        assert returned[name].datatype == datatype, name
        assert list(returned[name].shape) == list(sent.shape), name
        got = result.as_numpy(name)
        assert got.shape == sent.shape, name
        if datatype == "BYTES":
            expected = [s.encode("utf-8") for s in sent.reshape(-1)]
            assert [bytes(x) for x in got.reshape(-1)] == expected, name
        else:
            assert got.dtype == sent.dtype, name
            # Bit-exact, so -0.0, infinities and subnormals count too.
            assert got.tobytes() == sent.tobytes(), name


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """A second agent on the example repository with ``--model-control explicit``."""
    tmp = tmp_path_factory.mktemp("explicit")
    config = agent_config(
        tmp,
        # Explicit model control loads only the startup models (none by default).
        repository={"path": str(EXAMPLE_MODELS), "startup_models": [TABULAR, TEXT, ALL]},
        state={"dir": str(tmp / "state")},
        telemetry={"prometheus_address": ""},  # no fixed port shared between agents
        control={"enabled": True},  # the load/unload RPCs (unauthenticated here)
    )
    agent = AgentProcess(config, extra_args=["--model-control", "explicit"])
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def explicit_client(explicit_agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(explicit_agent.address)
    yield client
    client.close()


# -- health and metadata --------------------------------------------------------


def test_server_live_and_ready(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True


def test_model_ready(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_model_ready(TABULAR)
    assert triton.is_model_ready(TEXT)
    assert triton.is_model_ready(ALL, "1")
    assert triton.is_model_ready(TABULAR, "2")
    # latest 1: version 1 exists on disk but is not served
    assert not triton.is_model_ready(TABULAR, "1")
    assert not triton.is_model_ready(TABULAR, "3")
    assert not triton.is_model_ready("no_such_model")


def test_server_metadata(triton: grpcclient.InferenceServerClient) -> None:
    meta = triton.get_server_metadata()
    assert meta.name == "edge-agent"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", meta.version)
    for extension in ("model_repository", "model_configuration", "statistics"):
        assert extension in meta.extensions
    as_json = triton.get_server_metadata(as_json=True)
    assert as_json["name"] == "edge-agent"


def test_model_metadata_tabular(triton: grpcclient.InferenceServerClient) -> None:
    meta = triton.get_model_metadata(TABULAR)
    assert meta.name == TABULAR
    assert list(meta.versions) == ["2"]
    assert meta.platform == "onnxruntime_onnx"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert inputs == {"features": ("FP32", [-1, 8])}
    assert outputs == {"probabilities": ("FP32", [-1, 3]), "label": ("INT64", [-1, 1])}
    assert triton.get_model_metadata(TABULAR, "2").name == TABULAR


def test_model_metadata_text_and_all_dtypes(triton: grpcclient.InferenceServerClient) -> None:
    text = triton.get_model_metadata(TEXT, as_json=True)
    assert text["versions"] == ["1"]
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in text["inputs"]}
    assert shapes == {
        "tokens": ("INT64", [-1, 4]),
        "category": ("BYTES", [-1, 1]),
        "weight": ("FP64", [-1, 1]),
    }
    every = triton.get_model_metadata(ALL)
    # max_batch_size 0: no batch dimension added, both dims dynamic
    assert {t.name: list(t.shape) for t in every.inputs} == {
        f"in_{s}": [-1, -1] for s in _all_dtypes_arrays()
    }
    assert {t.name: t.datatype for t in every.outputs} == {
        f"out_{s}": d for s, (d, _) in _all_dtypes_arrays().items()
    }


def test_model_metadata_unknown(triton: grpcclient.InferenceServerClient) -> None:
    error = _error_of(lambda: triton.get_model_metadata("no_such_model"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in error.message()


def test_model_config_tabular(triton: grpcclient.InferenceServerClient) -> None:
    config = triton.get_model_config(TABULAR).config
    assert config.name == TABULAR
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert config.version_policy.latest.num_versions == 1
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [8])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("probabilities", [3]),
        ("label", [1]),
    ]
    assert config.instance_group[0].count == 1
    # json form as perf_analyzer reads it: enum names, not numbers
    as_json = triton.get_model_config(TABULAR, as_json=True)["config"]
    assert as_json["input"][0]["data_type"] == "TYPE_FP32"
    assert as_json["output"][1]["data_type"] == "TYPE_INT64"
    assert as_json["max_batch_size"] == 64


def test_model_config_completed_from_graph(triton: grpcclient.InferenceServerClient) -> None:
    config = triton.get_model_config(TEXT).config
    assert config.max_batch_size == 32
    assert not config.HasField("dynamic_batching")
    # completed by the agent where config.pbtxt says nothing
    assert config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert len(config.instance_group) >= 1 and config.instance_group[0].count >= 1
    types = {i.name: i.data_type for i in config.input}
    from tritonclient.grpc import model_config_pb2 as mc

    assert types == {
        "tokens": mc.TYPE_INT64,
        "category": mc.TYPE_STRING,
        "weight": mc.TYPE_FP64,
    }


def test_model_config_unknown(triton: grpcclient.InferenceServerClient) -> None:
    error = _error_of(lambda: triton.get_model_config("no_such_model"))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_repository_index(triton: grpcclient.InferenceServerClient) -> None:
    index = triton.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in index.models}
    assert entries[(TABULAR, "2")] == "READY"
    assert entries[(TEXT, "1")] == "READY"
    assert entries[(ALL, "1")] == "READY"
    assert {TABULAR, TEXT, ALL} <= {name for name, _ in entries}
    as_json = triton.get_model_repository_index(as_json=True)
    assert {TABULAR, TEXT, ALL} <= {m["name"] for m in as_json["models"]}


# -- statistics -------------------------------------------------------------------


def _stats(client: grpcclient.InferenceServerClient, model: str) -> Any:
    reply = client.get_inference_statistics(model)
    assert len(reply.model_stats) == 1
    return reply.model_stats[0]


def _text_inputs(rows: int) -> list[grpcclient.InferInput]:
    tokens = np.arange(rows * 4, dtype=np.int64).reshape(rows, 4)
    category = np.array([["red"]] * rows, dtype=np.object_)
    weight = np.ones((rows, 1), dtype=np.float64)
    inputs = []
    for name, datatype, array in (
        ("tokens", "INT64", tokens),
        ("category", "BYTES", category),
        ("weight", "FP64", weight),
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_statistics_move_after_inference(triton: grpcclient.InferenceServerClient) -> None:
    # text_features has no dynamic batching: one request is one execution.
    before = _stats(triton, TEXT)
    rows = (1, 3, 3, 2)
    for r in rows:
        triton.infer(TEXT, _text_inputs(r))
    after = _stats(triton, TEXT)
    assert after.name == TEXT and after.version == "1"
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == len(rows)
    assert s1.success.ns > s0.success.ns
    assert s1.queue.count - s0.queue.count == len(rows)
    assert s1.compute_infer.count - s0.compute_infer.count == len(rows)
    assert s1.compute_infer.ns > s0.compute_infer.ns
    assert s1.fail.count == s0.fail.count
    assert after.inference_count - before.inference_count == sum(rows)
    assert after.execution_count - before.execution_count == len(rows)
    assert after.last_inference >= before.last_inference
    assert abs(after.last_inference / 1000 - time.time()) < 600  # ms since the epoch
    count_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    count_after = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    for size, runs in ((1, 1), (2, 1), (3, 2)):
        assert count_after.get(size, 0) - count_before.get(size, 0) == runs, size


def test_statistics_count_failures(triton: grpcclient.InferenceServerClient) -> None:
    before = _stats(triton, TABULAR).inference_stats
    bad = grpcclient.InferInput("features", [1, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 7), np.float32))
    error = _error_of(lambda: triton.infer(TABULAR, [bad]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "features" in error.message()
    after = _stats(triton, TABULAR).inference_stats
    assert after.fail.count - before.fail.count == 1
    assert after.success.count == before.success.count


def test_statistics_with_dynamic_batching(triton: grpcclient.InferenceServerClient) -> None:
    before = _stats(triton, TABULAR)
    results: list[Any] = []
    errors: list[Any] = []

    def done(result: Any, error: Any) -> None:
        (errors if error is not None else results).append(error or result)

    count = 24
    for i in range(count):
        triton.async_infer(TABULAR, [_features_input(_features(1, i))], callback=done)
    deadline = time.monotonic() + WAIT_S
    while len(results) + len(errors) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not errors and len(results) == count
    after = _stats(triton, TABULAR)
    assert after.inference_stats.success.count - before.inference_stats.success.count == count
    assert after.inference_count - before.inference_count == count
    executions = after.execution_count - before.execution_count
    assert 1 <= executions <= count
    runs = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    runs_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    samples = sum(size * (n - runs_before.get(size, 0)) for size, n in runs.items())
    assert samples == count
    assert sum(n - runs_before.get(size, 0) for size, n in runs.items()) == executions


def test_statistics_all_models_and_unknown(triton: grpcclient.InferenceServerClient) -> None:
    every = triton.get_inference_statistics()
    served = {(m.name, m.version) for m in every.model_stats}
    assert {(TABULAR, "2"), (TEXT, "1"), (ALL, "1")} <= served
    assert (TABULAR, "1") not in served  # not loaded, so no statistics
    error = _error_of(lambda: triton.get_inference_statistics("no_such_model"))
    assert error.status() == "StatusCode.NOT_FOUND"


# -- inference ----------------------------------------------------------------------


def test_infer_matches_onnxruntime_and_echoes_id(
    triton: grpcclient.InferenceServerClient,
) -> None:
    data = _features(5, 1)
    result = triton.infer(TABULAR, [_features_input(data)], request_id="req-7 ünïcode")
    response = result.get_response()
    assert response.id == "req-7 ünïcode"
    assert response.model_name == TABULAR
    assert response.model_version == "2"
    expected = _reference(TABULAR, 2, {"features": data})
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    assert result.as_numpy("label").dtype == np.int64
    assert result.as_numpy("label").shape == (5, 1)


def test_infer_without_request_id(triton: grpcclient.InferenceServerClient) -> None:
    result = triton.infer(TABULAR, [_features_input(_features(1, 2))])
    assert result.get_response().id == ""


def test_requested_output_subset(triton: grpcclient.InferenceServerClient) -> None:
    data = _features(3, 3)
    expected = _reference(TABULAR, 2, {"features": data})
    only_label = triton.infer(
        TABULAR, [_features_input(data)], outputs=[grpcclient.InferRequestedOutput("label")]
    )
    assert [o.name for o in only_label.get_response().outputs] == ["label"]
    assert len(only_label.get_response().raw_output_contents) == 1
    assert only_label.as_numpy("probabilities") is None
    np.testing.assert_array_equal(only_label.as_numpy("label"), expected["label"])

    only_probs = triton.infer(
        TABULAR,
        [_features_input(data)],
        outputs=[grpcclient.InferRequestedOutput("probabilities")],
    )
    assert [o.name for o in only_probs.get_response().outputs] == ["probabilities"]
    assert only_probs.as_numpy("label") is None

    text = triton.infer(
        TEXT,
        _text_inputs(2),
        outputs=[
            grpcclient.InferRequestedOutput("category_upper"),
            grpcclient.InferRequestedOutput("token_sum"),
        ],
    )
    assert [o.name for o in text.get_response().outputs] == ["category_upper", "token_sum"]


def test_requested_output_unknown(triton: grpcclient.InferenceServerClient) -> None:
    error = _error_of(
        lambda: triton.infer(
            TABULAR,
            [_features_input(_features(1, 4))],
            outputs=[grpcclient.InferRequestedOutput("no_such_output")],
        )
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "no_such_output" in error.message()


def test_all_datatypes_round_trip(triton: grpcclient.InferenceServerClient) -> None:
    _check_all_dtypes(triton.infer(ALL, _all_dtypes_inputs(), request_id="dtypes"))


def test_all_datatypes_other_shapes(triton: grpcclient.InferenceServerClient) -> None:
    # dims [-1, -1]: each input takes its own shape, including empty ones.
    inputs = []
    shapes: dict[str, tuple[int, int]] = {}
    for k, (suffix, (datatype, array)) in enumerate(_all_dtypes_arrays().items()):
        shape = (1, 0) if k % 3 == 0 else (array.size, 1)
        part = array.reshape(-1)[: shape[0] * shape[1]].reshape(shape)
        tensor = grpcclient.InferInput(f"in_{suffix}", list(shape), datatype)
        tensor.set_data_from_numpy(part)
        inputs.append(tensor)
        shapes[f"out_{suffix}"] = shape
    result = triton.infer(ALL, inputs)
    for output in result.get_response().outputs:
        assert tuple(output.shape) == shapes[output.name], output.name


def test_bytes_that_are_not_utf8_are_rejected(triton: grpcclient.InferenceServerClient) -> None:
    inputs = _all_dtypes_inputs()
    bad = np.array([[b"ok", b"\xff\xfe not utf-8"]], dtype=np.object_)
    inputs[-1] = grpcclient.InferInput("in_string", [1, 2], "BYTES")
    inputs[-1].set_data_from_numpy(bad)
    error = _error_of(lambda: triton.infer(ALL, inputs))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "in_string" in error.message()


def test_text_features_outputs(triton: grpcclient.InferenceServerClient) -> None:
    tokens = np.array([[1, 2, 3, 4], [10, 20, 30, 40], [-5, 0, 5, 7], [0, 0, 0, 0]], dtype=np.int64)
    category = np.array([["red"], ["green"], ["blue"], ["purple"]], dtype=np.object_)
    weight = np.array([[0.5], [2.0], [-1.5], [3.0]], dtype=np.float64)
    inputs = []
    for name, datatype, array in (
        ("tokens", "INT64", tokens),
        ("category", "BYTES", category),
        ("weight", "FP64", weight),
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = triton.infer(TEXT, inputs)
    token_sum = tokens.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(result.as_numpy("token_sum"), token_sum)
    np.testing.assert_array_equal(result.as_numpy("category_id"), [[0], [1], [2], [-1]])
    np.testing.assert_array_equal(result.as_numpy("weighted"), weight * token_sum)
    assert result.as_numpy("weighted").dtype == np.float64
    upper = [bytes(x) for x in result.as_numpy("category_upper").reshape(-1)]
    assert upper == [b"RED", b"GREEN", b"BLUE", b"PURPLE"]
    # the same answers onnxruntime gives for the same file
    expected = _reference(
        TEXT, 1, {"tokens": tokens, "category": category.astype(str), "weight": weight}
    )
    np.testing.assert_array_equal(result.as_numpy("token_sum"), expected["token_sum"])
    np.testing.assert_array_equal(result.as_numpy("category_id"), expected["category_id"])


def test_specific_model_version(triton: grpcclient.InferenceServerClient) -> None:
    data = _features(4, 5)
    result = triton.infer(TABULAR, [_features_input(data)], model_version="2")
    assert result.get_response().model_version == "2"
    v2 = _reference(TABULAR, 2, {"features": data})["probabilities"]
    v1 = _reference(TABULAR, 1, {"features": data})["probabilities"]
    assert not np.allclose(v1, v2)  # the versions really differ
    np.testing.assert_allclose(result.as_numpy("probabilities"), v2, rtol=1e-6, atol=1e-7)

    # Only version 2 is served (latest 1): version 1 is refused, and the error names it.
    error = _error_of(lambda: triton.infer(TABULAR, [_features_input(data)], model_version="1"))
    assert error.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
    assert re.search(r"\b1\b", error.message()), error.message()
    assert TABULAR in error.message()
    error = _error_of(lambda: triton.infer(TABULAR, [_features_input(data)], model_version="17"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "17" in error.message()


def test_unknown_model_infer(triton: grpcclient.InferenceServerClient) -> None:
    error = _error_of(lambda: triton.infer("no_such_model", [_features_input(_features(1, 0))]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in error.message()


# -- bidirectional stream -------------------------------------------------------------


def test_stream_ids_matched_and_errors_do_not_break_it(
    triton: grpcclient.InferenceServerClient,
) -> None:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def callback(sink: queue.Queue[tuple[Any, Any]], result: Any, error: Any) -> None:
        sink.put((result, error))

    data = {f"s{i}": _features(i + 1, 100 + i) for i in range(8)}
    triton.start_stream(callback=partial(callback, got))
    try:
        ids = list(data)
        for i, request_id in enumerate(ids):
            if i == 3:  # a bad request in the middle of the stream
                bad = grpcclient.InferInput("features", [1, 9], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 9), np.float32))
                triton.async_stream_infer(TABULAR, [bad], request_id="bad")
            if i == 5:  # and one for a model that does not exist
                triton.async_stream_infer(
                    "no_such_model", [_features_input(data[request_id])], request_id="gone"
                )
            triton.async_stream_infer(
                TABULAR, [_features_input(data[request_id])], request_id=request_id
            )
        replies = [got.get(timeout=WAIT_S) for _ in range(len(ids) + 2)]
    except BaseException:
        triton.stop_stream(cancel_requests=True)  # do not wait on a stuck stream
        raise
    triton.stop_stream()
    errors = [e for r, e in replies if e is not None]
    results = {r.get_response().id: r for r, e in replies if e is None}
    assert set(results) == set(ids)
    for request_id, result in results.items():
        expected = _reference(TABULAR, 2, {"features": data[request_id]})
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7
        )
    messages = sorted(str(e.message()) for e in errors)
    assert len(messages) == 2
    assert any("features" in m for m in messages), messages
    assert any("no_such_model" in m for m in messages), messages
    assert got.empty()


def test_stream_can_be_reopened(triton: grpcclient.InferenceServerClient) -> None:
    for round_ in range(2):
        got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        triton.start_stream(callback=lambda result, error, sink=got: sink.put((result, error)))
        try:
            triton.async_stream_infer(TEXT, _text_inputs(2), request_id=f"round{round_}")
            result, error = got.get(timeout=WAIT_S)
        except BaseException:
            triton.stop_stream(cancel_requests=True)
            raise
        triton.stop_stream()
        assert error is None
        assert result.get_response().id == f"round{round_}"


# -- load / unload ----------------------------------------------------------------


def test_load_unload_refused_without_explicit_control(
    triton: grpcclient.InferenceServerClient,
) -> None:
    for call in (lambda: triton.load_model(TABULAR), lambda: triton.unload_model(TABULAR)):
        error = _error_of(call)
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert "model control" in error.message()
        assert "explicit" in error.message()
    assert triton.is_model_ready(TABULAR)  # nothing changed


def test_explicit_unload_then_load(explicit_client: grpcclient.InferenceServerClient) -> None:
    client = explicit_client
    assert client.is_model_ready(TABULAR)
    data = _features(2, 9)
    before = client.infer(TABULAR, [_features_input(data)]).as_numpy("probabilities")

    client.unload_model(TABULAR)
    assert not client.is_model_ready(TABULAR)
    assert not client.is_model_ready(TABULAR, "2")
    assert client.is_model_ready(TEXT)  # others untouched
    error = _error_of(lambda: client.infer(TABULAR, [_features_input(data)]))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert TABULAR in error.message()
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[(TABULAR, "2")].state == "UNAVAILABLE"
    assert index[(TABULAR, "2")].reason
    listed = client.get_model_repository_index(as_json=True)
    assert {TABULAR, TEXT, ALL} <= {m["name"] for m in listed["models"]}

    client.load_model(TABULAR)
    assert client.is_model_ready(TABULAR)
    after = client.infer(TABULAR, [_features_input(data)]).as_numpy("probabilities")
    np.testing.assert_array_equal(before, after)
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[(TABULAR, "2")] == "READY"


def test_explicit_load_unknown(explicit_client: grpcclient.InferenceServerClient) -> None:
    error = _error_of(lambda: explicit_client.load_model("no_such_model"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in error.message()
    error = _error_of(lambda: explicit_client.unload_model("no_such_model"))
    assert error.status() == "StatusCode.NOT_FOUND"
    # a name that would walk out of the repository is not a model name
    error = _error_of(lambda: explicit_client.load_model("../models"))
    assert error.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    assert explicit_client.is_server_ready()


# -- asyncio client -----------------------------------------------------------------


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S * 2))


async def _requests(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def test_aio_health_metadata_config_index(example_agent: AgentProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(example_agent.address) as client:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready(TABULAR)
            assert await client.is_model_ready(TABULAR, "2")
            assert not await client.is_model_ready(TABULAR, "1")
            assert not await client.is_model_ready("no_such_model")
            meta = await client.get_server_metadata()
            assert meta.name == "edge-agent"
            model = await client.get_model_metadata(TABULAR)
            assert list(model.versions) == ["2"]
            assert [list(t.shape) for t in model.inputs] == [[-1, 8]]
            error = await _aerror_of(client.get_model_metadata("no_such_model"))
            assert error.status() == "StatusCode.NOT_FOUND"
            config = (await client.get_model_config(TABULAR)).config
            assert config.max_batch_size == 64
            assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
            index = await client.get_model_repository_index()
            assert {TABULAR, TEXT, ALL} <= {m.name for m in index.models}

    _run(main())


def test_aio_infer_stats_and_datatypes(example_agent: AgentProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(example_agent.address) as client:
            before = (await client.get_inference_statistics(TABULAR)).model_stats[0]
            data = [_features(2, 200 + i) for i in range(6)]
            results = await asyncio.gather(
                *(
                    client.infer(
                        TABULAR,
                        [_features_input(d)],
                        request_id=f"aio{i}",
                        outputs=[aioclient.InferRequestedOutput("probabilities")],
                    )
                    for i, d in enumerate(data)
                )
            )
            for i, (d, result) in enumerate(zip(data, results, strict=True)):
                assert result.get_response().id == f"aio{i}"
                assert [o.name for o in result.get_response().outputs] == ["probabilities"]
                expected = _reference(TABULAR, 2, {"features": d})["probabilities"]
                np.testing.assert_allclose(
                    result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-7
                )
            after = (await client.get_inference_statistics(TABULAR)).model_stats[0]
            assert after.inference_stats.success.count - before.inference_stats.success.count == 6
            assert after.inference_count - before.inference_count == 12
            assert after.execution_count > before.execution_count

            _check_all_dtypes(await client.infer(ALL, _all_dtypes_inputs()))

            error = await _aerror_of(
                client.infer(TABULAR, [_features_input(data[0])], model_version="1")
            )
            assert re.search(r"\b1\b", error.message())

    _run(main())


def test_aio_stream(example_agent: AgentProcess) -> None:
    data = {f"a{i}": _features(1, 300 + i) for i in range(6)}
    bad = grpcclient.InferInput("features", [1, 8], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 8), np.float64))
    items: list[dict[str, Any]] = [
        {"model_name": TABULAR, "inputs": [_features_input(d)], "request_id": rid}
        for rid, d in data.items()
    ]
    items.insert(2, {"model_name": TABULAR, "inputs": [bad], "request_id": "bad"})
    items.append({"model_name": TEXT, "inputs": _text_inputs(1), "request_id": "text"})

    async def main() -> list[tuple[Any, Any]]:
        async with aioclient.InferenceServerClient(example_agent.address) as client:
            replies: list[tuple[Any, Any]] = []
            stream = client.stream_infer(_requests(items), stream_timeout=WAIT_S)
            async for result, error in stream:
                replies.append((result, error))
                if len(replies) == len(items):
                    break
            return replies

    replies = _run(main())
    errors = [e for _, e in replies if e is not None]
    results = {r.get_response().id: r for r, e in replies if e is None}
    assert set(results) == {*data, "text"}
    assert len(errors) == 1
    assert "features" in errors[0].message() and "FP64" in errors[0].message()
    for rid, d in data.items():
        expected = _reference(TABULAR, 2, {"features": d})["label"]
        np.testing.assert_array_equal(results[rid].as_numpy("label"), expected)
    np.testing.assert_array_equal(results["text"].as_numpy("token_sum"), [[6]])


def test_aio_load_unload(explicit_agent: AgentProcess, example_agent: AgentProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(example_agent.address) as client:
            error = await _aerror_of(client.unload_model(TEXT))
            assert error.status() == "StatusCode.FAILED_PRECONDITION"
        async with aioclient.InferenceServerClient(explicit_agent.address) as client:
            await client.unload_model(TEXT)
            assert not await client.is_model_ready(TEXT)
            await client.load_model(TEXT)
            assert await client.is_model_ready(TEXT)
            result = await client.infer(TEXT, _text_inputs(1))
            np.testing.assert_array_equal(result.as_numpy("token_sum"), [[6]])
            error = await _aerror_of(client.load_model("no_such_model"))
            assert error.status() == "StatusCode.NOT_FOUND"

    _run(main())
