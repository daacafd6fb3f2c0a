"""Small ONNX models and model repositories built by the serving tests.

Pure test helpers: they use ``onnx`` and ``onnxruntime`` only and never import
``agent.wire`` (so tritonclient can share the process with them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    initializers: list[Any] | None = None,
    name: str = "test",
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model.SerializeToString()


def scale_and_echo_model() -> bytes:
    """``x`` FP32 [b, 4] -> ``y`` = 2x; ``tag`` STRING [b, 1] -> ``tag_out`` (identity)."""
    return _model(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("Identity", ["tag"], ["tag_out"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["b", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["b", 1]),
        ],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
        "scale_and_echo",
    )


def grid_model() -> bytes:
    """No batching: ``m`` INT32 [n, 3] -> ``m_plus_one``; ``words`` STRING [k] -> ``words_out``."""
    return _model(
        [
            helper.make_node("Add", ["m", "one"], ["m_plus_one"]),
            helper.make_node("Identity", ["words"], ["words_out"]),
        ],
        [
            helper.make_tensor_value_info("m", TensorProto.INT32, ["n", 3]),
            helper.make_tensor_value_info("words", TensorProto.STRING, ["k"]),
        ],
        [
            helper.make_tensor_value_info("m_plus_one", TensorProto.INT32, ["n", 3]),
            helper.make_tensor_value_info("words_out", TensorProto.STRING, ["k"]),
        ],
        [numpy_helper.from_array(np.array(1, np.int32), "one")],
        "grid",
    )


def row_wise_model() -> bytes:
    """Every output row depends only on its own input row, so batching must not change it.

    ``x`` FP32 [b, 4] -> ``y`` = 3x + 1 (elementwise: bit-exact at any batch size);
    ``k`` INT64 [b, 2] -> ``k_sum`` = row sum [b, 1];
    ``tag`` STRING [b, 1] -> ``tag_out`` (identity).
    """
    return _model(
        [
            helper.make_node("Mul", ["x", "three"], ["x3"]),
            helper.make_node("Add", ["x3", "one"], ["y"]),
            helper.make_node("ReduceSum", ["k", "axis1"], ["k_sum"], keepdims=1),
            helper.make_node("Identity", ["tag"], ["tag_out"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["b", 2]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["b", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("k_sum", TensorProto.INT64, ["b", 1]),
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["b", 1]),
        ],
        [
            numpy_helper.from_array(np.array(3.0, np.float32), "three"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
        "row_wise",
    )


def _slow_model(layers: int, n: int = 512) -> bytes:
    # A chain of n x n MatMuls whose start depends on the input (so it cannot be
    # constant-folded) and whose result is added as an exact zero: y == x, and a
    # run costs about the same whatever the batch size.
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["s0"]),
        helper.make_node("Add", ["w", "s0"], ["m0"]),
    ]
    prev = "m0"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
        prev = f"m{i + 1}"
    nodes += [
        helper.make_node("ReduceMean", [prev], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "r0"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
        "slow",
    )


def run_once_ms(model: bytes, feeds: Mapping[str, np.ndarray[Any, Any]], repeats: int = 3) -> float:
    """Fastest wall time of one onnxruntime run (one thread), in milliseconds.

    The fastest is the one least disturbed by whatever else the machine runs, so
    a served run takes at least about this long, however loaded the machine is.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    session.run(None, dict(feeds))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, dict(feeds))
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


@dataclass(frozen=True)
class SlowModel:
    onnx_bytes: bytes
    run_ms: float  # fastest of a few runs in-process on one thread


def build_slow_model(target_ms: float = 150.0, max_layers: int = 2000) -> SlowModel:
    """``x`` FP32 [b, 4] -> ``y`` == x, taking about ``target_ms`` per run on this CPU."""
    feeds = {"x": np.ones((1, 4), np.float32)}
    probe_layers = 8
    per_layer = run_once_ms(_slow_model(probe_layers), feeds) / probe_layers
    layers = int(min(max_layers, max(1, target_ms / max(per_layer, 1e-3))))
    model = _slow_model(layers)
    return SlowModel(model, run_once_ms(model, feeds))


def run_direct(model: bytes, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    """Run ``model`` with onnxruntime in this process: the reference for served results."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def make_repository(root: Path, models: Mapping[str, tuple[bytes, str | None]]) -> Path:
    """``root/<name>/config.pbtxt`` (if given) and ``root/<name>/1/model.onnx``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (onnx_bytes, config_text) in models.items():
        version_dir = root / name / "1"
        version_dir.mkdir(parents=True)
        (version_dir / "model.onnx").write_bytes(onnx_bytes)
        if config_text is not None:
            (root / name / "config.pbtxt").write_text(config_text)
    return root


def serving_config(tmp: Path, repository: Path, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """An agent config for a test repository: free port, own state dir, unsigned models."""
    config: dict[str, dict[str, Any]] = {
        "server": {"address": "127.0.0.1:0"},
        "repository": {"path": str(repository)},
        "state": {"dir": str(tmp / "state")},
        # Until model signing is wired in, test repositories are unsigned.
        "signing": {"allow_unsigned_models": True},
        # No fixed Prometheus port: several agents run at once.
        "telemetry": {"prometheus_address": ""},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
