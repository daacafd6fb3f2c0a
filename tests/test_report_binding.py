"""Device reports bind to the exact envelope the controller published (issue 17, item 2).

A device that rejects bytes someone else put on its desired topic reports the
deployment id it could read from them; the controller must not judge the real
deployment by that. Real mosquitto, a real ``edge-controller serve`` driving a
detached rollout; the device side is an in-test MQTT client publishing on the
device's jobs topic.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.controller.deploy import build_deployment
from agent.controller.envelopes import PublishedEnvelope, PublishedEnvelopes
from agent.controller.status import StatusBook, load_status
from agent.controller.store import ModelManifest, StoredFile
from agent.mqtt.client import MqttClient
from tests.controller_process import (
    ControllerProcess,
    controller_toml,
    publish_version,
    run_controller,
)
from tests.fleet_device import device_settings, make_signed_version, make_signing_keys
from tests.mqtt_broker import MosquittoBroker

MODEL = "tabular_classifier"
DEVICES = ("dev-a", "dev-b")


def _job(device: str, deployment_id: str, phase: str, status: str, **extra: Any) -> bytes:
    message = {
        "schema": "edge.job_progress",
        "version": 1,
        "device": device,
        "deployment_id": deployment_id,
        "sequence": None,
        "model": None,
        "model_version": None,
        "phase": phase,
        "status": status,
        "reason_code": extra.pop("reason_code", ""),
        "message": "",
        "ts": time.time(),
        "message_id": os.urandom(8).hex(),
        **extra,
    }
    return json.dumps(message).encode()


# --------------------------------------------------------------------------- the book


def _envelope(digest: str, deployment_id: str, devices: tuple[str, ...]) -> PublishedEnvelope:
    return PublishedEnvelope(
        digest, deployment_id, frozenset(devices), frozenset({"b" * 64}), time.time() + 60
    )


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({}, "names no envelope digest"),
        ({"envelope_sha256": "f" * 64}, "is not one this controller published"),
        ({"envelope_sha256": "2" * 64}, "is deployment d-other"),
        ({"envelope_sha256": "3" * 64}, "is not for dev-a"),
    ],
)
def test_unbound_rejections_are_unverified_and_never_the_devices_job(
    extra: dict[str, Any], why: str, tmp_path: Path
) -> None:
    envelopes = PublishedEnvelopes()
    envelopes.add(_envelope("1" * 64, "d-1", DEVICES))
    envelopes.add(_envelope("2" * 64, "d-other", DEVICES))
    envelopes.add(_envelope("3" * 64, "d-1", ("dev-b",)))
    book = StatusBook(tmp_path / "status.json", envelopes=envelopes)
    bound = _job("dev-a", "d-1", "Downloading", "IN_PROGRESS", envelope_sha256="1" * 64)
    assert book.observe("dev-a", "jobs", bound)
    rejection = _job(
        "dev-a", "d-1", "Failed", "REJECTED", reason_code="signature_invalid", **extra
    )
    assert book.observe("dev-a", "jobs", rejection)
    entry = book.devices["dev-a"]
    assert entry["jobs"]["message"]["phase"] == "Downloading"  # the bound report stays
    assert [j["phase"] for j in entry["job_history"]] == ["Downloading"]
    assert entry["unverified"]["count"] == 1
    (item,) = entry["unverified"]["recent"]
    assert item["deployment_id"] == "d-1" and item["status"] == "REJECTED"
    assert why in item["why"], item["why"]
    book.write(book.encode())
    status = load_status(tmp_path / "status.json")
    assert status["unverified"]["count"] == 1
    assert status["unverified"]["recent"][0]["device"] == "dev-a"
    # A bound failure still counts: it becomes the job.
    failed = _job("dev-a", "d-1", "Failed", "REJECTED", envelope_sha256="1" * 64)
    assert book.observe("dev-a", "jobs", failed)
    assert entry["jobs"]["message"]["status"] == "REJECTED"
    assert book.unverified_count == 1


def test_a_reported_job_naming_an_unknown_envelope_is_dropped_and_one_without_is_kept() -> None:
    book = StatusBook(None)
    reported: dict[str, Any] = {
        "schema": "edge.reported_state",
        "version": 1,
        "device": "dev-a",
        "online": True,
        "job": {"deployment_id": "d-1", "phase": "Failed", "status": "FAILED",
                "envelope_sha256": "9" * 64},
    }
    assert book.observe("dev-a", "reported", json.dumps(reported).encode())
    assert book.devices["dev-a"]["reported"]["message"]["job"] is None
    assert book.unverified_count == 1
    del reported["job"]["envelope_sha256"]  # an older agent
    assert book.observe("dev-a", "reported", json.dumps(reported).encode())
    kept: dict[str, Any] = book.devices["dev-a"]["reported"]["message"]
    assert kept["job"]["phase"] == "Failed"


def test_published_envelopes_come_from_the_documents_the_controller_signs() -> None:
    manifest = ModelManifest(
        MODEL, 3, (StoredFile("model.onnx", "a" * 64, 10), StoredFile("model.sig", "c" * 64, 5)),
        StoredFile("config.pbtxt", "d" * 64, 3), "k" * 16, 0.0,
    )
    doc = build_deployment(manifest, ["dev-a"], sequence=1, issued_at=int(time.time()))
    envelopes = PublishedEnvelopes()
    from agent.controller.envelopes import _from_document

    envelopes.add(_from_document("e" * 64, doc))
    assert envelopes.binds("dev-a", doc["deployment_id"], "e" * 64)
    assert not envelopes.binds("dev-b", doc["deployment_id"], "e" * 64)
    assert all(envelopes.allowed("dev-a", sha) for sha in ("a" * 64, "c" * 64, "d" * 64))
    assert not envelopes.allowed("dev-b", "a" * 64)


# --------------------------------------------------------------------------- real processes


@pytest.fixture
def rollout_fleet(tmp_path: Path, mqtt_broker: MosquittoBroker) -> dict[str, Any]:
    signing = make_signing_keys(tmp_path / "signing")
    keygen = run_controller(["keygen", "--out-dir", str(tmp_path / "deploy-keys")])
    assert keygen.returncode == 0, keygen.stderr
    config = controller_toml(
        tmp_path / "controller.toml",
        mqtt_broker,
        tmp_path / "store",
        trust_dir=signing.trust_dir,
        deploy_key=tmp_path / "deploy-keys" / "deployment.key.pem",
    )
    with config.open("a") as handle:
        handle.write('\n[groups]\nall = ["dev-a", "dev-b"]\n')
    version_dir = make_signed_version(
        tmp_path / "repo", MODEL, 3, {"model.onnx": os.urandom(5000)}, signing
    )
    published = publish_version(config, version_dir, MODEL, 3)
    assert published.returncode == 0, published.stderr
    return {"config": config, "broker": mqtt_broker, "store": tmp_path / "store"}


def _rollout_state(config: Path, rollout_id: str) -> dict[str, Any]:
    result = run_controller(["rollout", "status", rollout_id, "--json", "--config", str(config)])
    assert result.returncode == 0, result.stderr
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def _as_device(broker: MosquittoBroker, device: str, payloads: list[bytes]) -> bytes:
    """Publish ``payloads`` on ``device``'s jobs topic; returns its retained desired message."""
    client = MqttClient(device_settings(broker, device, client_id=f"{device}-test"))
    await client.start()
    try:
        await client.wait_connected(10)
        await client.subscribe(f"edge/devices/{device}/desired", qos=1)
        desired = await asyncio.wait_for(client.messages.get(), 10)
        for payload in payloads:
            await client.publish(f"edge/devices/{device}/jobs", payload, qos=1)
        return desired.payload
    finally:
        await client.stop()


