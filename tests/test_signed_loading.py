"""Issue 4 through the real agent: only verified versions are ever served."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.agent_process import REPO_ROOT, AgentProcess, write_toml

MODELS = REPO_ROOT / "models"


def _copy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS, repo)
    return repo


def _config(tmp_path: Path, repo: Path, **signing: object) -> Path:
    return write_toml(
        tmp_path / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "repository": {"path": str(repo)},
            "signing": {"trust_dir": str(MODELS / "keys" / "trusted"), **signing},
            "state": {"dir": str(tmp_path / "state")},
        },
    )


def _index(address: str) -> dict[str, tuple[str, str]]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        index = client.get_model_repository_index()
    return {f"{m.name}:{m.version}": (m.state, m.reason) for m in index.models}


def _infer_ok(address: str) -> object:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        features = grpcclient.InferInput("features", [1, 8], "FP32")
        features.set_data_from_numpy(np.ones((1, 8), np.float32))
        result = client.infer("tabular_classifier", [features])
        out = result.as_numpy("probabilities")
    assert out is not None
    return out


def test_example_models_are_signed_and_served_by_default(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        index = _index(agent.address)
        assert index["tabular_classifier:2"] == ("READY", "")
        assert index["all_dtypes:1"] == ("READY", "")
        assert "SIGNATURE CHECKS ARE OFF" not in agent.log_text()


def test_flipped_byte_is_not_loaded_and_the_reason_is_visible(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = _copy_repo(tmp_path)
    model_file = repo / "text_features" / "1" / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        state, reason = _index(agent.address)["text_features:1"]
        assert state == "UNAVAILABLE"
        assert "model.onnx" in reason and "does not match the signature" in reason
        with grpcclient.InferenceServerClient(agent.address) as client:
            assert not client.is_model_ready("text_features")
            with pytest.raises(InferenceServerException) as err:
                client.get_model_metadata("text_features")
            assert "not ready" in str(err.value) and "model.onnx" in str(err.value)
        # The other models are untouched.
        _infer_ok(agent.address)
        assert any(
            e.get("msg") == "model version not loaded" and e.get("model") == "text_features"
            for e in agent.events
        )


def test_untrusted_key_is_refused(tmp_path: Path) -> None:
    from agent.signing.keys import write_key_pair

    repo = _copy_repo(tmp_path)
    other = tmp_path / "other-trust"
    other.mkdir()
    pair = write_key_pair(tmp_path / "keys", name="someone-else")
    shutil.copy(pair.public_key, other / "someone-else.pub.pem")
    with AgentProcess(_config(tmp_path, repo, trust_dir=str(other))) as agent:
        agent.wait_serving()
        states = _index(agent.address)
        assert all(state == "UNAVAILABLE" for state, _ in states.values())
        assert all("not in the trust store" in reason for _, reason in states.values())


def test_unsigned_escape_hatch_warns_loudly(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    for sig in repo.glob("*/*/model.sig"):
        sig.unlink()
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        assert all(state == "UNAVAILABLE" for state, _ in _index(agent.address).values())
    with AgentProcess(_config(tmp_path, repo, allow_unsigned_models=True)) as agent:
        agent.wait_serving()
        assert _index(agent.address)["tabular_classifier:2"][0] == "READY"
        warnings = [e for e in agent.events if e.get("level") == "warning"]
        assert any("SIGNATURE CHECKS ARE OFF" in e["msg"] for e in warnings)


def test_tampering_after_start_is_caught_on_reload(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    with AgentProcess(_config(tmp_path, repo)) as agent:
        agent.wait_serving()
        _infer_ok(agent.address)
        # Swap version 2's model for version 1's bytes: a valid model, wrong signature.
        shutil.copy(repo / "tabular_classifier" / "1" / "model.onnx",
                    repo / "tabular_classifier" / "2" / "model.onnx")
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state, reason = _index(agent.address)["tabular_classifier:2"]
            if state == "UNAVAILABLE":
                break
            time.sleep(0.1)
        assert state == "UNAVAILABLE", "tampered version still served after reload"
        assert "model.onnx" in reason
