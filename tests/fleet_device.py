"""A device-side MQTT client for tests and benchmarks (no agent, just the wire protocol).

``DeviceClient`` connects as one device (its client certificate on a TLS
broker), sends ``edge.chunk_request`` messages (encoded and checked by
``agent.protocol.chunks``) with MQTT v5 response topic + correlation data and
matches the answers; ``download`` pulls a whole blob with
a window of requests in flight, re-requesting what times out.

Also ``make_signed_version``: a signed version directory in Triton's layout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.mqtt.client import Message, MqttClient, MqttSettings
from agent.protocol import chunks
from agent.signing import keys
from agent.signing.version_dir import sign_version
from tests.mqtt_broker import MosquittoBroker


def device_settings(broker: MosquittoBroker, identity: str, **overrides: Any) -> MqttSettings:
    """MQTT settings for ``identity`` on ``broker`` (its client certificate if TLS)."""
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": identity,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    if broker.tls is not None:
        cert = broker.tls.client(identity)
        values |= {
            "tls_ca": str(broker.tls.ca_cert),
            "tls_cert": str(cert.cert),
            "tls_key": str(cert.key),
        }
    values |= overrides
    return MqttSettings(**values)


def chunk_request(device: str, sha256: str, offset: int, length: int) -> bytes:
    """A well-formed request, encoded as the agent encodes it (agent.protocol.chunks)."""
    return chunks.RequestEncoder(device).encode(sha256, offset, length)


@dataclass
class DownloadStats:
    requests: int = 0
    retries: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


class DeviceClient:
    """One device's MQTT connection with request/response matching."""

    def __init__(self, settings: MqttSettings, device: str, prefix: str = "edge") -> None:
        self.device = device
        self.prefix = prefix
        self.client = MqttClient(settings)
        self.reply_topic = f"{prefix}/devices/{device}/artifacts"
        self.request_topic = f"{prefix}/artifacts/request/{device}"
        self._waiting: dict[bytes, asyncio.Future[Message]] = {}
        self.unmatched: list[Message] = []  # answers nobody waited for (late or stray)
        self.other: asyncio.Queue[Message] = asyncio.Queue()  # anything not an answer
        self._reader: asyncio.Task[None] | None = None
        self._counter = 0

    async def start(self, timeout: float = 10.0, subscribe_artifacts: bool = True) -> None:
        await self.client.start()
        await self.client.wait_connected(timeout)
        self._reader = asyncio.create_task(self._read())
        if subscribe_artifacts:
            await self.client.subscribe(self.reply_topic, qos=1)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.stop()

    async def __aenter__(self) -> DeviceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read(self) -> None:
        while True:
            message = await self.client.messages.get()
            if message.topic == self.reply_topic and message.correlation_data is not None:
                future = self._waiting.pop(message.correlation_data, None)
                if future is not None and not future.done():
                    future.set_result(message)
                    continue
                if future is None:
                    self.unmatched.append(message)
                    continue
            await self.other.put(message)

    def new_correlation(self) -> bytes:
        self._counter += 1
        return f"{self.device}-{self._counter}-{os.urandom(4).hex()}".encode()

    def expect(self, correlation: bytes) -> asyncio.Future[Message]:
        """The future of the answer carrying ``correlation`` (sent by someone else)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        return future

    async def send_raw(
        self,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        response_topic: str | None = "",
        topic: str | None = None,
    ) -> asyncio.Future[Message] | None:
        """Publish a request as given; returns the future of its answer (if it has a
        correlation id). ``response_topic=""`` means the proper one, None none at all."""
        future: asyncio.Future[Message] | None = None
        if correlation is not None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[correlation] = future
        await self.client.publish(
            topic or self.request_topic,
            payload,
            qos=1,
            response_topic=self.reply_topic if response_topic == "" else response_topic,
            correlation_data=correlation,
        )
        return future

    async def request(
        self, sha256: str, offset: int, length: int, timeout: float = 10.0
    ) -> Message:
        correlation = self.new_correlation()
        future = await self.send_raw(
            chunk_request(self.device, sha256, offset, length), correlation=correlation
        )
        assert future is not None
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(correlation, None)

    async def download(
        self,
        sha256: str,
        size: int,
        *,
        chunk: int = 256 * 1024,
        window: int = 8,
        request_timeout: float = 5.0,
        deadline_s: float = 120.0,
        max_retries: int = 1000,
        stats: DownloadStats | None = None,
    ) -> bytes:
        """Pull the whole blob: ``window`` requests in flight, timed-out ones re-requested."""
        stats = stats if stats is not None else DownloadStats()
        buffer = bytearray(size)
        pending = list(range(0, size, chunk))
        pending.reverse()
        inflight: dict[asyncio.Future[Message], tuple[int, bytes, float]] = {}
        deadline = time.monotonic() + deadline_s
        while pending or inflight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"download of {sha256} not done in {deadline_s}s")
            while pending and len(inflight) < window:
                offset = pending.pop()
                correlation = self.new_correlation()
                future = await self.send_raw(
                    chunk_request(self.device, sha256, offset, min(chunk, size - offset)),
                    correlation=correlation,
                )
                assert future is not None
                inflight[future] = (offset, correlation, time.monotonic())
                stats.requests += 1
            done, _ = await asyncio.wait(
                inflight, timeout=0.25, return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                offset, correlation, _ = inflight.pop(future)
                message = future.result()
                if message.user_properties.get("schema") != chunks.SCHEMA_CHUNK:
                    stats.errors.append(json.loads(message.payload))
                    raise RuntimeError(f"chunk error at {offset}: {message.payload!r}")
                expected = min(chunk, size - offset)
                problem = chunks.chunk_problem(
                    message.user_properties, sha256, offset, expected, len(message.payload)
                )
                if problem:
                    raise RuntimeError(problem)
                buffer[offset : offset + expected] = message.payload
            now = time.monotonic()
            for future, (offset, correlation, sent) in list(inflight.items()):
                if now - sent > request_timeout:
                    del inflight[future]
                    self._waiting.pop(correlation, None)
                    future.cancel()
                    pending.append(offset)
                    stats.retries += 1
                    if stats.retries > max_retries:
                        raise RuntimeError(f"more than {max_retries} re-requests")
        data = bytes(buffer)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError("downloaded bytes do not match the digest")
        return data


# --------------------------------------------------------------------------- signed versions


@dataclass(frozen=True)
class SigningKeys:
    private_key: Path
    public_key: Path
    trust_dir: Path


def make_signing_keys(directory: Path, name: str = "model-signing") -> SigningKeys:
    pair = keys.write_key_pair(directory / "keys", name)
    trust = directory / "trusted"
    trust.mkdir(parents=True, exist_ok=True)
    (trust / pair.public_key.name).write_bytes(pair.public_key.read_bytes())
    return SigningKeys(pair.private_key, pair.public_key, trust)


def make_signed_version(
    repo: Path,
    model: str,
    version: int,
    files: dict[str, bytes],
    signing: SigningKeys,
    config_pbtxt: bytes | None = None,
) -> Path:
    """``repo/model/version/`` with ``files``, signed; ``repo/model/config.pbtxt`` if given."""
    version_dir = repo / model / str(version)
    version_dir.mkdir(parents=True)
    for rel, data in files.items():
        path = version_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if config_pbtxt is not None:
        (repo / model / "config.pbtxt").write_bytes(config_pbtxt)
    sign_version(version_dir, keys.load_private_key(signing.private_key))
    return version_dir
