"""Helpers for the fleet update tests: signed model versions, keys, an in-test controller.

Never imports ``agent.wire`` (directly or through agent modules that do), so a
test using it can also use tritonclient; the agent runs as a subprocess.

``TestController`` is a real MQTT client (agent.mqtt.client on its own event
loop thread) acting as the fleet controller: it publishes signed deployments,
answers chunk requests from an in-memory blob table (with knobs to delay,
corrupt or stretch answers) and records everything devices report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric import ec
from onnx import TensorProto, helper, numpy_helper

from agent.mqtt.client import Message, MqttClient, MqttSettings
from agent.protocol import chunks
from agent.protocol.deployment import sign_deployment
from agent.signing.keys import private_key_pem, public_key_pem
from agent.signing.version_dir import sign_version
from tests.agent_process import write_toml

MODEL = "m"
DEVICE = "dev-1"
CONFIG_PBTXT = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
"""


# A config that declares batches of up to 4: with ``batch_one_only`` models, a request
# of two rows then fails although each row runs alone, which is the model's fault
# (it counts for probation). Without batching declared, the same failure could be
# the request's content and counts for nobody.
BATCHING_CONFIG_PBTXT = (
    CONFIG_PBTXT.replace("max_batch_size: 0", "max_batch_size: 4").replace("[ -1, 4 ]", "[ 4 ]")
)


# --------------------------------------------------------------------------- models


def scale_model(k: float, batch_one_only: bool = False, padding: int = 0) -> bytes:
    """``x`` FP32 [b, 4] -> ``y`` = k * x. ``batch_one_only``: fails at run time if b != 1.

    ``padding`` adds an unused initializer of that many bytes (bigger downloads).
    """
    nodes = [helper.make_node("Mul", ["x", "k"], ["y" if not batch_one_only else "kx"])]
    inits = [numpy_helper.from_array(np.array(k, np.float32), "k")]
    if batch_one_only:
        # y = kx + 0 * reshape(kx, [1, 4]): the reshape fails unless b == 1, and the
        # output keeps its batch dimension (a model that declares batching may say so).
        nodes += [
            helper.make_node("Reshape", ["kx", "shape"], ["one"]),
            helper.make_node("Mul", ["one", "zero"], ["nothing"]),
            helper.make_node("Add", ["kx", "nothing"], ["y"]),
        ]
        inits += [
            numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
    if padding:
        pad = np.frombuffer(np.random.default_rng(int(k * 1000)).bytes(padding), np.uint8)
        inits.append(numpy_helper.from_array(pad, "padding"))
    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class Keys:
    model: ec.EllipticCurvePrivateKey
    deploy: ec.EllipticCurvePrivateKey
    model_trust_dir: Path
    deploy_trust_dir: Path

    @classmethod
    def create(cls, root: Path) -> Keys:
        keys = cls(
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
            root / "model-trust",
            root / "deploy-trust",
        )
        keys.model_trust_dir.mkdir(parents=True)
        keys.deploy_trust_dir.mkdir(parents=True)
        (keys.model_trust_dir / "model.pub.pem").write_bytes(
            public_key_pem(keys.model.public_key())
        )
        (keys.deploy_trust_dir / "deploy.pub.pem").write_bytes(
            public_key_pem(keys.deploy.public_key())
        )
        (root / "deploy.key.pem").write_bytes(private_key_pem(keys.deploy))
        return keys


def write_version(
    directory: Path,
    k: float,
    key: ec.EllipticCurvePrivateKey,
    *,
    vectors: bool = True,
    wrong_vectors: bool = False,
    batch_one_only: bool = False,
    padding: int = 0,
    model: str = MODEL,
) -> Path:
    """A signed version directory of the scale model (with validation vectors), signed
    as ``model`` / the directory's name (identity.json)."""
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(scale_model(k, batch_one_only, padding))
    if vectors:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        expected = x * (k + (1.0 if wrong_vectors else 0.0))
        np.savez(directory / "validation.npz", in__x=x, out__y=expected)
        (directory / "validation.json").write_text(
            json.dumps({"schema": "edge.validation", "version": 1, "rtol": 1e-6, "atol": 1e-6})
        )
    sign_version(directory, key, model_name=model)
    return directory


def version_files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def deployment_doc(
    files: Mapping[str, bytes],
    version: int,
    sequence: int,
    *,
    device: str = DEVICE,
    config: bytes | None = None,
    probation_s: float = 0.5,
    now: float | None = None,
    **changes: Any,
) -> dict[str, Any]:
    issued = int(now if now is not None else time.time())
    doc: dict[str, Any] = {
        "schema": "edge.deployment",
        "version": 1,
        "deployment_id": f"d-{sequence}-{secrets.token_hex(3)}",
        "sequence": sequence,
        "devices": [device],
        "issued_at": issued - 5,
        "expires_at": issued + 3600,
        "model": {
            "name": MODEL,
            "version": version,
            "files": [
                {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                for path, data in sorted(files.items())
            ],
        },
        "allow_downgrade": False,
        "probation_s": probation_s,
    }
    if config is not None:
        doc["model"]["config"] = {"sha256": hashlib.sha256(config).hexdigest(),
                                  "size": len(config)}
    doc.update(changes)
    return doc


# --------------------------------------------------------------------------- agent config


def agent_config(
    tmp: Path,
    broker_port: int,
    keys: Keys,
    repository: Path,
    state: Path,
    **fleet: Any,
) -> Path:
    fleet_section: dict[str, Any] = {
        "deployment_trust_dir": str(keys.deploy_trust_dir),
        "chunk_bytes": 4096,
        "window": 4,
        "chunk_timeout_s": 1.0,
        "chunk_retries": 3,
        "probation_s": 0.5,
        "probation_min_requests": 4,
        "probation_max_error_rate": 0.25,
    }
    fleet_section.update(fleet)
    return write_toml(
        tmp / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0", "drain_timeout_s": 2.0},
            "repository": {"path": str(repository)},
            "signing": {"trust_dir": str(keys.model_trust_dir)},
            "state": {"dir": str(state)},
            "mqtt": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker_port,
                "device_id": DEVICE,
                "keepalive_s": 5,
                "reconnect_max_s": 1.0,
            },
            "fleet": fleet_section,
        },
    )


