"""Models whose runs fail on some content, for the batch-isolation tests.

Pure test helpers (``onnx`` only, never ``agent.wire`` or tritonclient), shared
by tests/test_batch_isolation.py and tests/unit/test_batch_isolation_faults.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.serving_models import _model

TABLE_ROWS = 10
EMBED_TABLE = np.arange(TABLE_ROWS * 3, dtype=np.float32).reshape(TABLE_ROWS, 3)
SIZED_LIMIT = 4  # the sized model fails on any run of more samples than this


def embed_model() -> bytes:
    """``idx`` INT64 [b, 2] -> ``emb`` FP32 [b, 2, 3] = EMBED_TABLE[idx].

    An index outside -10..9 makes onnxruntime fail the run (Gather bounds).
    """
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["emb"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["b", 2])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", 2, 3])],
        [numpy_helper.from_array(EMBED_TABLE, "table")],
        "embed",
    )


def embed_expected(idx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(EMBED_TABLE[idx])


def sized_model() -> bytes:
    """``x`` INT64 [b, 1] -> ``y`` = x + 1, failing whenever a run has b > SIZED_LIMIT.

    Every request of up to SIZED_LIMIT samples succeeds on its own; only a batch
    larger than that fails: the model's limit, no client's fault.
    """
    zeros = np.zeros(SIZED_LIMIT + 1, np.int64)  # valid indices 0..SIZED_LIMIT
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
            helper.make_node("Gather", ["zeros", "b"], ["z"], axis=0),
            helper.make_node("Add", ["x", "z"], ["x0"]),
            helper.make_node("Add", ["x0", "one"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["b", 1])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", 1])],
        [
            numpy_helper.from_array(zeros, "zeros"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
        "sized",
    )


def free_2d_model() -> bytes:
    """No batching: ``x`` FP32 [n, m] (both dynamic) -> ``y`` = x + 1."""
    return _model(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
        "free2d",
    )


# Dynamic batching with a long delay and one instance: a burst of up to eight
# single-sample requests, sent together, runs as one batch.
BATCHED = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching {{
  max_queue_delay_microseconds: 200000
  preferred_batch_size: [ 8 ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

DIRECT = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

FREE_2D = """
name: "free2d"
platform: "onnxruntime_onnx"
max_batch_size: 0
"""


def isolation_models() -> dict[str, tuple[bytes, str | None]]:
    return {
        "embed": (embed_model(), BATCHED.format(name="embed")),
        "embed_direct": (embed_model(), DIRECT.format(name="embed_direct")),
        "sized": (sized_model(), BATCHED.format(name="sized")),
        "free2d": (free_2d_model(), FREE_2D),
    }
