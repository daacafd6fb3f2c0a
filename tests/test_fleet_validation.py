"""The validation gate: vectors with tolerances, the smoke test, malformed vector files."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.serving.onnx_runtime import SessionOptions
from agent.serving.validation import ValidationFailedError, validate_model
from tests.fleet_harness import scale_model

OPTIONS = SessionOptions()


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def spec(**fields: Any) -> bytes:
    return json.dumps({"schema": "edge.validation", "version": 1, **fields}).encode()


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def test_vectors_that_match_pass() -> None:
    result = validate_model(scale_model(3.0), {"validation.npz": npz(in__x=X, out__y=3 * X)},
                            OPTIONS)
    assert result.mode == "vectors"
    assert result.outputs_checked == ("y",)
    assert result.max_abs_error == 0.0
    assert [t.name for t in result.inputs] == ["x"]


def test_a_wrong_answer_fails_naming_the_output_and_element() -> None:
    expected = 3 * X
    expected[1, 2] += 1
    with pytest.raises(ValidationFailedError, match=r"output y: element 6 is 18.0, expected 19.0"):
        validate_model(scale_model(3.0), {"validation.npz": npz(in__x=X, out__y=expected)},
                       OPTIONS)


def test_tolerances_are_honoured_globally_and_per_output() -> None:
    near = 3 * X + 1e-3
    files = {"validation.npz": npz(in__x=X, out__y=near)}
    with pytest.raises(ValidationFailedError, match="rtol"):
        validate_model(scale_model(3.0), files, OPTIONS)  # default 1e-5 / 1e-6
    loose = validate_model(scale_model(3.0), {**files, "validation.json": spec(atol=1e-2)},
                           OPTIONS)
    assert 0 < loose.max_abs_error <= 1.01e-3
    per_output = spec(atol=0.0, rtol=0.0, outputs={"y": {"atol": 1e-2}})
    validate_model(scale_model(3.0), {**files, "validation.json": per_output}, OPTIONS)


def test_without_vectors_a_smoke_inference_runs() -> None:
    result = validate_model(scale_model(2.0), {}, OPTIONS)
    assert result.mode == "smoke"


def test_a_model_that_cannot_run_on_zeros_fails_the_smoke_test() -> None:
    # Gather with index 5 into a dimension of 1: fails at run time, not at load.
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "idx"], ["y"], axis=0)],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[helper.make_tensor("idx", TensorProto.INT64, [], [5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ValidationFailedError, match="smoke inference on zeros failed"):
        validate_model(model.SerializeToString(), {}, OPTIONS)


def test_string_outputs_compare_exactly() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["b"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["b"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    words = np.array(["red", "grün"])
    data = model.SerializeToString()
    assert validate_model(data, {"validation.npz": npz(in__s=words, out__t=words)},
                          OPTIONS).mode == "vectors"
    with pytest.raises(ValidationFailedError, match="element 1"):
        validate_model(data, {"validation.npz": npz(in__s=words, out__t=np.array(["red", "x"]))},
                       OPTIONS)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"validation.npz": b"not a zip"}, "not a readable .npz"),
        ({"validation.npz": npz(out__y=X)}, "has inputs"),
        ({"validation.npz": npz(in__x=X)}, "no out__"),
        ({"validation.npz": npz(in__x=X, out__z=X)}, "unknown outputs"),
        ({"validation.npz": npz(in__x=X, out__y=X, extra=X)}, "neither"),
        ({"validation.npz": npz(in__x=X, out__y=3 * X[:1])}, "shape"),
        ({"validation.json": spec()}, "without validation.npz"),
        ({"validation.npz": npz(in__x=X, out__y=3 * X), "validation.json": b"[1]"}, "object"),
        ({"validation.npz": npz(in__x=X, out__y=3 * X),
          "validation.json": spec(rtol=-1)}, "non-negative"),
        ({"validation.npz": npz(in__x=X, out__y=3 * X),
          "validation.json": spec(bogus=1)}, "unknown field"),
        ({"validation.npz": npz(in__x=X, out__y=3 * X),
          "validation.json": json.dumps({"schema": "x", "version": 1}).encode()}, "schema"),
        ({"validation.npz": npz(in__x=np.array([object()], dtype=object), out__y=X)},
         "not a readable .npz"),  # pickled objects are refused
    ],
)
def test_malformed_vectors_fail_validation(files: dict[str, bytes], match: str) -> None:
    with pytest.raises(ValidationFailedError, match=match):
        validate_model(scale_model(3.0), files, OPTIONS)


def test_bytes_that_are_not_a_model_fail() -> None:
    with pytest.raises(ValidationFailedError, match="does not load"):
        validate_model(b"\x08\x01garbage", {}, OPTIONS)
