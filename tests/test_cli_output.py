"""CLI output people read (issue 21, item 5), through the real commands:

- ``edge-controller status DEVICE`` prints a summary (JSON only with ``--json``);
- the status table's job column names the model and version, and why a job failed
  in words;
- ``rollout list`` and ``rollout status`` say the same wave;
- ``edge-agent profile --quiet`` still says the version must be signed again;
- a request for a version the model's version policy excludes gets a NOT_FOUND
  that says so (a real agent, a real tritonclient).

The controller commands read the store and status file ``edge-controller serve``
writes; the test writes them with the controller's own code (RolloutBook) or in
its file format (status.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.controller import rollout as ro
from agent.controller.rollout_driver import RolloutBook
from agent.controller.status import STATUS_SCHEMA
from agent.protocol.topics import SCHEMA_VERSION
from tests.agent_process import REPO_ROOT, AgentProcess, write_toml

TIMEOUT_S = 120
MODEL = "tabular_classifier"
DEMO_KEY = REPO_ROOT / "models" / "keys" / "demo-model-signing.key.pem"
TRUST_DIR = REPO_ROOT / "models" / "keys" / "trusted"


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=TIMEOUT_S,
    )


def _controller(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run("agent.controller.cli", *args, cwd=cwd)


def _status_file(tmp_path: Path) -> Path:
    now = time.time()
    failure = "file model.onnx: sha256 abc... does not match the deployment's def..."
    entry: dict[str, Any] = {
        "device": "dev-a",
        "last_seen": now - 3,
        "reported": {"received_at": now - 3, "message": {
            "schema": "edge.reported", "version": 1, "device": "dev-a", "online": True,
            "since": now - 300, "tags": ["line-3"],
            "models": {MODEL: {"active_version": 2}},
        }},
        "jobs": {"received_at": now - 5, "message": {
            "schema": "edge.job", "version": 1, "device": "dev-a", "deployment_id": "d-42",
            "model": MODEL, "model_version": 3, "phase": "Failed", "status": "FAILED",
            "reason_code": "digest_mismatch", "message": failure,
        }},
        "health": {"received_at": now - 10, "message": {
            "schema": "edge.health", "version": 1, "device": "dev-a",
            "host": {"cpu_percent": 12.0},
            "models": [{"name": MODEL, "version": "2", "active": True,
                        "interval": {"success": 99, "failure": 1,
                                     "latency_ms": {"p99": 1.5}}}],
        }},
        "job_history": [
            {"deployment_id": "d-42", "phase": "Downloading", "status": "IN_PROGRESS",
             "reason_code": "", "ts": now - 20},
            {"deployment_id": "d-42", "phase": "Failed", "status": "FAILED",
             "reason_code": "digest_mismatch", "ts": now - 5},
        ],
    }
    path = tmp_path / "status.json"
    path.write_text(json.dumps({
        "schema": STATUS_SCHEMA, "version": SCHEMA_VERSION, "written_at": now,
        "devices": {"dev-a": entry}, "unverified": {"count": 0, "recent": []},
    }))
    return path


def test_status_device_is_a_summary_and_json_only_with_the_flag(tmp_path: Path) -> None:
    status = _status_file(tmp_path)
    common = ["--status-file", str(status), "--store", str(tmp_path / "store")]
    text = _controller("status", "dev-a", *common, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.stdout)
    out = text.stdout
    assert out.startswith("device dev-a: online")
    assert f"{MODEL}: active version 2" in out
    assert "v2 (active): 100 requests, errors 1.0%, p99 1.5 ms" in out
    assert f"job: {MODEL} v3 Failed/FAILED: file model.onnx: sha256" in out
    assert "(digest_mismatch)" in out and "deployment d-42" in out
    assert "cpu 12%" in out and "tags: line-3" in out
    assert "Downloading/IN_PROGRESS" in out  # recent jobs
    as_json = _controller("status", "dev-a", "--json", *common, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    entry = json.loads(as_json.stdout)
    assert entry["jobs"]["message"]["reason_code"] == "digest_mismatch"


def test_the_job_column_names_model_version_and_reason_in_words(tmp_path: Path) -> None:
    status = _status_file(tmp_path)
    # Without the device's message, the code's meaning.
    data = json.loads(status.read_text())
    data["devices"]["dev-b"] = json.loads(json.dumps(data["devices"]["dev-a"]))
    data["devices"]["dev-b"]["device"] = "dev-b"
    data["devices"]["dev-b"]["jobs"]["message"].update(
        device="dev-b", message="", reason_code="probation_failed", phase="RolledBack"
    )
    status.write_text(json.dumps(data))
    table = _controller(
        "status", "--status-file", str(status), "--store", str(tmp_path / "store"), cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:-1]}
    assert f"{MODEL} v3 Failed/FAILED: file model.onnx" in rows["dev-a"]
    assert (f"{MODEL} v3 RolledBack/FAILED: too many failed requests during probation"
            in rows["dev-b"]), rows["dev-b"]


def _rollout(store: Path) -> str:
    devices = [f"dev-{i}" for i in range(10)]
    plan = ro.RolloutPlan(
        rollout_id="r-1", model=MODEL, version=3, group="line", waves=ro.plan_waves(
            devices, "1", "3"),
        previous={d: 2 for d in devices}, soak_s=10.0, wave_timeout_s=100.0,
    )
    state = ro.new_rollout(plan, time.time())
    decision = ro.decide(state, {}, time.time())  # wave 1 (the first) starts deploying
    (action,) = decision.actions
    assert isinstance(action, ro.DeployWave) and action.wave == 0
    state = ro.wave_deploying(decision.state, 0, time.time())
    state = ro.wave_deployed(state, 0, {d: "dep-0" for d in action.devices}, time.time())
    RolloutBook(store).create(state)
    return plan.rollout_id


def test_rollout_list_and_status_say_the_same_wave(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rollout_id = _rollout(store)
    state = RolloutBook(store).load(rollout_id)
    wave_status = state.waves[0].status
    listing = _controller("rollout", "list", "--store", str(store), cwd=tmp_path)
    shown = _controller("rollout", "status", rollout_id, "--store", str(store), cwd=tmp_path)
    assert listing.returncode == 0 and shown.returncode == 0, listing.stderr + shown.stderr
    expected = f"wave 1/{len(state.waves)} {wave_status}"
    # Before: the list said the last wave ("wave 4/4") while the first was deploying.
    assert expected in listing.stdout, listing.stdout
    assert expected in shown.stdout.splitlines()[0], shown.stdout


def test_profile_quiet_still_says_sign_again(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    data = tmp_path / "reference.npz"
    rng = np.random.default_rng(1)
    np.savez(data, features=rng.normal(0.0, 1.0, (200, 8)).astype(np.float32))
    version_dir = repo / MODEL / "2"
    result = _run("agent.cli", "profile", str(version_dir), "--data", str(data), "--quiet",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(version_dir / "drift_profile.json")  # scripts
    assert "sign it again" in result.stderr and "model.sig" in result.stderr


def test_not_found_for_a_version_the_policy_excludes_says_so(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)  # latest 1: only v2 serves
    config = write_toml(tmp_path / "agent.toml", {
        "server": {"address": "127.0.0.1:0", "drain_timeout_s": 1.0},
        "repository": {"path": str(repo)},
        "signing": {"trust_dir": str(TRUST_DIR)},
        "state": {"dir": str(tmp_path / "state")},
        "telemetry": {"prometheus_address": ""},
    })
    agent = AgentProcess(config)
    try:
        agent.wait_serving(60)
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            features = grpcclient.InferInput("features", [1, 8], "FP32")
            features.set_data_from_numpy(np.ones((1, 8), np.float32))
            with pytest.raises(InferenceServerException) as excluded:
                client.infer(MODEL, [features], model_version="1")
            with pytest.raises(InferenceServerException) as missing:
                client.infer(MODEL, [features], model_version="9")
        finally:
            client.close()
    finally:
        agent.stop()
    assert excluded.value.status() == "StatusCode.NOT_FOUND"
    text = excluded.value.message() or ""
    assert "version_policy" in text and "served: 2" in text, text
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown version '9'" in (missing.value.message() or "")
