"""agent.common.buffers: large verified files are read into anonymous memory that can be let go
without holding the GIL, and every consumer (hashing, signature check, onnxruntime via
the sealed memfd, validation) takes it like bytes."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from agent.common.buffers import MAPPED_FROM_BYTES, as_bytes, read_whole, release
from agent.serving.onnx_runtime import OnnxSession, SessionOptions
from agent.serving.validation import validate_model
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version
from tests.fleet_device import make_signed_version, make_signing_keys
from tests.fleet_harness import scale_model


def _read(path: Path) -> bytes | mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_whole(fd)
    finally:
        os.close(fd)


def test_small_files_are_bytes_and_large_ones_are_mapped_with_the_same_content(
    tmp_path: Path,
) -> None:
    small, large = os.urandom(1000), os.urandom(MAPPED_FROM_BYTES + 12_345)
    (tmp_path / "small").write_bytes(small)
    (tmp_path / "large").write_bytes(large)
    got_small, got_large = _read(tmp_path / "small"), _read(tmp_path / "large")
    assert isinstance(got_small, bytes) and got_small == small
    assert isinstance(got_large, mmap.mmap) and got_large[:] == large
    assert hashlib.sha256(got_large).hexdigest() == hashlib.sha256(large).hexdigest()
    assert as_bytes(got_large) == large
    release(got_large)
    with pytest.raises(ValueError):
        got_large[0]  # released: the memory is gone, not silently reused
    release(got_small)  # bytes: nothing to do
    assert got_small == small


def test_a_large_signed_model_is_verified_loaded_and_validated_from_mapped_memory(
    tmp_path: Path,
) -> None:
    signing = make_signing_keys(tmp_path / "keys")
    model = scale_model(3.0, padding=MAPPED_FROM_BYTES + 4096)
    version = make_signed_version(tmp_path / "repo", "big", 1, {"model.onnx": model}, signing)
    verified = verify_version(
        version, TrustStore.from_directory(signing.trust_dir), load=("model.onnx",)
    )
    data = verified.contents["model.onnx"]
    assert isinstance(data, mmap.mmap) and data[:] == model
    result = validate_model(data, {}, SessionOptions(intra_op_threads=1, inter_op_threads=1))
    assert result.mode == "smoke" and result.session is not None
    release(data)  # the session keeps its own copy
    session: OnnxSession = result.session
    out = session.run(["y"], {"x": np.ones((2, 4), np.float32)})
    assert out[0].tolist() == [[3.0] * 4] * 2
    session.close()
