"""Issue 17.1: ONNX external data must not escape the signature.

A signed model.onnx may keep its weights in other files (ONNX external data).
The agent resolves every reference itself against the verified files of the
version; a reference to anything else (another file on disk, ``..``, an
absolute path, a file the signature does not list, a range outside the file)
is refused with the agent's own reason, and what was serving keeps serving.
Run on the newest onnxruntime and, by tests/onnxruntime_floor.sh, on the
oldest the project allows (where onnxruntime itself would read the outside
file).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from agent.serving import onnx_external
from agent.serving.onnx_external import ExternalDataError
from agent.serving.onnx_runtime import OnnxSession, SessionOptions
from agent.signing import keys
from agent.signing.version_dir import sign_version
from tests.agent_process import REPO_ROOT, AgentProcess, write_toml

MODELS = REPO_ROOT / "models"
KEY = MODELS / "keys" / "demo-model-signing.key.pem"
W = np.arange(12, dtype=np.float32).reshape(3, 4)  # the signed weights
OUTSIDE = -W  # what an attacker's file holds
X = np.array([[1.0, 2.0, 3.0]], np.float32)


def _external(tensor: TensorProto, location: str, offset: int | None = 0,
              length: int | None = None) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def matmul_model(location: str, offset: int = 0, length: int | None = 48) -> bytes:
    """``y = x @ w``: x FP32 [b, 3], w [3, 4] stored externally at ``location``."""
    w = _external(numpy_helper.from_array(W, "w"), location, offset, length)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _version(root: Path, model: str, version: int, location: str, *, offset: int = 0,
             length: int | None = 48, weights: str | None = "weights.bin") -> Path:
    directory = root / model / str(version)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(matmul_model(location, offset, length))
    if weights is not None:
        (directory / weights).parent.mkdir(parents=True, exist_ok=True)
        (directory / weights).write_bytes(W.tobytes())
    sign_version(directory, keys.load_private_key(KEY))
    return directory


# --------------------------------------------------------------------------- in process


def test_session_uses_the_verified_buffer_not_the_named_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(OUTSIDE.tobytes())  # a file ORT could open
    model = matmul_model("weights.bin")
    verified = {"weights.bin": b"\0" * 16 + W.tobytes()}
    session = OnnxSession(
        matmul_model("weights.bin", offset=16), SessionOptions(), external_files=verified
    )
    (y,) = session.run(["y"], {"x": X})
    np.testing.assert_array_equal(y, X @ W)
    # Carried by the reader's ModelBytes, the same.
    session = OnnxSession(onnx_external.ModelBytes(model, {"weights.bin": W.tobytes()}),
                          SessionOptions())
    np.testing.assert_array_equal(session.run(["y"], {"x": X})[0], X @ W)
    session.close()


@pytest.mark.parametrize(
    ("location", "offset", "length", "reason"),
    [
        ("/etc/passwd", 0, 48, "absolute path"),
        ("../weights.bin", 0, 48, "climbs out with '..'"),
        ("a/../../weights.bin", 0, 48, "climbs out with '..'"),
        ("other.bin", 0, 48, "not a file covered by the version's signature"),
        ("*/_ORT_MEM_ADDR_/*", 0, 48, "memory address tag"),
        ("weights.bin", 8, 48, "lie outside the file"),
        ("weights.bin", 0, 44, "take 48"),
        ("weights.bin", 4, None, "take 48"),
    ],
)
def test_session_refuses_references_outside_the_verified_files(
    location: str, offset: int, length: int | None, reason: str
) -> None:
    with pytest.raises(ExternalDataError) as err:
        OnnxSession(matmul_model(location, offset, length), SessionOptions(),
                    external_files={"weights.bin": W.tobytes()})
    assert reason in str(err.value) and "tensor 'w'" in str(err.value)


def test_no_verified_files_means_external_data_is_refused() -> None:
    with pytest.raises(ExternalDataError, match="not a file covered"):
        OnnxSession(matmul_model("weights.bin"), SessionOptions())


def test_external_tensor_outside_the_main_initializers_is_refused() -> None:
    value = _external(numpy_helper.from_array(W, "c"), "weights.bin")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=value)], "const", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExternalDataError, match="only for the main graph's initializers"):
        onnx_external.external_tensors(model.SerializeToString())


def test_a_mapped_model_can_be_released_after_a_refusal() -> None:
    import mmap

    data = matmul_model("/etc/passwd")
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    with pytest.raises(ExternalDataError):
        OnnxSession(buffer, SessionOptions())
    buffer.close()  # no view of the scan left behind


# --------------------------------------------------------------------------- against onnx

_SAFE_NAME = st.text("abcdefghij_.-0123456789", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
_DTYPES = st.sampled_from([np.float32, np.int64, np.uint8, np.float16, np.bool_, np.float64])


@st.composite
def _models(draw: st.DrawFn) -> tuple[bytes, dict[str, tuple[str, int, int | None]]]:
    count = draw(st.integers(1, 5))
    names = draw(st.lists(st.text("wxyz", min_size=1, max_size=4), min_size=count,
                          max_size=count, unique=True))
    initializers = []
    expected: dict[str, tuple[str, int, int | None]] = {}
    for name in names:
        dims = draw(st.lists(st.integers(0, 3), max_size=3))
        array: np.ndarray = np.zeros(dims, draw(_DTYPES))
        tensor = numpy_helper.from_array(array, name)
        if draw(st.booleans()):
            location = "/".join(draw(st.lists(_SAFE_NAME, min_size=1, max_size=3)))
            offset = draw(st.integers(0, 10**12))
            length = draw(st.none() | st.integers(0, 10**12))
            _external(tensor, location, offset, length)
            expected[name] = (location, offset, length)
        initializers.append(tensor)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["in"], ["out"])], "g",
        [helper.make_tensor_value_info("in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_models())
def test_parse_agrees_with_onnx(case: tuple[bytes, dict[str, tuple[str, int, int | None]]]) -> None:
    data, expected = case
    reference = onnx.load_model_from_string(data)
    found = {t.name: t for t in onnx_external.external_tensors(data)}
    assert set(found) == set(expected)
    by_name = {t.name: t for t in reference.graph.initializer}
    for name, tensor in found.items():
        ref = by_name[name]
        assert (tensor.location, tensor.offset, tensor.length) == expected[name]
        assert tensor.dims == tuple(ref.dims) and tensor.data_type == ref.data_type
    # The rewrite changes only the external references, which no longer name a file.
    rewritten = onnx.load_model_from_string(onnx_external.without_external_files(data))
    for ref in reference.graph.initializer:
        if ref.name in expected:
            del ref.external_data[:]
            entry = ref.external_data.add()
            entry.key, entry.value = "location", onnx_external.STUB_LOCATION
    assert rewritten == reference
    again = onnx_external.external_tensors(onnx_external.without_external_files(data))
    assert {t.location for t in again} <= {onnx_external.STUB_LOCATION}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_models(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_corrupted_models_never_hide_an_external_tensor(
    case: tuple[bytes, dict[str, tuple[str, int, int | None]]], edits: list[tuple[int, int]]
) -> None:
    data = bytearray(case[0])
    for where, byte in edits:
        data[where % len(data)] = byte
    try:
        found = {t.name for t in onnx_external.external_tensors(bytes(data))}
    except ExternalDataError:
        return  # refused: nothing reaches onnxruntime
    try:
        reference = onnx.load_model_from_string(bytes(data))
    except Exception:
        return  # protobuf refuses it too
    seen = {
        t.name for t in reference.graph.initializer
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data)
    }
    assert seen == found


@pytest.mark.parametrize(
    ("location", "normal"),
    [("weights.bin", "weights.bin"), ("./w/./x.bin", "w/x.bin"), ("w//x.bin", "w/x.bin")],
)
def test_location_normalisation(location: str, normal: str) -> None:
    assert onnx_external.normalize_location("w", location) == normal


# --------------------------------------------------------------------------- through the agent


def _config(tmp_path: Path, repo: Path) -> Path:
    return write_toml(
        tmp_path / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "repository": {"path": str(repo)},
            "signing": {"trust_dir": str(MODELS / "keys" / "trusted")},
            "state": {"dir": str(tmp_path / "state")},
        },
    )


def _index(address: str) -> dict[str, tuple[str, str]]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        index = client.get_model_repository_index()
    return {f"{m.name}:{m.version}": (m.state, m.reason) for m in index.models}


def _infer(address: str, model: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        x = grpcclient.InferInput("x", [1, 3], "FP32")
        x.set_data_from_numpy(X)
        out = client.infer(model, [x]).as_numpy("y")
    assert isinstance(out, np.ndarray)
    return out


def test_start_up_serves_in_directory_weights_and_refuses_every_escape(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "tabular_classifier", repo / "tabular_classifier")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(OUTSIDE.tobytes())
    _version(repo, "good", 1, "weights.bin")
    _version(repo, "good_sub", 1, "./data/w.bin", weights="data/w.bin")
    _version(repo, "absolute", 1, str(outside))
    _version(repo, "dotdot", 1, "../../../outside.bin")  # from models/dotdot/1
    _version(repo, "ignored", 1, ".git/w.bin", weights=".git/w.bin")  # signer skips .git
    _version(repo, "range", 1, "weights.bin", offset=4)
    unsigned = _version(repo, "unsigned", 1, "extra.bin")
    (unsigned / "extra.bin").write_bytes(OUTSIDE.tobytes())  # after signing
    reasons = {
        "absolute": "is an absolute path outside the version; refused",
        "dotdot": "climbs out with '..'; refused",
        "ignored": "is not a file covered by the version's signature; refused",
        "range": "lie outside the file",
        "unsigned": "extra.bin",
    }
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        index = _index(agent.address)
        assert index["good:1"] == ("READY", "")
        np.testing.assert_array_equal(_infer(agent.address, "good"), X @ W)
        np.testing.assert_array_equal(_infer(agent.address, "good_sub"), X @ W)
        for model, reason in reasons.items():
            state, why = index[f"{model}:1"]
            assert state == "UNAVAILABLE", f"{model} served: {why}"
            assert reason in why, f"{model}: {why}"
            if model != "unsigned":  # the directory check refuses that one first
                assert "tensor 'w'" in why
        assert index["tabular_classifier:2"] == ("READY", "")


@pytest.mark.parametrize("policy", ["latest", "all"])
def test_reload_refuses_an_escaping_version_and_the_old_one_keeps_serving(
    tmp_path: Path, policy: str
) -> None:
    repo = tmp_path / "models"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(OUTSIDE.tobytes())
    _version(repo, "good", 1, "weights.bin")
    # With the default policy (the latest only) the refused version 2 is the policy's
    # choice: version 1 must keep serving all the same.
    if policy == "all":
        (repo / "good" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        np.testing.assert_array_equal(_infer(agent.address, "good"), X @ W)
        _version(repo, "good", 2, str(outside))
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        state, reason = "", ""
        while time.monotonic() < deadline:
            state, reason = _index(agent.address).get("good:2", ("", ""))
            if state == "UNAVAILABLE":
                break
            time.sleep(0.1)
        assert state == "UNAVAILABLE" and "absolute path outside the version" in reason
        assert _index(agent.address)["good:1"] == ("READY", "")
        np.testing.assert_array_equal(_infer(agent.address, "good"), X @ W)


# --------------------------------------------------------------------------- fleet updates


def test_the_fleet_validator_loads_in_version_external_data_with_the_model(
    tmp_path: Path,
) -> None:
    """The update path: the staged model names its weights file, the updater loads it in
    the same verified pass, and the validated session computes with those bytes.

    In a child process: the validator imports the agent's protobuf modules, which
    cannot share a process with tritonclient (tests/unit/conftest.py)."""
    directory = _version(tmp_path, "ext", 1, "weights.bin")
    code = f"""
import asyncio, sys
from pathlib import Path
import numpy as np
from agent.adapters.fleet import OnnxVersionValidator
from agent.errors import AgentError
from agent.serving.onnx_runtime import SessionOptions
d = Path({str(directory)!r})
v = OnnxVersionValidator(SessionOptions(), lambda session: None)
named = v.referenced_files(d / "model.onnx")
assert named == ("weights.bin",), named
model = (d / "model.onnx").read_bytes()
weights = {{"weights.bin": (d / "weights.bin").read_bytes()}}
result = asyncio.run(v.validate("ext", None, model, weights))
x = np.arange(6, dtype=np.float32).reshape(2, 3)
w = np.arange(12, dtype=np.float32).reshape(3, 4)
np.testing.assert_allclose(result.prepared.run(["y"], {{"x": x}})[0], x @ w)
try:
    asyncio.run(v.validate("ext", None, model, {{}}))
except AgentError as exc:
    assert "weights.bin" in str(exc), exc
    print("refused:", exc)
else:
    sys.exit("validated without its weights")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused:" in done.stdout