# --------------------------------------------------------------------------- controller


@dataclass
class ChunkPolicy:
    """Knobs for how the in-test controller answers chunk requests."""

    delay_s: float = 0.0
    extra_bytes: int = 0  # answer with more bytes than requested ("endless data")
    silent: bool = False  # answer nothing
    replace: dict[str, bytes] = field(default_factory=dict)  # sha -> other content


class TestController:
    """A controller on its own event loop thread (see the module docstring)."""

    __test__ = False  # not a pytest class

    def __init__(self, port: int, prefix: str = "edge") -> None:
        self.prefix = prefix
        self.blobs: dict[str, bytes] = {}
        self.policy = ChunkPolicy()
        self.requests = 0
        self.answered = 0
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = MqttClient(
            MqttSettings(
                port=port,
                client_id=f"test-controller-{secrets.token_hex(4)}",
                clean_start=True,
                session_expiry_s=0,
                reconnect_max_s=1.0,
                max_inflight=1000,
            )
        )
        self._tasks: set[asyncio.Future[Any]] = set()
        self._call(self._start())

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        for kind in ("jobs", "reported", "errors"):
            await self.client.subscribe(f"{self.prefix}/devices/+/{kind}", qos=1)
        await self.client.subscribe(f"{self.prefix}/artifacts/request/+", qos=1)
        await self.client.start()
        await self.client.wait_connected(10)
        self._pump = asyncio.ensure_future(self._receive())

    async def _receive(self) -> None:
        while True:
            message = await self.client.messages.get()
            if message.topic.startswith(f"{self.prefix}/artifacts/request/"):
                task = asyncio.ensure_future(self._answer(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                continue
            try:
                payload = json.loads(message.payload) if message.payload else {}
            except ValueError:
                payload = {"unparsable": True}
            with self._lock:
                self.reports.append((message.topic, payload))

    async def _answer(self, message: Message) -> None:
        """Answer one chunk request the way the controller does (agent.protocol.chunks),
        bent by ``self.policy``."""
        self.requests += 1
        policy = self.policy
        if policy.silent or message.response_topic is None:
            return
        device = message.topic.rsplit("/", 1)[-1]
        try:
            chunks.check_correlation(message.correlation_data)
            request = chunks.parse_chunk_request(device, message.payload)
        except chunks.ChunkRequestError as exc:
            await self._refuse(message, exc)
            return
        if policy.delay_s:
            await asyncio.sleep(policy.delay_s)
        sha, offset, length = request.sha256, request.offset, request.length
        blob = policy.replace.get(sha, self.blobs.get(sha))
        if blob is None:
            await self._refuse(
                message, chunks.ChunkRequestError(chunks.NOT_FOUND, "no such blob", sha, offset)
            )
            return
        data = blob[offset : offset + length + policy.extra_bytes]
        await self.client.publish(
            message.response_topic, data, qos=1, correlation_data=message.correlation_data,
            user_properties=chunks.chunk_properties(sha, offset), wait_ack=False,
        )
        self.answered += 1

    async def _refuse(self, message: Message, error: chunks.ChunkRequestError) -> None:
        assert message.response_topic is not None
        await self.client.publish(
            message.response_topic, chunks.encode_chunk_error(error), qos=1,
            correlation_data=message.correlation_data,
            user_properties=dict(chunks.ERROR_PROPERTIES), wait_ack=False,
        )

    # -- test API (any thread) -----------------------------------------------

    def add_files(self, files: Mapping[str, bytes]) -> None:
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data

    def publish_desired(self, payload: bytes, device: str = DEVICE) -> None:
        self._call(self.client.publish(f"{self.prefix}/devices/{device}/desired", payload,
                                       qos=1, retain=True))

    def deploy(self, doc: Mapping[str, Any], key: ec.EllipticCurvePrivateKey,
               device: str = DEVICE) -> dict[str, Any]:
        self.publish_desired(sign_deployment(doc, key), device)
        return dict(doc)

    def messages(self, kind: str, device: str = DEVICE) -> list[dict[str, Any]]:
        topic = f"{self.prefix}/devices/{device}/{kind}"
        with self._lock:
            return [payload for t, payload in self.reports if t == topic]

    def jobs_for(self, deployment_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages("jobs") if m.get("deployment_id") == deployment_id]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; jobs seen: "
                             + json.dumps([(m.get("deployment_id"), m.get("phase"),
                                            m.get("status"), m.get("reason_code"))
                                           for m in self.messages("jobs")][-12:]))

    def wait_job(self, deployment_id: str, statuses: set[str], timeout: float = 20.0
                 ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for message in self.jobs_for(deployment_id):
                if message.get("status") in statuses:
                    return message
            return None

        result: dict[str, Any] = self.wait_for(
            found, timeout, f"job {deployment_id} status in {sorted(statuses)}"
        )
        return result

    def stop(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._call(self._stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _stop(self) -> None:
        self._pump.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.client.stop()


TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED"}


def phases(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["phase"], m["status"]) for m in messages]


def repository_problems(repository: Path, verify: Callable[[Path], Any]) -> list[str]:
    """Anything in the repository that is not a complete, verifying version directory."""
    problems = []
    # The agent may remove an old version (one atomic rename out of the repository)
    # between this listing and any later look at the entry: gone is fine, only a
    # stray or partial entry that is still there is a problem.
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        for entry in sorted(model.iterdir()):
            if entry.name == "config.pbtxt":
                continue
            if not entry.is_dir() or not entry.name.isdigit():
                if entry.exists() or entry.is_symlink():
                    problems.append(f"unexpected entry {entry}")
                continue
            try:
                verify(entry)
            except Exception as exc:
                if entry.exists():
                    problems.append(f"{entry}: {exc}")
    return problems


def iter_files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())
