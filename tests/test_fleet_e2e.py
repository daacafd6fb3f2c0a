"""The whole fleet plane with real parts only: mosquitto with TLS client certificates
and the per-device ACL, ``edge-controller serve`` processes, and an ``edge-agent
serve`` process serving the example ``tabular_classifier`` over gRPC.

The operator's commands (``edge-controller keygen / publish / deploy / status``)
run as subprocesses; the test watches the device through the controller's status
file, and calls the agent with tritonclient (so nothing here imports agent.wire).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import numpy_helper

from agent.controller.status import load_status
from agent.signing.keys import load_private_key
from agent.signing.version_dir import sign_version
from tests.agent_process import REPO_ROOT, AgentProcess, write_toml
from tests.controller_process import ControllerProcess, controller_toml, run_controller
from tests.fleet_device import SigningKeys, make_signing_keys
from tests.mqtt_broker import MosquittoBroker

pytestmark = pytest.mark.timeout(180)

MODEL = "tabular_classifier"
DEVICE = "dev-1"
EXAMPLE = REPO_ROOT / "models" / MODEL
FEATURES = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)


# --------------------------------------------------------------------------- the fleet


@dataclass
class E2E:
    tmp: Path
    broker: MosquittoBroker
    signing: SigningKeys
    repository: Path
    state: Path
    store: Path
    controller_config: Path
    agent_config: Path
    controllers: list[ControllerProcess] = field(default_factory=list)
    agent: AgentProcess | None = None

    def start_controller(self, config: Path | None = None) -> ControllerProcess:
        controller = ControllerProcess(config or self.controller_config).wait_serving()
        self.controllers.append(controller)
        return controller

    def start_agent(self) -> AgentProcess:
        self.agent = AgentProcess(self.agent_config).wait_serving()
        return self.agent

    def controller(self, *args: str) -> Any:
        result = run_controller([*args, "--config", str(self.controller_config)])
        assert result.returncode == 0, result.stderr
        return result

    def publish(self, version: int, model_onnx: bytes) -> dict[str, Any]:
        """Sign a new version of tabular_classifier and publish it into the store."""
        version_dir = self.tmp / "published" / MODEL / str(version)
        version_dir.mkdir(parents=True)
        (version_dir / "model.onnx").write_bytes(model_onnx)
        sign_version(version_dir, load_private_key(self.signing.private_key), model_name=MODEL)
        shutil.copy(EXAMPLE / "config.pbtxt", version_dir.parent / "config.pbtxt")
        self.controller("publish", str(version_dir), "--model", MODEL, "--version", str(version))
        manifest: dict[str, Any] = json.loads(
            (self.store / "models" / MODEL / f"{version}.json").read_text()
        )
        return manifest

    def device_status(self) -> dict[str, Any]:
        try:
            status = load_status(self.store / "status.json")
        except (OSError, ValueError):
            return {}
        device: dict[str, Any] = status["devices"].get(DEVICE, {})
        return device

    def wait_device(
        self, predicate: Callable[[dict[str, Any]], Any], what: str, timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        entry: dict[str, Any] = {}
        while time.monotonic() < deadline:
            entry = self.device_status()
            if entry and predicate(entry):
                return entry
            if self.agent is not None and self.agent.proc.poll() is not None:
                raise AssertionError(f"the agent exited:\n{self.agent.log_text()[-5000:]}")
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; device status: "
            + json.dumps(entry.get("job_history", []))[-3000:]
            + self._diagnosis()
        )

    def _diagnosis(self) -> str:
        """What a timeout leaves to go on: how fresh the status file is, both logs."""
        try:
            age = f"{time.time() - load_status(self.store / 'status.json')['written_at']:.1f}s"
        except (OSError, ValueError, KeyError) as exc:
            age = f"unreadable ({exc})"
        parts = [f"\nstatus file written {age} ago"]
        for process in [*self.controllers, self.agent]:
            if process is not None:
                parts.append(f"--- {process.name} log tail:\n{process.log_text()[-3000:]}")
        return "\n".join(parts)

    def wait_job(self, deployment_id: str, timeout: float = 90.0) -> dict[str, Any]:
        """The terminal job message of ``deployment_id``."""
        entry = self.wait_device(
            lambda e: (
                _job(e, deployment_id).get("status")
                in {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED"}
            ),
            f"deployment {deployment_id} to finish",
            timeout,
        )
        return _job(entry, deployment_id)

    def deploy(self, version: int, *extra: str) -> str:
        # A short probation (the deployment's probation_s overrides the agent's).
        out = self.controller(
            "deploy", MODEL, str(version), "--device", DEVICE, "--probation", "1", *extra
        ).stdout
        deployment_id: str = out.split("deployment ")[1].split()[0]
        return deployment_id

    def triton(self) -> Any:
        assert self.agent is not None
        return grpcclient.InferenceServerClient(self.agent.address)


def _job(entry: dict[str, Any], deployment_id: str) -> dict[str, Any]:
    message: dict[str, Any] = (entry.get("jobs") or {}).get("message") or {}
    return message if message.get("deployment_id") == deployment_id else {}


def _progress(entry: dict[str, Any], deployment_id: str) -> float:
    job = _job(entry, deployment_id)
    progress = job.get("progress") or {}
    if job.get("phase") != "Downloading" or not progress.get("total"):
        return 0.0
    return float(progress["bytes"]) / float(progress["total"])


def infer(client: Any) -> tuple[float, ...]:
    features = grpcclient.InferInput("features", [1, 8], "FP32")
    features.set_data_from_numpy(FEATURES)
    result = client.infer(MODEL, [features])
    return tuple(round(float(v), 5) for v in result.as_numpy("probabilities")[0])


def padded_model(source: Path, padding: int) -> bytes:
    """``source`` with an unused initializer of ``padding`` bytes (a bigger download)."""
    model = onnx.load_model_from_string(source.read_bytes())
    pad = np.frombuffer(np.random.default_rng(padding).bytes(padding), np.uint8)
    model.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    return model.SerializeToString()


@pytest.fixture
def e2e(tmp_path: Path, mqtt_tls_broker: MosquittoBroker) -> Iterator[E2E]:
    broker = mqtt_tls_broker
    assert broker.tls is not None
    signing = make_signing_keys(tmp_path / "model-signing")
    # The device's repository: the example model's versions 1 and 2, signed.
    repository = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(EXAMPLE / version, repository / MODEL / version)
        sign_version(repository / MODEL / version, load_private_key(signing.private_key))
    shutil.copy(EXAMPLE / "config.pbtxt", repository / MODEL / "config.pbtxt")
    keys = run_controller(["keygen", "--out-dir", str(tmp_path / "deploy-keys")])
    assert keys.returncode == 0, keys.stderr
    deploy_trust = tmp_path / "deploy-trust"
    deploy_trust.mkdir()
    shutil.copy(tmp_path / "deploy-keys" / "deployment.pub.pem", deploy_trust)
    store = tmp_path / "store"
    controller_config = controller_toml(
        tmp_path / "controller.toml",
        broker,
        store,
        trust_dir=signing.trust_dir,
        deploy_key=tmp_path / "deploy-keys" / "deployment.key.pem",
    )
    cert = broker.tls.client(DEVICE)
    state = tmp_path / "state"
    agent_config = write_toml(
        tmp_path / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0", "drain_timeout_s": 2.0},
            "repository": {"path": str(repository)},
            "signing": {"trust_dir": str(signing.trust_dir)},
            "state": {"dir": str(state)},
            "mqtt": {
                "enabled": True,
                "host": broker.host,
                "port": broker.port,
                "tls_ca": str(broker.tls.ca_cert),
                "tls_cert": str(cert.cert),
                "tls_key": str(cert.key),
                "device_id": DEVICE,
                "keepalive_s": 5,
                "reconnect_max_s": 1.0,
            },
            "fleet": {
                "deployment_trust_dir": str(deploy_trust),
                "chunk_bytes": 64 * 1024,
                "window": 4,
                "chunk_timeout_s": 2.0,
                "chunk_retries": 8,
                "probation_s": 1.0,
                "probation_min_requests": 1000,  # the load must not decide this test
            },
        },
    )
    fleet = E2E(
        tmp_path, broker, signing, repository, state, store, controller_config, agent_config
    )
    try:
        yield fleet
    finally:
        if fleet.agent is not None:
            fleet.agent.stop()
            print("agent log:\n" + fleet.agent.log_text()[-8000:])
        for controller in fleet.controllers:
            controller.stop()


def _chunks_needed(manifest: dict[str, Any], chunk: int) -> int:
    sizes = [f["size"] for f in manifest["files"]] + [manifest["config"]["size"]]
    return sum(math.ceil(size / chunk) for size in sizes)


# --------------------------------------------------------------------------- tests


def test_deploy_reaches_active_with_zero_failed_requests_under_load(e2e: E2E) -> None:
    e2e.start_controller()
    e2e.start_agent()
    e2e.wait_device(lambda e: (e.get("reported") or {}).get("message", {}).get("online"), "birth")
    client = e2e.triton()
    try:
        before = infer(client)
        assert client.is_model_ready(MODEL, "2")
    finally:
        client.close()
    # Version 3 carries version 1's weights: its answers differ from version 2's.
    e2e.publish(3, (EXAMPLE / "1" / "model.onnx").read_bytes())

    failures: list[str] = []
    answers: dict[tuple[float, ...], int] = {}
    stop = threading.Event()

    def load() -> None:
        load_client = e2e.triton()
        try:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                try:
                    answer = infer(load_client)
                    answers[answer] = answers.get(answer, 0) + 1
                except Exception as exc:
                    failures.append(repr(exc))
        finally:
            load_client.close()

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    try:
        deployment_id = e2e.deploy(3)
        done = e2e.wait_job(deployment_id)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(30)
    assert (done["phase"], done["status"]) == ("Active", "SUCCEEDED"), done
    assert failures == []
    client = e2e.triton()
    try:
        after = infer(client)
        assert client.is_model_ready(MODEL, "3")
        assert not client.is_model_ready(MODEL, "2")
    finally:
        client.close()
    assert after != before
    assert set(answers) == {before, after}, "the swap happened under load"
    assert sum(answers.values()) > 50

    entry = e2e.device_status()
    steps = list(
        dict.fromkeys(
            (j["phase"], j["status"])
            for j in entry["job_history"]
            if j["deployment_id"] == deployment_id
        )
    )
    assert steps == [
        ("Offered", "QUEUED"),
        ("Downloading", "IN_PROGRESS"),
        ("Verified", "IN_PROGRESS"),
        ("Validating", "IN_PROGRESS"),
        ("Activating", "IN_PROGRESS"),
        ("Active", "IN_PROGRESS"),
        ("Active", "SUCCEEDED"),
    ]
    reported = e2e.wait_device(
        lambda e: e["reported"]["message"]["models"][MODEL]["active_version"] == 3,
        "reported state with version 3",
        20,
    )
    assert reported["reported"]["message"]["highest_sequence"] == done["sequence"]
    shown = run_controller(["status", "--config", str(e2e.controller_config)])
    assert f"{MODEL}:3" in shown.stdout and "Active/SUCCEEDED" in shown.stdout
    # The files the device now serves are the published bytes.
    manifest = json.loads((e2e.store / "models" / MODEL / "3.json").read_text())
    for entry_file in manifest["files"]:
        data = (e2e.repository / MODEL / "3" / entry_file["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry_file["sha256"]


def _start_slow_download(e2e: E2E, padding: int, rate: int) -> tuple[str, dict[str, Any]]:
    limited = controller_toml(
        e2e.tmp / "limited.toml",
        e2e.broker,
        e2e.store,
        trust_dir=e2e.signing.trust_dir,
        deploy_key=e2e.tmp / "deploy-keys" / "deployment.key.pem",
        max_bytes_per_s=rate,
    )
    e2e.controller_config = limited
    e2e.start_controller()
    e2e.start_agent()
    e2e.wait_device(lambda e: (e.get("reported") or {}).get("message", {}).get("online"), "birth")
    manifest = e2e.publish(3, padded_model(EXAMPLE / "1" / "model.onnx", padding))
    deployment_id = e2e.deploy(3)
    e2e.wait_device(lambda e: _progress(e, deployment_id) >= 0.3, "30% downloaded", 60)
    return deployment_id, manifest


def _serving_version_2(e2e: E2E) -> None:
    client = e2e.triton()
    try:
        assert client.is_model_ready(MODEL, "2")
        infer(client)
    finally:
        client.close()


def test_broker_restart_mid_download_resumes(e2e: E2E) -> None:
    deployment_id, manifest = _start_slow_download(e2e, 6_000_000, 1_500_000)
    e2e.broker.restart(down_s=1.0)
    _serving_version_2(e2e)  # the agent serves whether or not the broker is there
    done = e2e.wait_job(deployment_id)
    assert (done["phase"], done["status"]) == ("Active", "SUCCEEDED"), done
    stopped = e2e.controllers[0].stop()
    assert stopped is not None
    needed = _chunks_needed(manifest, 64 * 1024)
    # Resumed, not restarted: only the requests lost in the restart were sent again
    # (a restart from zero would cost at least 30% more).
    assert needed <= stopped["chunks"] <= needed + 2 * 4, (stopped, needed)
    client = e2e.triton()
    try:
        assert client.is_model_ready(MODEL, "3")
    finally:
        client.close()


def test_controller_restart_mid_download_resumes(e2e: E2E) -> None:
    deployment_id, manifest = _start_slow_download(e2e, 6_000_000, 1_500_000)
    first = e2e.controllers[0]
    first.kill()  # a crash: nothing answers until the next controller is up
    time.sleep(1.0)
    _serving_version_2(e2e)
    second = e2e.start_controller()
    done = e2e.wait_job(deployment_id)
    assert (done["phase"], done["status"]) == ("Active", "SUCCEEDED"), done
    stopped = second.stop()
    assert stopped is not None
    needed = _chunks_needed(manifest, 64 * 1024)
    # The second controller served what was missing, not the whole model again.
    assert 0 < stopped["chunks"] <= needed * 0.7 + 2 * 4, (stopped, needed)
    client = e2e.triton()
    try:
        assert client.is_model_ready(MODEL, "3")
    finally:
        client.close()
