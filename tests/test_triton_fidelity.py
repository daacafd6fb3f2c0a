"""Triton fidelity through tritonclient against a real agent process: the
classification extension and label files, config.pbtxt fields refused by name
or implemented (model_warmup), reshape and rank-0 inputs, models with
non-tensor outputs, explicit model control with no startup models, and
auto-completed max_batch_size for dynamic batching.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.agent_process import REPO_ROOT, AgentProcess, write_toml
from tests.serving_models import make_repository, scale_and_echo_model, serving_config

Array = np.ndarray[Any, Any]
TIMEOUT_S = 30.0


def _onnx(nodes: list[Any], inputs: list[Any], outputs: list[Any],
          initializers: list[Any] | None = None, ml: bool = False) -> bytes:
    graph = helper.make_graph(nodes, "fidelity", inputs, outputs, initializer=initializers or [])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def scores_model() -> bytes:
    """``scores`` FP32 [b, 4] -> ``probs`` (identity): what a classifier head returns."""
    return _onnx(
        [helper.make_node("Identity", ["scores"], ["probs"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", 4])],
    )


def grid_reshape_model() -> bytes:
    """``x`` FP32 [b, 2, 2] -> ``y`` = x + 1, [b, 2, 2]."""
    return _onnx(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 2])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )


def scalar_input_model() -> bytes:
    """``audio`` FP32 [n] and ``sr`` INT64 rank 0 (a sample rate) -> ``y`` = audio * sr."""
    return _onnx(
        [
            helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["audio", "srf"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )


def zipmap_model() -> bytes:
    """ONNX-ML: ``x`` FP32 [n, 3] -> ``probs`` (tensor) and ``zipped`` seq(map(int64, float))."""
    zipped = onnx.ValueInfoProto()
    zipped.name = "zipped"
    map_type = helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    )
    zipped.type.CopyFrom(helper.make_sequence_type_proto(map_type))
    return _onnx(
        [
            helper.make_node("Identity", ["x"], ["probs"]),
            helper.make_node("ZipMap", ["probs"], ["zipped"], domain="ai.onnx.ml",
                             classlabels_int64s=[0, 1, 2]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3]), zipped],
        ml=True,
    )


CLASSIFIER_CONFIG = """
max_batch_size: 8
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
"""
RESHAPE_CONFIG = """
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]
"""
ZIPMAP_CONFIG = """
output [ { name: "probs" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
"""
WARMUP_CONFIG = """
max_batch_size: 4
model_warmup [ { name: "zeros" batch_size: 2 count: 3
  inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 2 ] zero_data: true } } },
  { name: "random" batch_size: 1
  inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 2 ] random_data: true } } } ]
"""
BAD_WARMUP_CONFIG = """
max_batch_size: 4
model_warmup [ { name: "wrong_dims" batch_size: 1
  inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } } ]
