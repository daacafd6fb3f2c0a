"""The validation gate: run a staged version in a fresh onnxruntime session.

A version directory may ship validation vectors, covered by its model.sig like
every other file:

``validation.npz`` (NumPy ``savez`` format, loaded without pickle)
    ``in__<input name>``: one array per graph input (the whole feed, batch
    dimension included); ``out__<output name>``: the expected value of some or
    all graph outputs. Strings are NumPy ``U``/``S`` arrays.

``validation.json`` (optional)
    ``{"schema": "edge.validation", "version": 1, "rtol": 1e-5, "atol": 1e-6,
    "outputs": {"<output name>": {"rtol": ..., "atol": ...}}}``; numeric
    outputs must satisfy ``|actual - expected| <= atol + rtol * |expected|``
    element-wise (NaN equals NaN); bool and string outputs must be equal.

Without vectors the version gets a smoke inference on zero-filled inputs
(every dynamic dimension 1): it must run and produce every output.

The bytes validated are the bytes that verified (``verify_version(load=...)``),
in a session of their own: the serving sessions are never touched.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from agent.common.buffers import FileBytes, as_bytes
from agent.errors import AgentError
from agent.serving.onnx_runtime import GraphTensor, OnnxSession, SessionOptions, zero_inputs

VECTORS_FILE: Final = "validation.npz"
SPEC_FILE: Final = "validation.json"
SPEC_SCHEMA: Final = "edge.validation"
DEFAULT_RTOL: Final = 1e-5
DEFAULT_ATOL: Final = 1e-6
MAX_SPEC_BYTES: Final = 64 * 1024


class ValidationFailedError(AgentError):
    """The staged version did not load, did not run, or gave wrong answers."""

    code = "validation_failed"


@dataclass(frozen=True, slots=True)
class ValidationResult:
    mode: str  # "vectors" or "smoke"
    outputs_checked: tuple[str, ...]
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    max_abs_error: float = 0.0
    # The session that passed: with shared thread pools it can go on to serve
    # (ModelManager.activate's ``prepared``) instead of the model loading twice.
    session: OnnxSession | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Tolerance:
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


def _parse_spec(data: FileBytes | None) -> tuple[Tolerance, dict[str, Tolerance]]:
    if data is None:
        return Tolerance(), {}
    if len(data) > MAX_SPEC_BYTES:
        raise ValidationFailedError(f"{SPEC_FILE} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        doc = json.loads(as_bytes(data))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("schema") != SPEC_SCHEMA or doc.get("version") != 1:
            raise ValueError(f"expected schema {SPEC_SCHEMA!r} version 1")
        unknown = set(doc) - {"schema", "version", "rtol", "atol", "outputs"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
        default = _tolerance(doc, Tolerance())
        outputs = {
            str(name): _tolerance(value, default)
            for name, value in dict(doc.get("outputs", {})).items()
        }
    except (ValueError, TypeError) as exc:
        raise ValidationFailedError(f"{SPEC_FILE}: {exc}") from None
    return default, outputs


def _tolerance(obj: Any, default: Tolerance) -> Tolerance:
    if not isinstance(obj, dict):
        raise ValueError("a tolerance must be an object")
    values = {}
    for key in ("rtol", "atol"):
        value = obj.get(key, getattr(default, key))
        if type(value) not in (int, float) or not 0 <= value < float("inf"):
            raise ValueError(f"{key} {value!r} is not a non-negative number")
        values[key] = float(value)
    return Tolerance(**values)


def _load_vectors(data: FileBytes) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValidationFailedError(f"{VECTORS_FILE} is not a readable .npz: {exc}") from None
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    expected: dict[str, Any] = {}
    for key, array in arrays.items():
        if key.startswith("in__") and len(key) > 4:
            inputs[key[4:]] = array
        elif key.startswith("out__") and len(key) > 5:
            expected[key[5:]] = array
        else:
            raise ValidationFailedError(
                f"{VECTORS_FILE}: array {key!r} is neither in__<input> nor out__<output>"
            )
    return inputs, expected


def _feed(tensor: GraphTensor, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if tensor.datatype == "BYTES":
        # onnxruntime takes str elements for string tensors (bytes would be str()-ed).
        if array.dtype.kind == "U":
            return array.astype(object)
        if array.dtype.kind == "S":
            decoded = np.empty(array.shape, dtype=object)
            decoded.reshape(-1)[:] = [b.decode("utf-8") for b in array.reshape(-1)]
            return decoded
        raise ValidationFailedError(f"input {tensor.name}: expected strings, got {array.dtype}")
    return array


def _compare(
    name: str, actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any], tol: Tolerance
) -> float:
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValidationFailedError(
            f"output {name}: shape {list(actual.shape)}, expected {list(expected.shape)}"
        )
    if actual.dtype == object or expected.dtype.kind in "US":
        def as_bytes(v: Any) -> bytes:
            return v.encode("utf-8") if isinstance(v, str) else bytes(v)

        left = [as_bytes(v) for v in actual.reshape(-1)]
        right = [as_bytes(v) for v in expected.reshape(-1)]
        if left != right:
            first = next(i for i, (a, b) in enumerate(zip(left, right, strict=True)) if a != b)
            raise ValidationFailedError(
                f"output {name}: element {first} is {left[first]!r}, expected {right[first]!r}"
            )
        return 0.0
    if actual.dtype.kind == "b" or expected.dtype.kind == "b":
        if not np.array_equal(actual, expected):
            raise ValidationFailedError(f"output {name}: boolean values differ")
        return 0.0
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    close = np.isclose(a, e, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
    if not bool(np.all(close)):
        index = int(np.argmin(close.reshape(-1)))
        raise ValidationFailedError(
            f"output {name}: element {index} is {float(a.reshape(-1)[index])!r}, expected "
            f"{float(e.reshape(-1)[index])!r} (rtol {tol.rtol}, atol {tol.atol})"
        )
    finite = np.isfinite(a) & np.isfinite(e)
    return float(np.max(np.abs(a - e)[finite], initial=0.0))


def validate_model(
    model_bytes: FileBytes,
    files: Mapping[str, FileBytes],
    options: SessionOptions,
) -> ValidationResult:
    """Blocking. ``files``: the verified validation and external data files present."""
    weights = {name: data for name, data in files.items() if name not in (VECTORS_FILE, SPEC_FILE)}
    try:
        session = OnnxSession(model_bytes, options, external_files=weights)
    except AgentError as exc:
        raise ValidationFailedError(f"the model does not load: {exc}") from None
    output_names = [t.name for t in session.outputs]
    vectors = files.get(VECTORS_FILE)
    if vectors is None:
        if SPEC_FILE in files:
            raise ValidationFailedError(f"{SPEC_FILE} without {VECTORS_FILE}")
        try:
            results = session.run(output_names, zero_inputs(session.inputs))
        except Exception as exc:
            raise ValidationFailedError(f"smoke inference on zeros failed: {exc}") from None
        if len(results) != len(output_names):
            raise ValidationFailedError("smoke inference did not produce every output")
        return ValidationResult(
            "smoke", tuple(output_names), session.inputs, session.outputs, session=session
        )

    default, per_output = _parse_spec(files.get(SPEC_FILE))
    inputs, expected = _load_vectors(vectors)
    graph_inputs = {t.name: t for t in session.inputs}
    if set(inputs) != set(graph_inputs):
        raise ValidationFailedError(
            f"{VECTORS_FILE} has inputs {sorted(inputs)}, the model takes {sorted(graph_inputs)}"
        )
    unknown = sorted(set(expected) - set(output_names)) + sorted(set(per_output) - set(expected))
    if unknown:
        raise ValidationFailedError(f"expected values for unknown outputs: {unknown}")
    if not expected:
        raise ValidationFailedError(f"{VECTORS_FILE} has no out__<output> arrays")
    feeds = {name: _feed(graph_inputs[name], array) for name, array in inputs.items()}
    names = sorted(expected)
    try:
        results = session.run(names, feeds)
    except Exception as exc:
        raise ValidationFailedError(f"inference on the validation vectors failed: {exc}") from None
    worst = 0.0
    for name, actual in zip(names, results, strict=True):
        worst = max(
            worst, _compare(name, np.asarray(actual), expected[name], per_output.get(name, default))
        )
    return ValidationResult(
        "vectors", tuple(names), session.inputs, session.outputs, worst, session=session
    )
