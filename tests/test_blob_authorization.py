"""The chunk server gives a blob only to devices a current deployment targets with it
(issue 17, item 6). Real mosquitto with TLS and the per-device ACL, real
``edge-controller serve`` processes; the targeted device downloads with the
agent's own fetcher and downloader, the others ask with an in-test client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.adapters.chunk_fetcher import MqttChunkFetcher
from agent.fleet.downloader import (
    ChunkInvalidError,
    Downloader,
    DownloadSettings,
)
from agent.mqtt.client import MqttClient
from agent.protocol.chunks import NOT_AUTHORIZED
from agent.protocol.deployment import DeploymentFile, sign_deployment
from tests.controller_process import (
    ControllerProcess,
    controller_toml,
    publish_version,
    run_controller,
)
from tests.fleet_device import (
    DeviceClient,
    device_settings,
    make_signed_version,
    make_signing_keys,
)
from tests.mqtt_broker import CONTROLLER_IDENTITY, MosquittoBroker

MODEL = "tabular_classifier"
MODEL_BYTES = 700_000 + 321
MAX_CHUNK = 64 * 1024


@pytest.fixture
def fleet(tmp_path: Path, mqtt_tls_broker: MosquittoBroker) -> dict[str, Any]:
    signing = make_signing_keys(tmp_path / "signing")
    keygen = run_controller(["keygen", "--out-dir", str(tmp_path / "deploy-keys")])
    assert keygen.returncode == 0, keygen.stderr
    store = tmp_path / "store"
    config = controller_toml(
        tmp_path / "controller.toml",
        mqtt_tls_broker,
        store,
        trust_dir=signing.trust_dir,
        deploy_key=tmp_path / "deploy-keys" / "deployment.key.pem",
        max_chunk_bytes=MAX_CHUNK,
    )
    model = os.urandom(MODEL_BYTES)
    version_dir = make_signed_version(tmp_path / "repo", MODEL, 3, {"model.onnx": model}, signing)
    published = publish_version(config, version_dir, MODEL, 3)
    assert published.returncode == 0, published.stderr
    # A controller with no deployment key (it only serves chunks), on the same store.
    keyless = controller_toml(
        tmp_path / "keyless.toml",
        mqtt_tls_broker,
        store,
        max_chunk_bytes=MAX_CHUNK,
        client_id="edge-controller-keyless",
    )
    return {
        "tmp": tmp_path,
        "broker": mqtt_tls_broker,
        "config": config,
        "keyless": keyless,
        "model": model,
        "sha": hashlib.sha256(model).hexdigest(),
    }


def _deploy(config: Path, *devices: str) -> None:
    args = ["deploy", MODEL, "3", "--config", str(config)]
    for device in devices:
        args += ["--device", device]
    result = run_controller(args)
    assert result.returncode == 0, result.stderr


async def _download(broker: MosquittoBroker, device: str, sha: str, dest: Path) -> bytes:
    """The agent's own fetcher and downloader, as the updater drives them."""
    client = MqttClient(device_settings(broker, device))
    await client.start()
    fetcher = MqttChunkFetcher(client, "edge", device, timeout_s=5.0)

    async def route() -> None:
        while True:
            message = await client.messages.get()
            if message.topic == fetcher.response_topic:
                fetcher.handle(message)

    router = asyncio.create_task(route())
    try:
        await client.wait_connected(10)
        await client.subscribe(fetcher.response_topic, qos=1)
        downloader = Downloader(
            dest.parent / "downloads",
            fetcher,
            DownloadSettings(chunk_bytes=MAX_CHUNK, window=4, retries=0),
        )
        await downloader.download([(DeploymentFile("model.onnx", sha, MODEL_BYTES), dest)])
        return dest.read_bytes()
    finally:
        router.cancel()
        await asyncio.gather(router, return_exceptions=True)
        await client.stop()


async def _refused(broker: MosquittoBroker, device: str, sha: str) -> dict[str, Any]:
    async with DeviceClient(device_settings(broker, device), device) as dev:
        answer = await dev.request(sha, 0, 1024)
    assert answer.topic == f"edge/devices/{device}/artifacts"
    assert answer.user_properties.get("schema") == "edge.chunk_error"
    error: dict[str, Any] = json.loads(answer.payload)
    return error