"""
DYNAMIC_CONFIG = "dynamic_batching { }\n"

# field in config.pbtxt -> its name in the refusal
REFUSED = {
    "response_cache": ("response_cache { enable: true }", "response_cache.enable"),
    "accelerators": (
        'optimization { execution_accelerators { cpu_execution_accelerator { name: "openvino" } } '
        '}',
        "optimization.execution_accelerators",
    ),
    "pinned": ("optimization { input_pinned_memory { enable: true } }",
               "optimization.input_pinned_memory"),
    "warmup_file": (
        'model_warmup [ { name: "f" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] '
        'input_data_file: "raw" } } } ]',
        "model_warmup.inputs.input_data_file",
    ),
    "ort_parameters": ('parameters { key: "intra_op_thread_count" value: { string_value: "2" } }',
                       "parameters[intra_op_thread_count]"),
    "decoupled": ("model_transaction_policy { decoupled: true }",
                  "model_transaction_policy.decoupled"),
}
LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("fidelity")
    models: dict[str, tuple[bytes, str | None]] = {
        "classifier": (scores_model(), CLASSIFIER_CONFIG),
        "plain_scores": (scores_model(), None),
        "reshaped": (grid_reshape_model(), RESHAPE_CONFIG),
        "scalar": (scalar_input_model(), None),
        "scalar_dims": (scalar_input_model(),
                        'input [ { name: "sr" data_type: TYPE_INT64 dims: [] '
                        "reshape: { shape: [] } } ]\n"),
        "zipmap": (zipmap_model(), ZIPMAP_CONFIG),
        "zipmap_auto": (zipmap_model(), None),
        "warmed": (grid_reshape_model(), WARMUP_CONFIG),
        "bad_warmup": (grid_reshape_model(), BAD_WARMUP_CONFIG),
        "dynamic": (scale_and_echo_model(), DYNAMIC_CONFIG),
    }
    for name, (field, _) in REFUSED.items():
        models[f"refused_{name}"] = (scale_and_echo_model(), field + "\n")
    repo = make_repository(tmp / "models", models)
    (repo / "classifier" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    with AgentProcess(write_toml(tmp / "agent.toml", serving_config(tmp, repo))) as proc:
        proc.wait_serving()
        yield proc


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(agent.address)
    yield c
    c.close()


def _input(name: str, data: Array, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def _reasons(client: grpcclient.InferenceServerClient) -> dict[str, str]:
    index = client.get_model_repository_index(as_json=True)
    return {m["name"]: m.get("reason", "") for m in index.get("models", [])}


# -- 2. classification ------------------------------------------------------


def test_class_count_returns_top_k_with_labels(client: grpcclient.InferenceServerClient) -> None:
    scores = np.array([[0.1, 0.7, 0.05, 0.15], [0.5, 0.2, 0.25, 0.05]], np.float32)
    result = client.infer(
        "classifier", [_input("scores", scores, "FP32")],
        outputs=[grpcclient.InferRequestedOutput("probs", class_count=2)],
    )
    got = result.as_numpy("probs")
    assert got.shape == (2, 2)
    assert [[v.decode() for v in row] for row in got] == [
        ["0.700000:1:dog", "0.150000:3:fish"],
        ["0.500000:0:cat", "0.250000:2:bird"],
    ]
    assert result.get_output("probs").datatype == "BYTES"


def test_class_count_without_labels_and_capped(client: grpcclient.InferenceServerClient) -> None:
    scores = np.array([[3.0, 1.0, 2.0, 0.0]], np.float32)
    result = client.infer(
        "plain_scores", [_input("scores", scores, "FP32")],
        outputs=[grpcclient.InferRequestedOutput("probs", class_count=10)],
    )
    got = result.as_numpy("probs")
    assert got.shape == (4,)  # no batching: [k], k capped at the number of classes
    assert [v.decode() for v in got] == [
        "3.000000:0", "2.000000:2", "1.000000:1", "0.000000:3"
    ]
    # Without class_count the output is the plain tensor, as before.
    plain = client.infer("plain_scores", [_input("scores", scores, "FP32")])
    np.testing.assert_array_equal(plain.as_numpy("probs"), scores)


# -- 3. config.pbtxt fields: refused by name, or implemented -------------------


def test_unsupported_fields_are_refused_by_name(client: grpcclient.InferenceServerClient) -> None:
    reasons = _reasons(client)
    for name, (_, field) in REFUSED.items():
        model = f"refused_{name}"
        assert not client.is_model_ready(model), model
        assert field in reasons[model], (model, reasons[model])


def test_model_warmup_runs_and_a_bad_one_fails_the_load(
    client: grpcclient.InferenceServerClient,
) -> None:
    assert client.is_model_ready("warmed")
    config = client.get_model_config("warmed", as_json=True)["config"]
    assert [w["name"] for w in config["model_warmup"]] == ["zeros", "random"]
    assert not client.is_model_ready("bad_warmup")
    reason = _reasons(client)["bad_warmup"]
    assert "wrong_dims" in reason and "'x'" in reason, reason


# -- 4. reshape and rank-0 inputs -------------------------------------------


def test_reshape_wire_shape_is_config_dims(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer("reshaped", [_input("x", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    meta = client.get_model_metadata("reshaped", as_json=True)
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 4]
    assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, 4]
    config = client.get_model_config("reshaped", as_json=True)["config"]
    assert [int(d) for d in config["input"][0]["reshape"]["shape"]] == [2, 2]
    with pytest.raises(InferenceServerException) as info:
        client.infer("reshaped", [_input("x", x.reshape(2, 2, 2), "FP32")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_rank0_input_as_triton_completes_it(client: grpcclient.InferenceServerClient) -> None:
    audio = np.array([1.0, -2.0, 0.5], np.float32)
    config = client.get_model_config("scalar", as_json=True)["config"]
    sr = next(i for i in config["input"] if i["name"] == "sr")
    assert [int(d) for d in sr["dims"]] == [1] and "reshape" in sr  # reshape: { shape: [] }
    meta = client.get_model_metadata("scalar", as_json=True)
    assert [int(d) for d in next(i for i in meta["inputs"] if i["name"] == "sr")["shape"]] == [1]
    # What perf_analyzer sends (the metadata shape [1]) and the scalar itself both work.
    for model in ("scalar", "scalar_dims"):
        for sr_value in (np.array([16000], np.int64), np.array(8000, np.int64)):
            result = client.infer(model, [_input("audio", audio, "FP32"),
                                          _input("sr", sr_value, "INT64")])
            np.testing.assert_array_equal(
                result.as_numpy("y"), audio * float(sr_value.reshape(-1)[0])
            )


# -- 5. non-tensor outputs ----------------------------------------------------


def test_model_with_a_sequence_of_maps_output_serves_its_tensors(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = np.array([[0.2, 0.3, 0.5]], np.float32)
    for model in ("zipmap", "zipmap_auto"):
        assert client.is_model_ready(model), _reasons(client).get(model)
        result = client.infer(model, [_input("x", x, "FP32")])
        np.testing.assert_array_equal(result.as_numpy("probs"), x)
        meta = client.get_model_metadata(model, as_json=True)
        assert [o["name"] for o in meta["outputs"]] == ["probs"]


# -- 6. auto-completed max_batch_size; explicit model control ---------------------


def test_dynamic_batching_without_max_batch_size_completes_it(
    client: grpcclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("dynamic", as_json=True)["config"]
    assert int(config["max_batch_size"]) == 4  # Triton's default-max-batch-size
    assert "dynamic_batching" in config
    x = np.ones((3, 4), np.float32)
    tag = np.array([[b"a"], [b"b"], [b"c"]], dtype=object)
    result = client.infer("dynamic", [_input("x", x, "FP32"), _input("tag", tag, "BYTES")])
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)


def test_explicit_model_control_without_startup_models_loads_none(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "models", {"scaler": (scale_and_echo_model(), None)})
    config = serving_config(tmp_path, repo, control={"enabled": True})
    config["repository"]["model_control"] = "explicit"  # and no startup_models
    with AgentProcess(write_toml(tmp_path / "agent.toml", config)) as proc:
        proc.wait_serving()
        c = grpcclient.InferenceServerClient(proc.address)
        try:
            assert c.is_server_ready()
            assert not c.is_model_ready("scaler")
            # As Triton, the index lists what can be loaded, unloaded.
            index = c.get_model_repository_index(as_json=True)["models"]
            assert [m["name"] for m in index] == ["scaler"]
            assert index[0].get("state", "") != "READY"
            c.load_model("scaler", client_timeout=TIMEOUT_S)
            assert c.is_model_ready("scaler")
        finally:
            c.close()


# -- perf_analyzer: rank-0 inputs, and system shared memory ------------------------

PERF_TOOLS = REPO_ROOT / ".venv" / "perf-tools"
PERF_ANALYZER = PERF_TOOLS / "bin" / "perf_analyzer"


def _perf_analyzer(address: str, model: str, *extra: str) -> str:
    args = [
        str(PERF_ANALYZER), "-m", model, "-u", address, "-i", "grpc",
        "--concurrency-range", "1", "--measurement-interval", "300", "--max-trials", "5",
        "--stability-percentage", "1000", *extra,
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(PERF_TOOLS / "lib")}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    # A busy machine may never be "stable" (exit 2): that is no protocol failure, but
    # any request error is.
    assert "error" not in output.replace("Failed to obtain stable", "").lower(), output
    if done.returncode != 0:
        assert "Failed to obtain stable measurement" in output, output
    else:
        assert re.search(r"Concurrency: 1, throughput: [\d.]+ infer/sec", output), output
    return output


@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="perf_analyzer not unpacked (tests/run.sh)")
def test_perf_analyzer_sends_a_rank0_input(agent: AgentProcess) -> None:
    _perf_analyzer(agent.address, "scalar", "--shape", "audio:16")


@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="perf_analyzer not unpacked (tests/run.sh)")
def test_perf_analyzer_with_system_shared_memory(tmp_path: Path) -> None:
    repo = make_repository(
        tmp_path / "models", {"reshaped": (grid_reshape_model(), RESHAPE_CONFIG)}
    )
    config = serving_config(tmp_path, repo, server={"shared_memory": "system"})
    with AgentProcess(write_toml(tmp_path / "agent.toml", config)) as proc:
        proc.wait_serving()
        _perf_analyzer(proc.address, "reshaped", "--shared-memory", "system",
                       "--output-shared-memory-size", "64")
