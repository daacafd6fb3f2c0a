"""In-memory implementations of the updater's ports (agent.fleet.ports).

``MemoryRig`` runs the real ``Updater`` in-process: an in-memory transport, a
controller-side simulator that answers the real chunk protocol (the requests
``MqttChunkFetcher`` sends, answered with the user properties it checks) from
blobs in memory, a model host that serves nothing but keeps the versions and
statistics the updater reads, a validator that fails chosen model bytes, and a
virtual clock whose sleep advances time at once. Files (state, staging,
repository) stay real, under a temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from agent.adapters.chunk_fetcher import MqttChunkFetcher
from agent.common.buffers import FileBytes, as_bytes
from agent.errors import AgentError
from agent.fleet.downloader import DownloadSettings
from agent.fleet.ports import Validated
from agent.fleet.settings import UpdaterSettings
from agent.fleet.state_store import StateStore
from agent.fleet.updater import Updater
from agent.mqtt.client import Message, MqttClient
from agent.protocol import chunks
from tests.fleet_harness import DEVICE, MODEL, Keys
from tests.light_host import LightHostBase, LightValidatorBase

PREFIX = "edge"


class MemoryClock:
    def __init__(self) -> None:
        self.offset = 0.0
        self.running = asyncio.Event()  # cleared: sleepers wait (time stands still)
        self.running.set()
        self.sleeping = 0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.sleeping += 1
        try:
            await self.running.wait()
        finally:
            self.sleeping -= 1
        self.offset += max(0.0, seconds)
        await asyncio.sleep(0)


class MemoryController:
    """Serves chunks from memory in answer to the device's chunk requests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.served = 0  # bytes answered
        self.open = asyncio.Event()  # cleared: requests wait (a controller that is away)
        self.open.set()

    def add_files(self, files: Mapping[str, bytes]) -> None:
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data

    async def answer(self, device: MemoryTransport, payload: bytes, response_topic: str,
                     correlation: bytes) -> None:
        await self.open.wait()
        request = chunks.parse_chunk_request(DEVICE, payload)
        data = self.blobs[request.sha256][request.offset:request.offset + request.length]
        self.served += len(data)
        device.deliver(Message(response_topic, data, correlation_data=correlation,
                               user_properties=chunks.chunk_properties(request.sha256,
                                                                       request.offset)))


class MemoryTransport:
    """The device's broker connection, in memory: what it publishes is recorded."""

    def __init__(self, controller: MemoryController) -> None:
        self.controller = controller
        self.connected = asyncio.Event()
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.published: list[tuple[str, dict[str, Any] | bytes]] = []
        self.subscriptions: list[str] = []
        self._hooks: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_connected(self, hook: Any) -> None:
        self._hooks.append(hook)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscriptions.append(topic_filter)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      response_topic: str | None = None, correlation_data: bytes | None = None,
                      user_properties: dict[str, str] | None = None, wait_ack: bool = True,
                      expiry_s: int | None = None) -> None:
        if "/artifacts/request/" in topic:
            assert response_topic is not None and correlation_data is not None
            task = asyncio.get_running_loop().create_task(
                self.controller.answer(self, payload, response_topic, correlation_data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.published.append((topic, json.loads(payload)))

    def deliver(self, message: Message) -> None:
        if message.topic in self.subscriptions:
            self.messages.put_nowait(message)

    async def start(self) -> None:
        self.connected.set()
        for hook in self._hooks:
            await hook()

    async def stop(self) -> None:
        self.connected.clear()
        for task in list(self._tasks):
            task.cancel()

    def reports(self, kind: str) -> list[dict[str, Any]]:
        topic = f"{PREFIX}/devices/{DEVICE}/{kind}"
        return [cast(dict[str, Any], p) for t, p in self.published if t == topic]


class MemoryHost(LightHostBase):
    """The model host: which versions serve, their statistics; loads nothing."""

    def __init__(self, repository: Path) -> None:
        super().__init__()
        self.repository = repository
        self.freed = 0

    def check_activation(self, name: str, version: int) -> None:
        if not (self.repository / name / str(version)).is_dir():
            raise AgentError(f"{name}/{version} is not in the repository")

    async def activate(self, name: str, version: int | None, prepared: Any = None) -> object:
        await asyncio.sleep(0)
        return await super().activate(name, version, prepared)

    def free(self, session: Any) -> None:
        if session is not None:
            self.freed += 1


class MemoryValidator(LightValidatorBase):
    mode = "memory"

    def __init__(self) -> None:
        self.bad: set[bytes] = set()  # model files that fail validation

    async def validate(self, model_name: str, config_text: str | None, model: FileBytes,
                       contents: Mapping[str, FileBytes]) -> Validated:
        await asyncio.sleep(0)
        return await super().validate(model_name, config_text, model, contents)

    def check(self, model: FileBytes) -> object:
        if bytes(as_bytes(model)) in self.bad:
            raise AgentError("the model gives wrong answers")
        return object()


def settings(root: Path, keys: Keys, **changes: Any) -> UpdaterSettings:
    values: dict[str, Any] = dict(
        device_id=DEVICE, prefix=PREFIX, state_dir=root / "state",
        repository=root / "repo", deployment_trust_dir=keys.deploy_trust_dir,
        model_trust_dir=keys.model_trust_dir,
        download=DownloadSettings(chunk_bytes=4096, window=4, retries=2, max_bytes_per_s=0),
        chunk_timeout_s=2.0, download_timeout_s=30.0, max_model_bytes=1 << 24,
        max_clock_skew_s=300.0, probation_s=5.0, probation_max_error_rate=0.2,
        probation_min_requests=5, max_start_attempts=3, keep_versions=2,
    )
    values.update(changes)
    return UpdaterSettings(**values)


class MemoryRig:
    """One device: the real updater on in-memory ports."""

    def __init__(self, root: Path, keys: Keys, **changes: Any) -> None:
        self.root = root
        self.keys = keys
        self.settings = settings(root, keys, **changes)
        self.settings.repository.mkdir(parents=True, exist_ok=True)
        self.controller = MemoryController()
        self.clock = MemoryClock()
        self.host = MemoryHost(self.settings.repository)
        self.validator = MemoryValidator()
        self.transport = MemoryTransport(self.controller)
        self.updater: Updater[Message] | None = None

    async def start(self) -> Updater[Message]:
        self.transport = MemoryTransport(self.controller)
        updater: Updater[Message] = Updater(self.settings, self.host, self.validator,
                          StateStore(self.settings.state_dir), self.clock)
        updater.prepare()
        fetcher = MqttChunkFetcher(cast(MqttClient, self.transport), PREFIX, DEVICE,
                                   self.settings.chunk_timeout_s)
        await updater.start(self.transport, fetcher)
        self.updater = updater
        return updater

    async def stop(self) -> None:
        if self.updater is not None:
            await self.updater.stop()
            self.updater = None

    def desired(self, payload: bytes) -> None:
        self.transport.deliver(Message(f"{PREFIX}/devices/{DEVICE}/desired", payload))

    def jobs(self, deployment_id: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.transport.reports("jobs")
                if deployment_id is None or m.get("deployment_id") == deployment_id]

    async def wait_job(self, deployment_id: str | None, statuses: set[str],
                       timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.jobs(deployment_id):
                if m.get("status") in statuses:
                    return m
            await asyncio.sleep(0.002)
        raise AssertionError(f"no job {deployment_id} in {statuses}: "
                             f"{[(m['phase'], m['status']) for m in self.jobs()]}")


__all__ = ["MODEL", "MemoryRig"]
