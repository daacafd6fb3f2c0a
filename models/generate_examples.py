"""Generate the example Triton-layout ONNX model repository used by tests and demos.

Usage: ``.venv/bin/python models/generate_examples.py [REPOSITORY_DIR]``
(default: the directory holding this script).

Output is deterministic: fixed seeds, fixed opsets and no timestamps or library versions in
the files, so re-running produces byte-identical ``model.onnx`` and ``config.pbtxt`` files.
Only those two file names are ever written; anything else in the repository (for example
``model.sig`` signatures written by the signing tool) is left alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ir_version 8 / opset 17 load on onnxruntime >= 1.13, older than the project's minimum.
IR_VERSION = 8
ONNX_OPSET = 17
ML_OPSET = 3  # ai.onnx.ml 3 still has LabelEncoder-2 with keys_strings/values_int64s
PRODUCER = "edge-agent models/generate_examples.py"

Dim = int | str | None  # fixed size, symbolic name, or anonymous dynamic dimension
BATCH = "batch"

# (ONNX element type, Triton config type) per tensor suffix of the all_dtypes model.
ALL_DTYPES: dict[str, tuple[int, str]] = {
    "bool": (TensorProto.BOOL, "TYPE_BOOL"),
    "int8": (TensorProto.INT8, "TYPE_INT8"),
    "int16": (TensorProto.INT16, "TYPE_INT16"),
    "int32": (TensorProto.INT32, "TYPE_INT32"),
    "int64": (TensorProto.INT64, "TYPE_INT64"),
    "uint8": (TensorProto.UINT8, "TYPE_UINT8"),
    "uint16": (TensorProto.UINT16, "TYPE_UINT16"),
    "uint32": (TensorProto.UINT32, "TYPE_UINT32"),
    "uint64": (TensorProto.UINT64, "TYPE_UINT64"),
    "fp16": (TensorProto.FLOAT16, "TYPE_FP16"),
    "fp32": (TensorProto.FLOAT, "TYPE_FP32"),
    "fp64": (TensorProto.DOUBLE, "TYPE_FP64"),
    "string": (TensorProto.STRING, "TYPE_STRING"),
}

TEXT_CATEGORIES = ("red", "green", "blue")


def _value_info(name: str, elem_type: int, shape: Sequence[Dim]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _finish(graph: onnx.GraphProto, *, ml: bool = False) -> onnx.ModelProto:
    """Wrap ``graph`` with pinned opsets/IR version and check it."""
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
        model_version=1,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# --- tabular_classifier -------------------------------------------------------------------

TABULAR_FEATURES = 8
TABULAR_HIDDEN = 16
TABULAR_CLASSES = 3


def tabular_classifier(seed: int) -> onnx.ModelProto:
    """features[B,8] -> Relu MLP -> probabilities[B,3] (softmax) and label[B,1] (argmax)."""
    rng = np.random.RandomState(seed)
    # Scaled so logits stay O(1): softmax outputs then differ visibly between versions.
    w1 = (rng.standard_normal((TABULAR_FEATURES, TABULAR_HIDDEN)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(TABULAR_HIDDEN) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((TABULAR_HIDDEN, TABULAR_CLASSES)) * 0.5).astype(np.float32)
    b2 = (rng.standard_normal(TABULAR_CLASSES) * 0.1).astype(np.float32)
    initializers = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h_mm"], name="dense1_matmul"),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"], name="dense1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="dense1_relu"),
        helper.make_node("MatMul", ["h", "w2"], ["logits_mm"], name="dense2_matmul"),
        helper.make_node("Add", ["logits_mm", "b2"], ["logits"], name="dense2_bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
        # Argmax of the logits equals argmax of the softmax and avoids a dependency on it.
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tabular_classifier",
        inputs=[_value_info("features", TensorProto.FLOAT, [BATCH, TABULAR_FEATURES])],
        outputs=[
            _value_info("probabilities", TensorProto.FLOAT, [BATCH, TABULAR_CLASSES]),
            _value_info("label", TensorProto.INT64, [BATCH, 1]),
        ],
        initializer=initializers,
    )
    return _finish(graph)


TABULAR_CONFIG = """\
name: "tabular_classifier"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { latest: { num_versions: 1 } }
input [
  {
    name: "features"
    data_type: TYPE_FP32
    dims: [ 8 ]
  }
]
output [
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 3 ]
  },
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 200
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""


# --- text_features ------------------------------------------------------------------------