async def _agent_fetch(broker: MosquittoBroker, device: str, sha: str) -> str:
    """What the agent's fetcher raises for a refused request."""
    client = MqttClient(device_settings(broker, device))
    await client.start()
    fetcher = MqttChunkFetcher(client, "edge", device, timeout_s=5.0)

    async def route() -> None:
        while True:
            fetcher.handle(await client.messages.get())

    router = asyncio.create_task(route())
    try:
        await client.wait_connected(10)
        await client.subscribe(fetcher.response_topic, qos=1)
        with pytest.raises(ChunkInvalidError) as raised:
            await fetcher.fetch(sha, 0, 1024)
        return str(raised.value)
    finally:
        router.cancel()
        await asyncio.gather(router, return_exceptions=True)
        await client.stop()


async def _publish_desired(broker: MosquittoBroker, device: str, payload: bytes) -> None:
    client = MqttClient(device_settings(broker, CONTROLLER_IDENTITY, client_id="ctrl-forger"))
    await client.start()
    try:
        await client.wait_connected(10)
        await client.publish(f"edge/devices/{device}/desired", payload, qos=1, retain=True)
    finally:
        await client.stop()


def _run(coro: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_device_not_targeted_is_refused_while_the_targeted_one_downloads(
    fleet: dict[str, Any],
) -> None:
    broker: MosquittoBroker = fleet["broker"]
    sha: str = fleet["sha"]
    with ControllerProcess(fleet["config"]).wait_serving() as controller:
        # Published before any deployment names it: nobody gets it.
        assert _run(_refused(broker, "dev-a", sha))["code"] == NOT_AUTHORIZED
        _deploy(fleet["config"], "dev-a")  # serve learns it from the desired topic
        data = _run(_download(broker, "dev-a", sha, fleet["tmp"] / "dev-a" / "model.onnx"))
        assert data == fleet["model"]
        error = _run(_refused(broker, "dev-b", sha))
        assert error["code"] == NOT_AUTHORIZED and error["sha256"] == sha
        assert "dev-b" in error["message"]
        text = _run(_agent_fetch(broker, "dev-b", sha))
        assert "not_authorized" in text, text
        # A deployment for dev-b that the deployment key did not sign grants nothing.
        other = ec.generate_private_key(ec.SECP256R1())
        record = json.loads(
            next((fleet["tmp"] / "store" / "deployments").glob("*.json")).read_text()
        )
        deployment = dict(record["deployment"], devices=["dev-b"], deployment_id="forged-1")
        _run(_publish_desired(broker, "dev-b", sign_deployment(deployment, other)))
        assert _run(_refused(broker, "dev-b", sha))["code"] == NOT_AUTHORIZED
        stopped = controller.stop()
    assert stopped is not None, controller.log_text()
    assert stopped["not_authorized"] == 4, stopped
    assert stopped["errors"] == 4
    assert stopped["chunks"] == -(-MODEL_BYTES // MAX_CHUNK)


def test_a_controller_learns_grants_from_the_store_without_a_deployment_key(
    fleet: dict[str, Any],
) -> None:
    broker: MosquittoBroker = fleet["broker"]
    sha: str = fleet["sha"]
    _deploy(fleet["config"], "dev-a")  # recorded in the store before this controller starts
    with ControllerProcess(fleet["keyless"]).wait_serving() as controller:
        data = _run(_download(broker, "dev-a", sha, fleet["tmp"] / "dev-a" / "model.onnx"))
        assert data == fleet["model"]
        assert _run(_refused(broker, "dev-c", sha))["code"] == NOT_AUTHORIZED
        _deploy(fleet["config"], "dev-c")  # a later one: read from the store on sight
        data = _run(_download(broker, "dev-c", sha, fleet["tmp"] / "dev-c" / "model.onnx"))
        assert data == fleet["model"]
        stopped = controller.stop()
    assert stopped is not None, controller.log_text()
    assert stopped["not_authorized"] == 1
