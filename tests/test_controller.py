"""The fleet controller against a real mosquitto (TLS + per-device ACL), as real processes.

``edge-controller publish / deploy / status`` run as one-shot commands,
``edge-controller serve`` as a child process; the device side is an in-test
MQTT client speaking docs/fleet-protocol.md.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controller.envelopes import known_envelopes
from agent.controller.server import (
    ChunkRequestError,
    ChunkServer,
    _BlobCache,
    open_blob,
    parse_chunk_request,
)
from agent.controller.store import ArtifactStore
from agent.mqtt.client import Message, MqttClient
from agent.protocol.deployment import DeviceContext, verify_deployment
from agent.signing.keys import TrustStore, load_public_key
from agent.signing.oms import key_id, pae
from tests.controller_process import (
    ControllerProcess,
    controller_toml,
    publish_version,
    run_controller,
)
from tests.fleet_device import (
    DeviceClient,
    DownloadStats,
    SigningKeys,
    chunk_request,
    device_settings,
    make_signed_version,
    make_signing_keys,
)
from tests.mqtt_broker import CONTROLLER_IDENTITY, BrokerFactory, MosquittoBroker

MODEL = "tabular_classifier"
MODEL_BYTES = 3 * 1024 * 1024 + 12345  # not a multiple of any chunk size
CONFIG_PBTXT = b'name: "tabular_classifier"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
MAX_CHUNK = 256 * 1024


@dataclass
class Fleet:
    broker: MosquittoBroker
    store: Path
    signing: SigningKeys
    repo: Path
    version_dir: Path
    deploy_key: Path
    deploy_public_key: Path
    config: Path
    model_bytes: bytes

    @property
    def model_sha(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def _publish(fleet: Fleet, version_dir: Path, version: int) -> Any:
    return publish_version(fleet.config, version_dir, MODEL, version)


@pytest.fixture
def fleet(tmp_path: Path, mqtt_tls_broker: MosquittoBroker) -> Fleet:
    signing = make_signing_keys(tmp_path / "model-signing")
    repo = tmp_path / "repo"
    model_bytes = os.urandom(MODEL_BYTES)
    version_dir = make_signed_version(
        repo,
        MODEL,
        3,
        {"model.onnx": model_bytes, "validation/vectors.json": b'{"cases": []}'},
        signing,
        config_pbtxt=CONFIG_PBTXT,
    )
    keygen = run_controller(["keygen", "--out-dir", str(tmp_path / "deploy-keys")])
    assert keygen.returncode == 0, keygen.stderr
    deploy_key = tmp_path / "deploy-keys" / "deployment.key.pem"
    store = tmp_path / "store"
    config = controller_toml(
        tmp_path / "controller.toml",
        mqtt_tls_broker,
        store,
        trust_dir=signing.trust_dir,
        deploy_key=deploy_key,
        max_chunk_bytes=MAX_CHUNK,
    )
    fleet = Fleet(
        mqtt_tls_broker,
        store,
        signing,
        repo,
        version_dir,
        deploy_key,
        tmp_path / "deploy-keys" / "deployment.pub.pem",
        config,
        model_bytes,
    )
    published = _publish(fleet, version_dir, 3)
    assert published.returncode == 0, published.stderr
    return fleet


def _run(coro: Any, timeout: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _grant(fleet: Fleet, *devices: str) -> None:
    """Deploy the published version to ``devices``: the chunk server serves its blobs
    only to devices a deployment targets (a serve started later reads the store)."""
    args = ["deploy", MODEL, "3", "--config", str(fleet.config)]
    for device in devices or ("dev-a",):
        args += ["--device", device]
    result = run_controller(args)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- publish


def test_publish_stores_content_addressed_blobs_and_manifest(fleet: Fleet) -> None:
    manifest = json.loads((fleet.store / "models" / MODEL / "3.json").read_text())
    assert manifest["name"] == MODEL and manifest["model_version"] == 3
    by_path = {f["path"]: f for f in manifest["files"]}
    assert set(by_path) == {"identity.json", "model.onnx", "model.sig", "validation/vectors.json"}
    for rel, entry in by_path.items():
        data = (fleet.version_dir / rel).read_bytes()
        assert entry == {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        blob = fleet.store / "blobs" / "sha256" / entry["sha256"]
        assert blob.read_bytes() == data
    assert manifest["config"]["sha256"] == hashlib.sha256(CONFIG_PBTXT).hexdigest()
    assert (fleet.store / "blobs" / "sha256" / manifest["config"]["sha256"]).is_file()

    # Publishing the same content again is a no-op; different content under the same
    # version number is refused and changes nothing.
    again = _publish(fleet, fleet.version_dir, 3)
    assert again.returncode == 0, again.stderr
    other = make_signed_version(
        fleet.repo / "other", MODEL, 3, {"model.onnx": b"different"}, fleet.signing
    )
    conflict = _publish(fleet, other, 3)
    assert conflict.returncode == 1
    assert "publish_conflict" in conflict.stderr
    assert (
        json.loads((fleet.store / "models" / MODEL / "3.json").read_text())["files"]
        == (manifest["files"])
    )


def test_publish_refuses_tampered_and_untrusted_versions(fleet: Fleet, tmp_path: Path) -> None:
    tampered = make_signed_version(
        tmp_path / "t", MODEL, 4, {"model.onnx": b"original bytes"}, fleet.signing
    )
    (tampered / "model.onnx").write_bytes(b"altered bytes!")
    result = _publish(fleet, tampered, 4)
    assert result.returncode == 1
    assert "file_digest_mismatch" in result.stderr
    assert not (fleet.store / "models" / MODEL / "4.json").exists()
    assert not (
        fleet.store / "blobs" / "sha256" / hashlib.sha256(b"altered bytes!").hexdigest()
    ).exists()

    stranger = make_signing_keys(tmp_path / "stranger")
    untrusted = make_signed_version(tmp_path / "u", MODEL, 5, {"model.onnx": b"x"}, stranger)
    result = _publish(fleet, untrusted, 5)
    assert result.returncode == 1
    assert "signature_untrusted_key" in result.stderr
    assert not (fleet.store / "models" / MODEL / "5.json").exists()

    unsigned = tmp_path / "unsigned" / MODEL / "6"
    unsigned.mkdir(parents=True)
    (unsigned / "model.onnx").write_bytes(b"y")
    result = _publish(fleet, unsigned, 6)
    assert result.returncode == 1
    assert "signature_missing" in result.stderr


# --------------------------------------------------------------------------- deploy


def _verify_envelope(envelope: dict[str, Any], public_key_pem: Path) -> dict[str, Any]:
    assert envelope["schema"] == "edge.deployment_envelope" and envelope["version"] == 1
    assert envelope["payloadType"] == "application/vnd.edge-agent.deployment+json"
    payload = base64.b64decode(envelope["payload"])
    key = load_public_key(public_key_pem)
    (signature,) = envelope["signatures"]
    assert signature["keyid"] == key_id(key)
    key.verify(  # raises InvalidSignature if wrong
        base64.b64decode(signature["sig"]),
        pae(envelope["payloadType"], payload),
        ec.ECDSA(hashes.SHA256()),
    )
    deployment: dict[str, Any] = json.loads(payload)
    # And the device's own verifier accepts it.
    verified = verify_deployment(
        json.dumps(envelope).encode(),
        TrustStore.from_public_key_files([public_key_pem]),
        DeviceContext(device_id=deployment["devices"][0], now=time.time(), highest_sequence=0),
    )
    assert verified.deployment_id == deployment["deployment_id"]
    assert (
        verified.total_bytes
        == sum(f["size"] for f in deployment["model"]["files"])
        + (deployment["model"]["config"]["size"])
    )
    return deployment


async def _retained_desired(broker: MosquittoBroker, device: str) -> dict[str, Any]:
    # A fresh session, so the message can only be the broker's retained copy.
    settings = device_settings(
        broker,
        device,
        client_id=f"{device}-{os.urandom(4).hex()}",
        clean_start=True,
        session_expiry_s=0,
    )
    async with DeviceClient(settings, device) as dev:
        await dev.client.subscribe(f"edge/devices/{device}/desired")
        message = await asyncio.wait_for(dev.other.get(), 10)
        assert message.topic == f"edge/devices/{device}/desired"
        assert message.retain and message.qos == 1
        envelope: dict[str, Any] = json.loads(message.payload)
        return envelope


def test_deploy_signs_and_publishes_retained_to_each_device(fleet: Fleet) -> None:
    before = int(time.time())
    first = run_controller(
        [
            "deploy",
            MODEL,
            "3",
            "--device",
            "dev-a",
            "--device",
            "dev-b",
            "--expires-in",
            "3600",
            "--config",
            str(fleet.config),
        ]
    )
    assert first.returncode == 0, first.stderr
    envelope_a = _run(_retained_desired(fleet.broker, "dev-a"))
    envelope_b = _run(_retained_desired(fleet.broker, "dev-b"))
    assert envelope_a == envelope_b
    deployment = _verify_envelope(envelope_a, fleet.deploy_public_key)
    manifest = json.loads((fleet.store / "models" / MODEL / "3.json").read_text())
    assert deployment["schema"] == "edge.deployment" and deployment["version"] == 1
    assert deployment["devices"] == ["dev-a", "dev-b"]
    assert deployment["model"] == {
        "name": MODEL,
        "version": 3,
        "files": manifest["files"],
        "config": {"sha256": manifest["config"]["sha256"], "size": manifest["config"]["size"]},
    }
    assert before <= deployment["issued_at"] <= time.time()
    assert deployment["expires_at"] - deployment["issued_at"] == 3600
    assert deployment["allow_downgrade"] is False
    assert deployment["deployment_id"] in first.stdout
    assert str(deployment["sequence"]) in first.stdout

    second = run_controller(
        [
            "deploy",
            MODEL,
            "3",
            "--device",
            "dev-a",
            "--allow-downgrade",
            "--config",
            str(fleet.config),
        ]
    )
    assert second.returncode == 0, second.stderr
    redeployed = _verify_envelope(
        _run(_retained_desired(fleet.broker, "dev-a")), fleet.deploy_public_key
    )
    assert redeployed["sequence"] > deployment["sequence"]
    assert redeployed["deployment_id"] != deployment["deployment_id"]
    assert redeployed["allow_downgrade"] is True
    assert redeployed["expires_at"] - redeployed["issued_at"] == 7 * 24 * 3600
    # dev-b still holds the first deployment.
    assert _run(_retained_desired(fleet.broker, "dev-b")) == envelope_b
    records = sorted((fleet.store / "deployments").glob("*.json"))
    assert len(records) == 2


def test_deploy_refuses_unknown_versions_and_bad_devices(fleet: Fleet) -> None:
    missing = run_controller(
        ["deploy", MODEL, "9", "--device", "dev-a", "--config", str(fleet.config)]
    )
    assert missing.returncode == 3
    assert "not published" in missing.stderr
    bad = run_controller(
        ["deploy", MODEL, "3", "--device", "../dev", "--config", str(fleet.config)]
    )
    assert bad.returncode == 1
    assert "device id" in bad.stderr
    assert not (fleet.store / "deployments").exists()
    assert not (fleet.store / "sequence").exists()  # no sequence number spent


# --------------------------------------------------------------------------- serve


def test_serve_answers_chunk_requests_with_exact_bytes(fleet: Fleet) -> None:
    _grant(fleet)

    async def scenario() -> None:
        async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
            # One request: the answer carries the protocol's user properties and the
            # request's correlation data, on the device's artifacts topic.
            answer = await dev.request(fleet.model_sha, 1000, 4096)
            assert answer.topic == "edge/devices/dev-a/artifacts"
            assert answer.payload == fleet.model_bytes[1000:5096]
            assert answer.user_properties == {
                "schema": "edge.chunk",
                "version": "1",
                "sha256": fleet.model_sha,
                "offset": "1000",
            }
            # The last chunk is short: only the bytes that exist.
            tail = await dev.request(fleet.model_sha, MODEL_BYTES - 100, MAX_CHUNK)
            assert tail.payload == fleet.model_bytes[-100:]
            stats = DownloadStats()
            data = await dev.download(
                fleet.model_sha, MODEL_BYTES, chunk=MAX_CHUNK, window=6, stats=stats
            )
            assert data == fleet.model_bytes
            assert stats.retries == 0 and not dev.unmatched
            signature = (fleet.version_dir / "model.sig").read_bytes()
            sig_sha = hashlib.sha256(signature).hexdigest()
            assert await dev.download(sig_sha, len(signature), chunk=1024, window=3) == signature

    with ControllerProcess(fleet.config).wait_serving() as controller:
        _run(scenario())
        stopped = controller.stop()
    assert stopped is not None
    assert stopped["errors"] == 0
    # Only requests that arrive before their blob is open wait for the loop (which opens
    # it): the model's first (asked alone) and at most the signature's first window of 3.
    # The rest are answered on the network thread.
    assert stopped["inline"] >= stopped["chunks"] - (1 + 3)
    # glibc here: serve keeps chunk-sized buffers in the heap (agent/common/allocator.py).
    serving = next(e for e in controller.events if e.get("msg") == "serving")
    assert serving["allocator_tuned"] is (platform.libc_ver()[0] == "glibc")
    assert stopped["chunks"] >= 2 + -(-MODEL_BYTES // MAX_CHUNK)


def test_a_blob_the_cache_evicts_stays_open_until_no_answer_holds_it(fleet: Fleet) -> None:
    """Answers are sent from the blob's descriptor, maybe again after a reconnect, so
    the descriptor cache must not close what an answer still holds; once nothing
    does, the descriptor is closed."""
    store = ArtifactStore(fleet.store)
    sig_sha = hashlib.sha256((fleet.version_dir / "model.sig").read_bytes()).hexdigest()
    assert open_blob(store, "0" * 64) is None  # not in the store
    cache = _BlobCache(capacity=1)
    model = open_blob(store, fleet.model_sha)
    assert model is not None and model.size == MODEL_BYTES
    fd = model.fileno()
    cache.put(fleet.model_sha, model)
    assert cache.get(fleet.model_sha) is model
    signature = open_blob(store, sig_sha)
    assert signature is not None
    cache.put(sig_sha, signature)  # evicts the model's entry
    assert cache.get(fleet.model_sha) is None
    assert os.pread(fd, 64, 100) == fleet.model_bytes[100:164]  # still open
    del model
    gc.collect()
    try:
        now = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        now = ""
    assert now != str(store.blob_path(fleet.model_sha))  # closed (or the number reused)
    cache.close()


def test_requests_past_their_expiry_are_shed_and_answers_carry_what_is_left(
    fleet: Fleet,
) -> None:
    """Overload protection (docs/fleet-protocol.md): the expiry a request arrived with,
    minus the time it has waited at the controller, decides whether it is answered."""
    _grant(fleet)

    async def scenario() -> None:
        controller = MqttClient(
            device_settings(fleet.broker, CONTROLLER_IDENTITY, client_id="ctrl-shed")
        )
        await controller.start()
        await controller.wait_connected(10)
        store = ArtifactStore(fleet.store)
        server = ChunkServer(controller, store, grants=known_envelopes(store, None),
                             prefix="edge", share_group="shed-test")
        try:
            async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:

                async def ask(expiry_s: int | None, waited_s: float) -> asyncio.Future[Message]:
                    correlation = dev.new_correlation()
                    answer = dev.expect(correlation)
                    await server.dispatch(
                        Message(
                            topic=dev.request_topic,
                            payload=chunk_request("dev-a", fleet.model_sha, 0, 1000),
                            qos=1,
                            response_topic=dev.reply_topic,
                            correlation_data=correlation,
                            expiry_s=expiry_s,
                            received=time.monotonic() - waited_s,
                        )
                    )
                    return answer

                stale = await ask(5, 4.8)  # 0.2 s left: the device is about to give up
                fresh = await ask(30, 2.0)
                unlimited = await ask(None, 60.0)  # no expiry: always answered
                fresh_answer = await asyncio.wait_for(fresh, 10)
                unlimited_answer = await asyncio.wait_for(unlimited, 10)
                assert fresh_answer.payload == fleet.model_bytes[:1000]
                # The broker forwards the interval that is left: at most 28 s.
                assert fresh_answer.expiry_s is not None and 20 <= fresh_answer.expiry_s <= 28
                assert unlimited_answer.expiry_s is None
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stale), 1.5)
                assert server.stats.shed == 1 and server.stats.chunks == 2
        finally:
            await server.close()
            await controller.stop()

    _run(scenario())


def test_two_controllers_share_the_requests(fleet: Fleet, tmp_path: Path) -> None:
    second_config = controller_toml(
        tmp_path / "controller-2.toml",
        fleet.broker,
        fleet.store,
        max_chunk_bytes=MAX_CHUNK,
    )
    chunk = 16 * 1024
    expected_chunks = -(-MODEL_BYTES // chunk)
    _grant(fleet)

    async def scenario() -> None:
        async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
            data = await dev.download(fleet.model_sha, MODEL_BYTES, chunk=chunk, window=16)
            assert data == fleet.model_bytes

    first = ControllerProcess(fleet.config)
    second = ControllerProcess(second_config)
    try:
        first.wait_serving()
        second.wait_serving()
        _run(scenario())
    finally:
        stats = [first.stop(), second.stop()]
    assert all(s is not None for s in stats), [first.log_text(), second.log_text()]
    served = [s["chunks"] for s in stats if s is not None]
    assert all(n > 0 for n in served), f"each controller should answer a part: {served}"
    assert sum(served) == expected_chunks


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("length over the maximum", {"length": MAX_CHUNK + 1}, "bad_request"),
    ("zero length", {"length": 0}, "bad_request"),
    ("negative offset", {"offset": -1}, "bad_request"),
    ("offset past the end", {"offset": MODEL_BYTES}, "bad_request"),
    ("float length", {"length": 1.5}, "bad_request"),
    ("boolean offset", {"offset": True}, "bad_request"),
    # Refused before the store is looked at: the answer does not tell what exists.
    ("unknown artifact", {"sha256": "0" * 64}, "not_authorized"),
    ("upper-case digest", {"sha256": "A" * 64}, "bad_request"),
    ("other device in payload", {"device": "dev-b"}, "bad_request"),
    ("unknown schema", {"schema": "edge.chunk_requests"}, "bad_request"),
    ("future version", {"version": 2}, "bad_request"),
    ("unknown field", {"extra": 1}, "bad_request"),
    ("missing field", {"length": None}, "bad_request"),
    ("not JSON", b"\xff{not json", "bad_request"),
    ("JSON array", b"[1, 2]", "bad_request"),
    ("oversized JSON", b'{"pad": "' + b"x" * (64 * 1024) + b'"}', "bad_request"),
]


def test_bad_chunk_requests_get_chunk_errors(fleet: Fleet) -> None:
    _grant(fleet)

    async def scenario() -> None:
        async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
            for name, change, code in BAD_REQUESTS:
                if isinstance(change, bytes):
                    payload = change
                else:
                    body = json.loads(chunk_request("dev-a", fleet.model_sha, 0, 1024))
                    for key, value in change.items():
                        if value is None:
                            del body[key]
                        else:
                            body[key] = value
                    payload = json.dumps(body).encode()
                correlation = dev.new_correlation()
                future = await dev.send_raw(payload, correlation=correlation)
                assert future is not None
                answer = await asyncio.wait_for(future, 10)
                assert answer.user_properties.get("schema") == "edge.chunk_error", name
                error = json.loads(answer.payload)
                assert error["schema"] == "edge.chunk_error" and error["version"] == 1, name
                assert error["code"] == code, (name, error)
                assert error["message"], name

            # A response topic other than the device's own is refused, and the
            # answer still goes to the device's own topic only.
            correlation = dev.new_correlation()
            future = await dev.send_raw(
                chunk_request("dev-a", fleet.model_sha, 0, 10),
                correlation=correlation,
                response_topic="edge/devices/dev-b/artifacts",
            )
            assert future is not None
            answer = await asyncio.wait_for(future, 10)
            assert answer.topic == "edge/devices/dev-a/artifacts"
            assert json.loads(answer.payload)["code"] == "bad_request"

            # Nothing was disturbed: a good request is still answered.
            good = await dev.request(fleet.model_sha, 0, 10)
            assert good.payload == fleet.model_bytes[:10]

    with ControllerProcess(fleet.config).wait_serving() as controller:
        _run(scenario())
        stopped = controller.stop()
    assert stopped is not None
    assert stopped["errors"] == len(BAD_REQUESTS) + 1
    assert stopped["not_authorized"] == 1
    assert stopped["chunks"] == 1


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["schema", "version", "device", "sha256", "offset", "length", "x"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70)),
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_parse_chunk_request_accepts_only_valid_requests(payload: bytes) -> None:
    try:
        request = parse_chunk_request("dev-a", payload, MAX_CHUNK)
    except ChunkRequestError as error:
        assert error.code == "bad_request" and error.message
        return
    data = json.loads(payload)
    assert data["schema"] == "edge.chunk_request" and data["device"] == "dev-a"
    assert 0 < request.length <= MAX_CHUNK and request.offset >= 0


# --------------------------------------------------------------------------- status


def test_status_keeps_latest_reports_per_device(fleet: Fleet) -> None:
    reported = {
        "schema": "edge.reported_state",
        "version": 1,
        "device": "dev-a",
        "online": True,
        "since": 1.0,
        "agent_version": "0.1.0",
        "models": {MODEL: {"active_version": 2, "last_known_good": 2}},
        "job": None,
        "highest_sequence": 0,
    }
    _grant(fleet)
    (record_path,) = (fleet.store / "deployments").glob("*.json")
    record = json.loads(record_path.read_text())
    deployment_id = record["deployment"]["deployment_id"]
    envelope_sha = hashlib.sha256(record["published"].encode()).hexdigest()

    def job(phase: str, status: str, envelope: str | None = envelope_sha) -> bytes:
        return json.dumps(
            {
                "schema": "edge.job_progress",
                "version": 1,
                "device": "dev-a",
                "deployment_id": deployment_id,
                "envelope_sha256": envelope,
                "sequence": 1,
                "model": MODEL,
                "model_version": 3,
                "phase": phase,
                "status": status,
                "reason_code": "",
                "message": "",
                "progress": {"bytes": 0, "total": 0},
                "ts": time.time(),
                "message_id": os.urandom(8).hex(),
            }
        ).encode()

    async def device_reports() -> None:
        async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
            await dev.client.publish(
                "edge/devices/dev-a/reported", json.dumps(reported).encode(), retain=True
            )
            await dev.client.publish("edge/devices/dev-a/jobs", job("Downloading", "IN_PROGRESS"))
            await dev.client.publish("edge/devices/dev-a/jobs", job("Active", "SUCCEEDED"))
            # Rejected: wrong schema for the topic, and a message naming another device.
            await dev.client.publish("edge/devices/dev-a/health", job("Failed", "FAILED"))
            bad = json.loads(job("Failed", "FAILED"))
            bad["device"] = "dev-b"
            await dev.client.publish("edge/devices/dev-a/jobs", json.dumps(bad).encode())
            # Kept apart: about bytes the controller never published as this deployment.
            await dev.client.publish("edge/devices/dev-a/jobs", job("Failed", "REJECTED", None))

    with ControllerProcess(fleet.config).wait_serving() as controller:
        _run(device_reports())
        deadline = time.monotonic() + 15
        shown: dict[str, Any] = {}
        while time.monotonic() < deadline:
            result = run_controller(["status", "dev-a", "--json", "--config", str(fleet.config)])
            if result.returncode == 0:
                shown = json.loads(result.stdout)
                if len(shown.get("job_history", [])) >= 2 and shown.get("unverified"):
                    break
            time.sleep(0.2)
        controller.stop()
    assert shown["reported"]["message"] == reported
    assert shown["jobs"]["message"]["phase"] == "Active"
    assert [j["phase"] for j in shown["job_history"]] == ["Downloading", "Active"]
    assert shown["unverified"]["count"] == 1
    assert shown["unverified"]["recent"][0]["status"] == "REJECTED"
    assert "health" not in shown

    table = run_controller(["status", "--config", str(fleet.config)])
    assert table.returncode == 0, table.stderr
    (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith("dev-a")]
    assert "online" in line and f"{MODEL}:2" in line and "Active/SUCCEEDED" in line
    unknown = run_controller(["status", "dev-z", "--config", str(fleet.config)])
    assert unknown.returncode == 3


def test_controller_config_errors_name_the_key(
    tmp_path: Path, mosquitto_factory: BrokerFactory
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[fleet]\nprefx = "edge"\n')
    result = run_controller(["serve", "--config", str(config)])
    assert result.returncode == 2
    assert "fleet.prefx" in result.stderr
    config.write_text('[broker]\nport = "x"\n')
    result = run_controller(["serve", "--config", str(config)])
    assert result.returncode == 2
    assert "broker.port" in result.stderr
    store = f'[store]\ndir = "{tmp_path / "store"}"\n'
    for member in ("tag:a b", "tag:", "tag:-x", "tag:a:b", f"tag:{'a' * 33}"):
        config.write_text(f'{store}[groups]\nline = ["{member}"]\n')
        result = run_controller(["rollout", "list", "--config", str(config)])
        assert result.returncode == 2, member
        assert "groups.line" in result.stderr, result.stderr
    config.write_text(f'{store}[groups]\nline = ["tag:line-3", "tag:{"a" * 32}", "dev-*"]\n')
    result = run_controller(["rollout", "list", "--config", str(config)])
    assert result.returncode == 0, result.stderr


def test_download_survives_a_device_in_the_share_group(fleet: Fleet) -> None:
    """A device that joins the controllers' share group swallows its turn of the
    requests (mosquitto's acl_file checks deliveries, not subscriptions); the
    downloading device re-requests what timed out and still gets every byte."""
    _grant(fleet)

    async def scenario() -> DownloadStats:
        rogue = DeviceClient(device_settings(fleet.broker, "dev-b"), "dev-b")
        await rogue.start()
        try:
            await rogue.client.subscribe("$share/edge-controllers/edge/artifacts/request/+")
            async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
                stats = DownloadStats()
                data = await dev.download(
                    fleet.model_sha,
                    MODEL_BYTES,
                    chunk=MAX_CHUNK,
                    window=8,
                    request_timeout=0.5,
                    stats=stats,
                )
                assert data == fleet.model_bytes
            assert rogue.other.empty() and not rogue.unmatched  # it read nothing
            return stats
        finally:
            await rogue.stop()

    with ControllerProcess(fleet.config).wait_serving():
        stats = _run(scenario())
    assert stats.retries > 0, "the rogue member should have swallowed some requests"


def test_serve_limits_its_send_rate(fleet: Fleet, tmp_path: Path) -> None:
    rate = 1_000_000
    config = controller_toml(
        tmp_path / "limited.toml",
        fleet.broker,
        fleet.store,
        max_chunk_bytes=MAX_CHUNK,
        max_bytes_per_s=rate,
    )
    _grant(fleet)

    async def scenario() -> float:
        async with DeviceClient(device_settings(fleet.broker, "dev-a"), "dev-a") as dev:
            started = time.monotonic()
            data = await dev.download(fleet.model_sha, MODEL_BYTES, chunk=MAX_CHUNK, window=8)
            assert data == fleet.model_bytes
            return time.monotonic() - started

    with ControllerProcess(config).wait_serving() as controller:
        elapsed = _run(scenario())
        stopped = controller.stop()
    # The first chunk goes out at once; the rest is spaced at the configured rate.
    assert elapsed >= (MODEL_BYTES - MAX_CHUNK) / rate * 0.95, elapsed
    assert stopped is not None and stopped["inline"] == 0  # the cap needs the loop's timers


def test_rollout_defaults_come_from_the_config_and_flags_win(fleet: Fleet) -> None:
    """``[rollout]`` gives ``deploy --group`` its plan; each flag given overrides one key."""
    base = fleet.config.read_text()
    devices = [f"dev-{i:02d}" for i in range(10)]
    base += "\n[groups]\nline = [" + ", ".join(f'"{d}"' for d in devices) + "]\n"
    configured = fleet.config.parent / "with-rollout.toml"
    configured.write_text(
        base
        + """
[rollout]
first = "3"
wave_size = "40%"
soak_s = 7.5
wave_timeout_s = 99
max_error_rate = 0.2
max_p99_ms = 80
max_failed = 1
halt_on_drift = false
rollback_on_halt = true
"""
    )
    plain = fleet.config.parent / "without-rollout.toml"
    plain.write_text(base)

    def plan(config: Path, *flags: str) -> tuple[dict[str, Any], str]:
        created = run_controller(
            ["deploy", MODEL, "3", "--group", "line", "--detach", "--config", str(config), *flags]
        )
        assert created.returncode == 0, created.stdout + created.stderr
        rollout_id = created.stdout.split()[1].rstrip(":")
        shown = run_controller(["rollout", "status", rollout_id, "--json", "--config", str(config)])
        assert shown.returncode == 0, shown.stderr
        loaded: dict[str, Any] = json.loads(shown.stdout)["plan"]
        return loaded, created.stdout

    from_config, printed = plan(configured)
    assert [len(w) for w in from_config["waves"]] == [3, 4, 3]
    assert (from_config["soak_s"], from_config["wave_timeout_s"]) == (7.5, 99)
    assert from_config["thresholds"] == {
        "max_error_rate": 0.2,
        "max_p99_ms": 80,
        "halt_on_drift": False,
        "max_failed_devices": 1,
    }
    assert from_config["rollback_on_halt"] is True
    assert (
        "soak 7.5s, wave timeout 99s, max error rate 0.2, max p99 80 ms, ignore on drift, "
        "1 failed per wave tolerated, roll back on halt: yes" in printed
    ), printed

    flags = (
        *("--first", "50%", "--wave-size", "rest", "--soak", "1", "--wave-timeout", "5"),
        *("--max-error-rate", "none", "--max-p99-ms", "5", "--max-failed", "0"),
        *("--halt-on-drift", "--no-rollback-on-halt"),
    )
    from_flags, _ = plan(configured, *flags)
    assert [len(w) for w in from_flags["waves"]] == [5, 5]
    assert (from_flags["soak_s"], from_flags["wave_timeout_s"]) == (1, 5)
    assert from_flags["thresholds"] == {
        "max_error_rate": None,
        "max_p99_ms": 5,
        "halt_on_drift": True,
        "max_failed_devices": 0,
    }
    assert from_flags["rollback_on_halt"] is False

    # One flag changes one key; the others still come from the config.
    mixed, _ = plan(configured, "--soak", "2", "--ignore-drift")
    assert [len(w) for w in mixed["waves"]] == [3, 4, 3] and mixed["soak_s"] == 2
    assert mixed["thresholds"]["max_error_rate"] == 0.2 and mixed["rollback_on_halt"] is True

    built_in, _ = plan(plain)
    assert [len(w) for w in built_in["waves"]] == [1, 9]
    assert (built_in["soak_s"], built_in["wave_timeout_s"]) == (60, 3600)
    assert built_in["thresholds"] == {
        "max_error_rate": 0.05,
        "max_p99_ms": None,
        "halt_on_drift": True,
        "max_failed_devices": 0,
    }
    assert built_in["rollback_on_halt"] is False

    for bad, key in (
        ('first = "0%"', "rollout.first"),
        ('wave_size = "many"', "rollout.wave_size"),
        ('max_error_rate = "off"', "rollout.max_error_rate"),
        ("max_error_rate = 1.5", "rollout.max_error_rate"),
        ("max_p99_ms = 0", "rollout.max_p99_ms"),
        ("soak_s = -1", "rollout.soak_s"),
        ('rollback_on_halt = "yes"', "rollout.rollback_on_halt"),
        ("lease_ttl_s = 1", "rollout.lease_ttl_s"),
        ("waves = 3", "rollout.waves"),
    ):
        broken = fleet.config.parent / "broken.toml"
        broken.write_text(base + f"\n[rollout]\n{bad}\n")
        result = run_controller(
            ["deploy", MODEL, "3", "--group", "line", "--detach", "--config", str(broken)]
        )
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert key in result.stderr, (bad, result.stderr)


def _publish_under_pty(args: list[str], timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``edge-controller ARGS`` with stderr on a pseudo-terminal (stdout a pipe);
    returns (exit code, stdout, what the terminal received)."""
    import pty
    import select
    import signal
    import subprocess
    import sys

    from tests.agent_process import REPO_ROOT

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.controller.cli", *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child's side of the terminal is closed
                break
            if not data:
                break
            received += data
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(master)
    return code, stdout, received.decode(errors="replace")


def test_publish_shows_a_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    from tests.agent_process import write_toml

    signing = make_signing_keys(tmp_path / "signing")
    config = write_toml(
        tmp_path / "controller.toml",
        {
            "store": {"dir": str(tmp_path / "store")},
            "signing": {"trust_dir": str(signing.trust_dir)},
        },
    )
    size = 48 * 1024 * 1024 + 5  # a large version: many 1 MiB chunks to count
    payload = os.urandom(size)
    dirs = {
        version: make_signed_version(
            tmp_path / f"repo-{version}",
            MODEL,
            version,
            {"model.onnx": payload, "labels.txt": b"a\nb\n"},
            signing,
            config_pbtxt=CONFIG_PBTXT,
        )
        for version in (4, 5)
    }

    def publish_args(version: int) -> list[str]:
        args = [str(dirs[version]), "--model", MODEL, "--version", str(version)]
        return ["publish", *args, "--config", str(config)]

    # Not a terminal: the one result line on stdout, nothing on stderr.
    piped = run_controller(publish_args(4))
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert piped.stdout.startswith(f"published {MODEL} version 4: 4 files + config.pbtxt, ")
    assert piped.stdout.count("\n") == 1 and "[" not in piped.stdout

    code, stdout, terminal = _publish_under_pty(publish_args(5))
    assert code == 0, terminal
    assert stdout.startswith(f"published {MODEL} version 5: 4 files + config.pbtxt, ")
    assert stdout.count("\n") == 1 and "\r" not in stdout  # the bar never goes to stdout
    full = "[" + "#" * 24 + "]"
    lines = [ln.split("\r")[-1] for ln in terminal.replace("\r\n", "\n").split("\n") if ln]
    verify_line = next(ln for ln in lines if ln.startswith("verify"))
    copy_line = next(ln for ln in lines if ln.startswith("copy"))
    assert f"{MODEL} v5 {full}" in verify_line and "100%" in verify_line, terminal
    assert "48.0 MiB / 48.0 MiB" in verify_line, verify_line
    assert f"{MODEL} v5 {full}" in copy_line and "100%" in copy_line, terminal
    assert "48.0 MiB / 48.0 MiB" in copy_line, copy_line  # + model.sig and config
    # Redrawn in place (\r), never going backwards within a phase.
    for phase in ("verify", "copy"):
        shown = [
            int(part.split("%")[0].split()[-1])
            for part in terminal.split("\r")
            if part.startswith(phase) and "%" in part
        ]
        assert shown and shown == sorted(shown) and shown[-1] == 100, (phase, shown)
    print(f"publish of 48 MiB on a terminal: {terminal.count(chr(13))} redraws")