def text_features() -> onnx.ModelProto:
    """Mixed-dtype model: INT64 tokens, string category, FP64 weight in; four outputs."""
    initializers = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sum_axes"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node(
            "ReduceSum", ["tokens", "sum_axes"], ["token_sum"], name="token_sum", keepdims=1
        ),
        helper.make_node(
            "LabelEncoder",
            ["category"],
            ["category_id"],
            name="category_id",
            domain="ai.onnx.ml",
            keys_strings=list(TEXT_CATEGORIES),
            values_int64s=list(range(len(TEXT_CATEGORIES))),
            default_int64=-1,
        ),
        helper.make_node(
            "Cast", ["token_sum"], ["token_sum_f64"], name="token_sum_f64", to=TensorProto.DOUBLE
        ),
        helper.make_node("Mul", ["weight", "token_sum_f64"], ["weighted"], name="weighted"),
        # StringNormalizer only accepts [C] or [1, C]: flatten [B, 1] to [B], then restore.
        helper.make_node("Shape", ["category"], ["category_shape"], name="category_shape"),
        helper.make_node(
            "Reshape", ["category", "flat_shape"], ["category_flat"], name="category_flat"
        ),
        helper.make_node(
            "StringNormalizer",
            ["category_flat"],
            ["category_upper_flat"],
            name="category_upper_flat",
            case_change_action="UPPER",
            # The default en_US.UTF-8 is missing on minimal images and makes session
            # creation fail; "C" always exists and upper-cases ASCII, which is all we need.
            locale="C",
        ),
        helper.make_node(
            "Reshape",
            ["category_upper_flat", "category_shape"],
            ["category_upper"],
            name="category_upper",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "text_features",
        inputs=[
            _value_info("tokens", TensorProto.INT64, [BATCH, 4]),
            _value_info("category", TensorProto.STRING, [BATCH, 1]),
            _value_info("weight", TensorProto.DOUBLE, [BATCH, 1]),
        ],
        outputs=[
            _value_info("token_sum", TensorProto.INT64, [BATCH, 1]),
            _value_info("category_id", TensorProto.INT64, [BATCH, 1]),
            _value_info("weighted", TensorProto.DOUBLE, [BATCH, 1]),
            _value_info("category_upper", TensorProto.STRING, [BATCH, 1]),
        ],
        initializer=initializers,
    )
    return _finish(graph, ml=True)


TEXT_CONFIG = """\
name: "text_features"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [
  {
    name: "tokens"
    data_type: TYPE_INT64
    dims: [ 4 ]
  },
  {
    name: "category"
    data_type: TYPE_STRING
    dims: [ 1 ]
  },
  {
    name: "weight"
    data_type: TYPE_FP64
    dims: [ 1 ]
  }
]
output [
  {
    name: "token_sum"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "category_id"
    data_type: TYPE_INT64
    dims: [ 1 ]
  },
  {
    name: "weighted"
    data_type: TYPE_FP64
    dims: [ 1 ]
  },
  {
    name: "category_upper"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }
]
"""


# --- all_dtypes ---------------------------------------------------------------------------


def all_dtypes() -> onnx.ModelProto:
    """One Identity per datatype: out_<t> = in_<t>, every tensor shape [-1, -1]."""
    # Anonymous dims (no dim_param) so no two inputs are implied to share a size.
    shape: list[Dim] = [None, None]
    nodes = [
        helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"], name=f"identity_{t}")
        for t in ALL_DTYPES
    ]
    graph = helper.make_graph(
        nodes,
        "all_dtypes",
        inputs=[_value_info(f"in_{t}", et, shape) for t, (et, _) in ALL_DTYPES.items()],
        outputs=[_value_info(f"out_{t}", et, shape) for t, (et, _) in ALL_DTYPES.items()],
    )
    return _finish(graph)


def _tensor_entries(prefix: str) -> str:
    entries = [
        f'  {{\n    name: "{prefix}_{t}"\n    data_type: {cfg}\n    dims: [ -1, -1 ]\n  }}'
        for t, (_, cfg) in ALL_DTYPES.items()
    ]
    return ",\n".join(entries)


ALL_DTYPES_CONFIG = f"""\
name: "all_dtypes"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
{_tensor_entries("in")}
]
output [
{_tensor_entries("out")}
]
"""


# --- writing ------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` with ``data`` unless it already holds exactly that.

    Skipping identical content keeps mtimes stable for watchers; the temp-file + rename
    means a concurrently polling agent never reads a half-written model.
    """
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; match ordinary checked-in files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def generate(repository: Path) -> list[Path]:
    """Write every example model into ``repository``; return the paths that changed."""
    files: dict[Path, bytes] = {
        Path("tabular_classifier/1/model.onnx"): tabular_classifier(7).SerializeToString(),
        Path("tabular_classifier/2/model.onnx"): tabular_classifier(8).SerializeToString(),
        Path("tabular_classifier/config.pbtxt"): TABULAR_CONFIG.encode(),
        Path("text_features/1/model.onnx"): text_features().SerializeToString(),
        Path("text_features/config.pbtxt"): TEXT_CONFIG.encode(),
        Path("all_dtypes/1/model.onnx"): all_dtypes().SerializeToString(),
        Path("all_dtypes/config.pbtxt"): ALL_DTYPES_CONFIG.encode(),
    }
    return [repository / rel for rel, data in files.items() if _write(repository / rel, data)]


def main(argv: Sequence[str]) -> int:
    repository = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    changed = generate(repository)
    for path in changed:
        print(f"wrote {path}")
    print(f"{len(changed)} file(s) changed under {repository}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
