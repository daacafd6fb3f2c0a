"""The chunk protocol of docs/fleet-protocol.md over the agent's MQTT client.

The updater's ``ChunkFetcher`` port (``agent.fleet.downloader``), implemented with
``agent.mqtt.client``; the request and answer formats are ``agent.protocol.chunks``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
from dataclasses import dataclass

from agent.fleet.downloader import (
    ArtifactNotFoundError,
    ChunkInvalidError,
    ChunkTimeoutError,
    DownloadError,
)
from agent.mqtt.client import Message, MqttClient
from agent.protocol import chunks


@dataclass(slots=True)
class _Outstanding:
    future: asyncio.Future[bytes]
    sha256: str
    offset: int
    length: int


class MqttChunkFetcher:
    """The chunk protocol of docs/fleet-protocol.md over the agent's MQTT client."""

    def __init__(
        self, client: MqttClient, prefix: str, device: str, timeout_s: float
    ) -> None:
        self.client = client
        self.device = device
        self.request_topic = f"{prefix}/artifacts/request/{device}"
        self.response_topic = f"{prefix}/devices/{device}/artifacts"
        self.timeout_s = timeout_s
        self._outstanding: dict[bytes, _Outstanding] = {}
        self.stale = 0  # answers to requests no longer outstanding (late or duplicate)
        # Correlation data: a random prefix per fetcher and a counter, unique without a
        # getrandom() call per request; an answer to an earlier fetcher never matches.
        self._correlation_prefix = secrets.token_bytes(8)
        self._requests = itertools.count()
        self._encoder = chunks.RequestEncoder(device)

    async def wait_online(self) -> None:
        await self.client.connected.wait()

    def online(self) -> bool:
        return self.client.connected.is_set()

    async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
        correlation = self._correlation_prefix + next(self._requests).to_bytes(8, "big")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._outstanding[correlation] = _Outstanding(future, sha256, offset, length)
        request = self._encoder.encode(sha256, offset, length)
        # A timer rather than asyncio.wait_for: no waiter future and callbacks per chunk.
        timer = loop.call_later(self.timeout_s, _expire, future)
        try:
            await self.client.publish(
                self.request_topic,
                request,
                qos=1,
                response_topic=self.response_topic,
                correlation_data=correlation,
                wait_ack=False,
                # The broker (and the controller) drop a request nobody waits for any more.
                expiry_s=math.ceil(self.timeout_s),
            )
            return await future
        except TimeoutError:
            raise ChunkTimeoutError(
                f"no answer for {sha256[:12]}@{offset} in {self.timeout_s}s"
            ) from None
        finally:
            timer.cancel()
            self._outstanding.pop(correlation, None)

    def handle(self, message: Message) -> None:
        """An answer on the artifacts topic (called by the updater's message loop)."""
        entry = self._outstanding.get(message.correlation_data or b"")
        if entry is None or entry.future.done():
            self.stale += 1
            return
        props = message.user_properties
        schema = props.get("schema")
        if schema == chunks.SCHEMA_CHUNK:
            problem = chunks.chunk_problem(
                props, entry.sha256, entry.offset, entry.length, len(message.payload)
            )
            if problem:
                entry.future.set_exception(ChunkInvalidError(f"chunk refused: {problem}"))
            else:
                entry.future.set_result(message.payload)
            return
        if schema == chunks.SCHEMA_CHUNK_ERROR and len(message.payload) <= chunks.MAX_JSON_BYTES:
            code, text = chunks.decode_chunk_error(message.payload)
            error: DownloadError = (
                ArtifactNotFoundError(f"controller: {text or 'artifact not found'}")
                if code == chunks.NOT_FOUND
                else ChunkInvalidError(f"controller refused the request ({code}): {text}")
            )
            entry.future.set_exception(error)
            return
        entry.future.set_exception(
            ChunkInvalidError(f"answer with unknown schema {str(schema)[:60]!r}")
        )


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