def test_a_forged_rejection_does_not_halt_the_rollout_and_is_recorded(
    rollout_fleet: dict[str, Any],
) -> None:
    config: Path = rollout_fleet["config"]
    broker: MosquittoBroker = rollout_fleet["broker"]
    with ControllerProcess(config).wait_serving() as controller:
        created = run_controller(
            ["deploy", MODEL, "3", "--group", "all", "--first", "2", "--soak", "60",
             "--detach", "--config", str(config)]
        )
        assert created.returncode == 0, created.stderr
        rollout_id = created.stdout.split()[1].rstrip(":")
        _wait(
            lambda: _rollout_state(config, rollout_id)["waves"][0]["status"] == "deployed",
            30,
            "wave 1 deployed",
        )
        deployment_id = _rollout_state(config, rollout_id)["waves"][0]["deployments"]["dev-a"]
        # What the device would report after someone put other bytes on its desired topic
        # naming this deployment: a digest the controller never published, or none.
        forged = [
            _job("dev-a", deployment_id, "Failed", "REJECTED", reason_code="signature_invalid",
                 envelope_sha256=hashlib.sha256(b"tampered").hexdigest()),
            _job("dev-a", deployment_id, "Failed", "REJECTED", reason_code="signature_invalid"),
        ]
        desired = asyncio.run(_as_device(broker, "dev-a", forged))
        status_file = rollout_fleet["store"] / "status.json"

        def recorded() -> bool:
            try:
                return bool(load_status(status_file)["unverified"]["count"] >= 2)
            except (OSError, ValueError, KeyError):
                return False

        _wait(recorded, 15, "the unverified messages in the status file")
        time.sleep(2.5)  # more than two rollout steps (one a second)
        state = _rollout_state(config, rollout_id)
        assert state["status"] == "running", state
        assert state["waves"][0]["status"] == "deployed" and not state["waves"][0]["failures"]
        assert state["rollback"] == "none"
        device = load_status(status_file)["devices"]["dev-a"]
        assert device["unverified"]["count"] == 2
        assert "jobs" not in device
        shown = run_controller(["status", "--config", str(config)])
        assert "unverified message received on device dev-a" in shown.stdout, shown.stdout
        assert "unverified message received on device dev-a" in controller.log_text()

        # The same failure about the envelope that was published does count.
        genuine = _job("dev-a", deployment_id, "Failed", "FAILED", reason_code="validation_failed",
                       envelope_sha256=hashlib.sha256(desired).hexdigest())
        asyncio.run(_as_device(broker, "dev-a", [genuine]))
        _wait(lambda: _rollout_state(config, rollout_id)["status"] == "halted", 15, "the halt")
