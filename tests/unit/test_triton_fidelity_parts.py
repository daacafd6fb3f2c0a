"""The pure parts behind Triton fidelity: reshape checks, field refusal, warm-up
samples, classification strings, and the shared memory registry's checks (on a
directory standing in for /dev/shm, with real files and real mappings)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from agent.errors import InvalidInputError, ModelConfigError, NotPermittedError
from agent.serving.classification import classify, read_labels
from agent.serving.inference import InferenceRequest, InputTensor, OutputTensor, decode_request
from agent.serving.model_config import (
    complete_config,
    model_spec,
    parse_config_pbtxt,
    warmup_samples,
)
from agent.serving.onnx_runtime import GraphTensor
from agent.serving.shared_memory import SharedMemoryRegistry
from agent.wire import model_config_pb2 as mc

GRID_IN = [GraphTensor("x", "FP32", (-1, 2, 2))]
GRID_OUT = [GraphTensor("y", "FP32", (-1, 2, 2))]


def _complete(text: str, inputs: list[GraphTensor] = GRID_IN,
              outputs: list[GraphTensor] = GRID_OUT) -> mc.ModelConfig:
    return complete_config(parse_config_pbtxt(text, "config.pbtxt"), "m", inputs, outputs, 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('max_batch_size: 2\ninput [ { name: "x" dims: [ 4 ] reshape: { shape: [ 3, 2 ] } } ]',
         "reshape [3, 2]"),
        ('max_batch_size: 2\ninput [ { name: "x" dims: [ 5 ] reshape: { shape: [ 2, 2 ] } } ]',
         "different element counts"),
        ('max_batch_size: 2\ninput [ { name: "x" dims: [ -1 ] reshape: { shape: [ 2, 2 ] } } ]',
         "both be fixed"),
    ],
)
def test_reshape_is_checked_against_the_graph(text: str, fragment: str) -> None:
    with pytest.raises(ModelConfigError, match="input 'x'") as info:
        _complete(text)
    assert fragment in str(info.value)


def test_reshape_feeds_the_model_shape() -> None:
    config = _complete('max_batch_size: 2\ninput [ { name: "x" dims: [ 4 ] '
                       "reshape: { shape: [ 2, 2 ] } } ]")
    spec = model_spec(config, "1", 8)
    raw = np.arange(8, dtype=np.float32).tobytes()
    decoded = decode_request(spec, InferenceRequest("m", "", "", [
        InputTensor("x", "FP32", (2, 4), raw)]))
    assert decoded.feeds["x"].shape == (2, 2, 2)


def test_rank0_tensor_is_completed_as_one_element_reshaped() -> None:
    config = _complete("", [GraphTensor("sr", "INT64", ())], [GraphTensor("y", "FP32", (-1,))])
    sr = config.input[0]
    assert list(sr.dims) == [1] and sr.HasField("reshape") and list(sr.reshape.shape) == []
    spec = model_spec(config, "1", 8)
    for shape in ((1,), ()):
        raw = np.array([16000], np.int64).tobytes()
        decoded = decode_request(spec, InferenceRequest("m", "", "", [
            InputTensor("sr", "INT64", shape, raw)]))
        assert decoded.feeds["sr"].shape == ()


def test_warmup_samples_and_their_errors() -> None:
    text = ('max_batch_size: 4\nmodel_warmup [ { name: "w" batch_size: 3 count: 2 '
            'inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 2, 2 ] random_data: true } '
            "} } ]")
    config = _complete(text)
    [(name, count, feeds)] = warmup_samples(model_spec(config, "1", 8), config)
    assert (name, count, feeds["x"].shape, feeds["x"].dtype) == ("w", 2, (3, 2, 2), np.float32)
    bad = _complete(text.replace("batch_size: 3", "batch_size: 9"))
    with pytest.raises(ModelConfigError, match="above max_batch_size"):
        warmup_samples(model_spec(bad, "1", 8), bad)


def test_classification_strings() -> None:
    out = OutputTensor("c", "INT32", (2, 3), np.array([[5, 9, 1], [0, -1, 2]], np.int32).tobytes())
    spec = model_spec(_complete(""), "1", 8).outputs[0]
    got = classify(out, spec, 2, 2, batching=True)
    assert got.shape == (2, 2) and got.datatype == "BYTES"
    assert got.raw == b"".join(
        len(s).to_bytes(4, "little") + s for s in [b"9:1", b"5:0", b"2:2", b"0:0"]
    )
    with pytest.raises(InvalidInputError, match="numeric"):
        classify(OutputTensor("c", "BYTES", (1,), b""), spec, 1, 1, batching=False)


def test_label_filename_must_be_a_file_beside_config(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    config = _complete('output [ { name: "y" label_filename: "labels.txt" } ]')
    assert read_labels(tmp_path, config) == {"y": ("a", "b")}
    for name in ("../labels.txt", "/etc/passwd", "missing.txt"):
        bad = _complete(f'output [ {{ name: "y" label_filename: "{name}" }} ]')
        with pytest.raises(ModelConfigError, match="label_filename"):
            read_labels(tmp_path, bad)


def test_shared_memory_registry_checks_and_releases(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    (root / "region").write_bytes(bytes(range(64)))
    off = SharedMemoryRegistry(enabled=False, root=root)
    with pytest.raises(NotPermittedError):
        off.register("r", "/region", 0, 64)
    reg = SharedMemoryRegistry(enabled=True, root=root)
    for key in ("/../region", "a/b", "..", "", "/" + "x" * 300, "r\u00e9gion"):
        with pytest.raises(InvalidInputError, match="shm_open name"):
            reg.register("r", key, 0, 16)
    os.symlink(root / "region", root / "link")
    with pytest.raises(InvalidInputError, match="cannot open"):
        reg.register("r", "/link", 0, 16)
    os.mkfifo(root / "fifo")
    with pytest.raises(InvalidInputError, match="not a shared memory object"):
        reg.register("r", "/fifo", 0, 16)
    with pytest.raises(InvalidInputError, match="beyond the end"):
        reg.register("r", "/region", 60, 8)
    (root / "other").write_bytes(bytes(64))
    os.link(root / "other", root / "hardlink")
    with pytest.raises(InvalidInputError, match="2 links"):
        reg.register("r", "/hardlink", 0, 16)
    reg.register("r", "/region", 16, 32)
    assert bytes(reg.read("input 'x'", "r", 4, 4)) == bytes([20, 21, 22, 23])
    with pytest.raises(InvalidInputError, match="outside region 'r'"):
        reg.read("input 'x'", "r", 30, 4)
    reg.write("output 'y'", "r", 0, 4, b"\xff\xff")
    assert (root / "region").read_bytes()[16:19] == b"\xff\xff\x12"
    with pytest.raises(InvalidInputError, match="byte_size is 1"):
        reg.write("output 'y'", "r", 0, 1, b"ab")
    held = reg.read("input 'x'", "r", 0, 4)  # a request in flight keeps its view
    reg.unregister("")
    assert reg.status() == [] and bytes(held) == b"\xff\xff\x12\x13"
    reg.close()
