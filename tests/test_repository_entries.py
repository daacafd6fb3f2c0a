"""Odd repository entries are per-entry errors, never a failed start.

A real agent process on a repository holding a good model beside dangling and
looping symlinks, a version named with a non-ASCII digit, a file where a model
directory belongs and a version directory without its model file. The agent
must come up, serve the good model to tritonclient and report every bad entry
(RepositoryIndex: UNAVAILABLE with a reason), at start, on SIGHUP and on
RepositoryModelLoad.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess, write_toml
from tests.serving_models import make_repository, scale_and_echo_model, serving_config

TIMEOUT_S = 20.0


def _odd_repository(root: Path) -> Path:
    model = scale_and_echo_model()
    make_repository(root, {"good": (model, None), "empty_version": (model, None)})
    (root / "README.md").write_text("documentation, not a model\n")  # ignored, as Triton does
    # Beside the good version: a version named with a superscript two (isdigit() says
    # yes, int() says no), one with a leading zero and a dangling symlink as version 3.
    for odd in ("\u00b2", "01"):
        (root / "good" / odd).mkdir()
        (root / "good" / odd / "model.onnx").write_bytes(model)
    os.symlink(root / "nowhere", root / "good" / "3")
    # A model whose only version is the superscript one.
    (root / "superscript" / "\u00b2").mkdir(parents=True)
    (root / "superscript" / "\u00b2" / "model.onnx").write_bytes(model)
    # Model-level oddities.
    os.symlink(root / "missing-target", root / "dangling")
    os.symlink("loop", root / "loop")  # points at itself
    (root / "notadir").write_bytes(model)  # a file where a model directory belongs
    # A model whose only version is a symlink loop.
    (root / "loopver").mkdir()
    os.symlink("1", root / "loopver" / "1")
    # A version directory without model.onnx.
    (root / "empty_version" / "1" / "model.onnx").unlink()
    return root


def _index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    listed = client.get_model_repository_index(client_timeout=TIMEOUT_S)
    return {(m.name, m.version): (m.state, m.reason) for m in listed.models}


def _infer_good(client: grpcclient.InferenceServerClient) -> None:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    tag = grpcclient.InferInput("tag", [1, 1], "BYTES")
    tag.set_data_from_numpy(np.array([[b"t"]], dtype=np.object_))
    result = client.infer("good", [x, tag], client_timeout=TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("y"), [[0.0, 2.0, 4.0, 6.0]])


# (model, version) in RepositoryIndex -> a word its reason must contain.
EXPECTED = {
    ("good", "\u00b2"): "ASCII",
    ("good", "01"): "leading zero",
    ("good", "3"): "dangling",
    ("superscript", ""): "\u00b2",
    ("dangling", ""): "dangling",
    ("loop", ""): "loop",
    ("notadir", ""): "not a directory",
    ("loopver", ""): "loop",
    ("empty_version", "1"): "model.onnx",
}


def _check_reported(client: grpcclient.InferenceServerClient) -> dict[Any, Any]:
    index = _index(client)
    assert index[("good", "1")][0] == "READY"
    for key, word in EXPECTED.items():
        assert key in index, f"{key} missing from RepositoryIndex: {sorted(index)}"
        state, reason = index[key]
        assert state == "UNAVAILABLE", (key, state)
        assert word in reason, (key, reason)
    assert not any(name == "README.md" for name, _v in index)
    return index


def _start(tmp: Path, repo: Path, **sections: Any) -> AgentProcess:
    repository = sections.pop("repository", {})
    config = serving_config(tmp, repo, **sections)
    config["repository"].update(repository)
    write_toml(tmp / "agent.toml", config)
    agent = AgentProcess(tmp / "agent.toml")
    try:
        agent.wait_serving()
    except BaseException:
        agent.stop()
        raise
    return agent


def test_agent_starts_serves_and_reports_odd_entries(tmp_path: Path) -> None:
    repo = _odd_repository(tmp_path / "models")
    with _start(tmp_path, repo) as agent:
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            assert client.is_server_ready(client_timeout=TIMEOUT_S)
            assert client.is_model_ready("good", client_timeout=TIMEOUT_S)
            _infer_good(client)
            _check_reported(client)
            for name in ("dangling", "loop", "notadir", "loopver", "superscript"):
                assert not client.is_model_ready(name, client_timeout=TIMEOUT_S)
            with pytest.raises(InferenceServerException) as info:
                client.get_model_metadata("dangling", client_timeout=TIMEOUT_S)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "dangling" in str(info.value.message())
        finally:
            client.close()
        # Every bad entry is logged, naming its path.
        skipped = [e for e in agent.events if e.get("msg") == "repository entry skipped"]
        logged = " ".join(str(e.get("entry", "")) for e in skipped)
        for path in ("good/\u00b2", "good/01", "good/3", "superscript/\u00b2", "dangling",
                     "loop", "notadir", "loopver/1"):
            assert path in logged, path


def test_odd_entries_appearing_before_sighup(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "models", {"good": (scale_and_echo_model(), None)})
    with _start(tmp_path, repo) as agent:
        odd = _odd_repository(tmp_path / "odd")
        for entry in sorted(odd.iterdir()):
            if entry.name != "good":
                entry.rename(repo / entry.name)
        for entry in sorted((odd / "good").iterdir()):
            if entry.name != "1":
                entry.rename(repo / "good" / entry.name)
        reloads = sum(1 for e in agent.events if e.get("msg") == "reloaded")
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if sum(1 for e in agent.events if e.get("msg") == "reloaded") > reloads:
                break
            assert agent.proc.poll() is None, agent.log_text()
            time.sleep(0.05)
        assert not any(e.get("msg") == "reload failed" for e in agent.events), agent.log_text()
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            _infer_good(client)
            _check_reported(client)
        finally:
            client.close()


def test_explicit_load_of_odd_entries(tmp_path: Path) -> None:
    repo = _odd_repository(tmp_path / "models")
    with _start(tmp_path, repo, repository={"model_control": "explicit",
                                             "startup_models": ["good"]},
                control={"enabled": True}) as agent:
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            _infer_good(client)
            for name, word in (("dangling", "dangling"), ("loop", "loop"),
                               ("notadir", "not a directory"), ("superscript", "\u00b2"),
                               ("loopver", "loop"), ("empty_version", "model.onnx")):
                with pytest.raises(InferenceServerException) as info:
                    client.load_model(name, client_timeout=TIMEOUT_S)
                assert info.value.status() in (
                    "StatusCode.FAILED_PRECONDITION", "StatusCode.UNAVAILABLE"
                ), (name, info.value)
                assert word in str(info.value.message()), (name, info.value.message())
                assert not client.is_model_ready(name, client_timeout=TIMEOUT_S)
            index = _index(client)
            for name in ("dangling", "loop", "notadir", "superscript", "loopver"):
                assert index[(name, "")][0] == "UNAVAILABLE", name
            _infer_good(client)  # still serving
        finally:
            client.close()
