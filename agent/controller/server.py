"""The chunk server: answers ``edge.chunk_request`` messages from the blob store.

Controllers subscribe ``$share/{group}/{prefix}/artifacts/request/+``, so the
broker hands each request to one of them and several controller processes can
serve one fleet. ``parse_chunk_request`` is pure (bytes in, request or error
out); ``ChunkServer`` finds the bytes in the store and publishes the answer,
whose payload is sent from the blob's file (``FileRegion``), not from memory.

The answer always goes to ``{prefix}/devices/{d}/artifacts`` for the device
named by the request topic (which the broker's ACL ties to the client
certificate): a response topic naming anything else is refused rather than
trusted, since the controller may publish anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from agent.common.background import BackgroundThread
from agent.common.pacing import RateLimiter
from agent.controller.store import ArtifactStore
from agent.mqtt.client import FileRegion, Message, MqttClient, MqttError
from agent.protocol.topics import (
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_JSON_BYTES,
    SCHEMA_CHUNK,
    SCHEMA_CHUNK_ERROR,
    SCHEMA_CHUNK_REQUEST,
    SCHEMA_VERSION,
    SHA256_HEX,
    artifacts_topic,
    device_of_request_topic,
    encode_json,
    request_subscription,
)

log = logging.getLogger("agent.controller.server")

REQUEST_KEYS: Final = frozenset({"schema", "version", "device", "sha256", "offset", "length"})
MAX_CORRELATION_BYTES: Final = 256
MAX_OPEN_BLOBS: Final = 64
MAX_CONCURRENT_REQUESTS: Final = 64
# A request with less time left than this is not answered: the answer would
# reach a device that has already given up on it and asked again.
SHED_BELOW_S: Final = 0.5


class ChunkRequestError(Exception):
    """A request that gets an ``edge.chunk_error`` answer."""

    def __init__(
        self, code: str, message: str, sha256: str | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sha256 = sha256
        self.offset = offset


@dataclass(frozen=True)
class ChunkRequest:
    device: str
    sha256: str
    offset: int
    length: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_chunk_request(
    topic_device: str, payload: bytes, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> ChunkRequest:
    """Validate a chunk request's payload; raise ChunkRequestError(bad_request) if it is bad."""
    if len(payload) > MAX_JSON_BYTES:
        raise ChunkRequestError("bad_request", f"request larger than {MAX_JSON_BYTES} bytes")
    try:
        data: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChunkRequestError("bad_request", "request is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ChunkRequestError("bad_request", "request is not a JSON object")
    sha = data.get("sha256")
    sha_echo = sha if isinstance(sha, str) and SHA256_HEX.match(sha) else None
    offset: Any = data.get("offset")
    offset_echo = offset if _is_int(offset) and 0 <= offset < 2**63 else None

    def bad(message: str) -> ChunkRequestError:
        return ChunkRequestError("bad_request", message, sha_echo, offset_echo)

    if data.get("schema") != SCHEMA_CHUNK_REQUEST:
        raise bad(f"schema {data.get('schema')!r} is not {SCHEMA_CHUNK_REQUEST!r}")
    if data.get("version") != SCHEMA_VERSION or not _is_int(data.get("version")):
        raise bad(f"version {data.get('version')!r} is not {SCHEMA_VERSION}")
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    missing = sorted(REQUEST_KEYS - set(data))
    if missing:
        raise bad(f"missing field {missing[0]!r}")
    if data["device"] != topic_device:
        raise bad(f"device {data['device']!r} does not match the request topic ({topic_device})")
    if sha_echo is None:
        raise bad("sha256 is not a lower-case hex SHA-256 digest")
    if offset_echo is None:
        raise bad(f"offset {offset!r} is not a non-negative integer")
    length = data["length"]
    if not _is_int(length) or length <= 0:
        raise bad(f"length {length!r} is not a positive integer")
    if length > max_chunk_bytes:
        raise bad(f"length {length} exceeds the maximum chunk size {max_chunk_bytes}")
    return ChunkRequest(topic_device, sha_echo, offset_echo, length)


def chunk_error_payload(error: ChunkRequestError) -> bytes:
    return encode_json(
        {
            "schema": SCHEMA_CHUNK_ERROR,
            "version": SCHEMA_VERSION,
            "sha256": error.sha256,
            "offset": error.offset,
            "code": error.code,
            "message": error.message,
        }
    )


@dataclass
class ServeStats:
    chunks: int = 0
    bytes: int = 0
    errors: int = 0
    dropped: int = 0  # requests that could not be answered at all (bad topic)
    shed: int = 0  # requests left unanswered because the device has stopped waiting
    inline: int = 0  # of the chunks, those answered on the MQTT network thread

    def as_dict(self) -> dict[str, int]:
        return {
            "chunks": self.chunks,
            "bytes": self.bytes,
            "errors": self.errors,
            "dropped": self.dropped,
            "shed": self.shed,
            "inline": self.inline,
        }


class _OpenBlob:
    """A stored blob's descriptor and size, closed when the last reference goes.

    Answers hold it until the broker has acknowledged them (paho may send one
    again after a reconnect), so the cache evicting it must not close it.
    """

    __slots__ = ("__weakref__", "fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size  # blobs are immutable once stored
        weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        return self.fd


def open_blob(store: ArtifactStore, sha256: str) -> _OpenBlob | None:
    """Blocking (disk): open a stored blob for serving; None if the store does not have it."""
    try:
        fd = os.open(store.blob_path(sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):  # Linux
            # Chunks are asked for in order: let the kernel read well ahead, so that
            # paho's thread, which sends them from the file, rarely waits for the disk.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        os.close(fd)
        return None
    return _OpenBlob(fd, size)


class _BlobCache:
    """Recently served blobs, open: a hit costs no system call.

    Used from the loop and from the MQTT network thread (inline answers).
    """

    def __init__(self, capacity: int = MAX_OPEN_BLOBS) -> None:
        self._capacity = capacity
        self._open: OrderedDict[str, _OpenBlob] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str) -> _OpenBlob | None:
        with self._lock:
            blob = self._open.get(sha256)
            if blob is not None:
                self._open.move_to_end(sha256)
            return blob

    def put(self, sha256: str, blob: _OpenBlob) -> None:
        with self._lock:
            self._open[sha256] = blob
            self._open.move_to_end(sha256)
            while len(self._open) > self._capacity:
                self._open.popitem(last=False)  # closes once no answer holds it

    def close(self) -> None:
        with self._lock:
            self._open.clear()


class ChunkServer:
    """Serves chunks of the store's blobs to devices over one MQTT connection."""

    def __init__(
        self,
        client: MqttClient,
        store: ArtifactStore,
        *,
        prefix: str,
        share_group: str,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_bytes_per_s: int = 0,
    ) -> None:
        self.client = client
        self.store = store
        self.prefix = prefix
        self.share_group = share_group
        self.max_chunk_bytes = max_chunk_bytes
        self.stats = ServeStats()
        self._rate = RateLimiter(max_bytes_per_s)
        # Blobs are opened on a thread of their own, not on the loop.
        self._reader = BackgroundThread("chunk-read", nice=0)
        self._blobs = _BlobCache()
        self._stats_lock = threading.Lock()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def subscription(self) -> str:
        return request_subscription(self.prefix, self.share_group)

    async def start(self) -> None:
        if self._rate.bytes_per_s <= 0:  # a send-rate cap needs the loop's timers
            self.client.take_inline(f"{self.prefix}/artifacts/request/", self.answer_inline)
        await self.client.subscribe(self.subscription, qos=1)

    def handles(self, topic: str) -> bool:
        return topic.startswith(f"{self.prefix}/artifacts/request/")

    async def dispatch(self, message: Message) -> None:
        """Answer ``message`` in a task; at most MAX_CONCURRENT_REQUESTS at once."""
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("chunk request failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reader.close()  # opens already handed over finish first
        self._blobs.close()

    def answer_inline(self, message: Message) -> bool:
        """On the MQTT network thread: answer a good request for an open blob at once.

        That is nearly every request of a download, and then the loop is not
        woken for it, nor for the broker's acknowledgement of the answer.
        Anything else is declined (False) and takes the loop's path: a blob
        to open (disk), a refusal to send, shedding, or a backlog of answers
        the broker has not acknowledged (the loop's path bounds it).
        """
        if self.client.unacknowledged() >= MAX_CONCURRENT_REQUESTS:
            return False
        device = device_of_request_topic(self.prefix, message.topic)
        if device is None or self._expired(message):
            return False
        try:
            request = self._check(message, device)
        except ChunkRequestError:
            return False
        blob = self._blobs.get(request.sha256)
        if blob is None or request.offset >= blob.size:
            return False
        region = _region(blob, request)
        try:
            self.client.publish_nowait(
                artifacts_topic(self.prefix, device),
                region,
                correlation_data=message.correlation_data,
                user_properties=_chunk_properties(request),
                expiry_s=_expiry_left(message),
            )
        except MqttError:
            return False
        self._served(region.length, inline=True)
        return True

    async def _answer(self, message: Message) -> None:
        device = device_of_request_topic(self.prefix, message.topic)
        if device is None:
            self.stats.dropped += 1
            log.warning("chunk request on a bad topic dropped", extra={"topic": message.topic})
            return
        if self._expired(message, self._rate.delay()):
            # Overload: the answer (after its turn under the send-rate limit) would
            # reach a device that has given up on it; answering only adds to the load.
            self.stats.shed += 1
            return
        reply_to = artifacts_topic(self.prefix, device)
        try:
            request = self._check(message, device)
            region = await self._locate(request)
        except ChunkRequestError as error:
            self.stats.errors += 1
            log.warning(
                "chunk request refused",
                extra={"device": device, "code": error.code, "reason": error.message},
            )
            await self._send(
                reply_to,
                chunk_error_payload(error),
                message.correlation_data,
                {"schema": SCHEMA_CHUNK_ERROR, "version": str(SCHEMA_VERSION)},
                _expiry_left(message),
            )
            return
        await self._rate.take(region.length)
        await self._send(
            reply_to,
            region,
            message.correlation_data,
            _chunk_properties(request),
            _expiry_left(message),
        )
        self._served(region.length)

    def _check(self, message: Message, device: str) -> ChunkRequest:
        """Pure: the request ``message`` carries from ``device``, or ChunkRequestError."""
        reply_to = artifacts_topic(self.prefix, device)
        if message.response_topic != reply_to:
            raise ChunkRequestError(
                "bad_request",
                f"response topic {message.response_topic!r} is not {reply_to!r}",
            )
        correlation = message.correlation_data
        if not correlation or len(correlation) > MAX_CORRELATION_BYTES:
            raise ChunkRequestError(
                "bad_request", f"correlation data missing or over {MAX_CORRELATION_BYTES} bytes"
            )
        return parse_chunk_request(device, message.payload, self.max_chunk_bytes)

    @staticmethod
    def _expired(message: Message, wait_s: float = 0.0) -> bool:
        """True if an answer sent ``wait_s`` from now would come too late to be used."""
        return message.expiry_s is not None and _time_left(message) - wait_s < SHED_BELOW_S

    def _served(self, length: int, inline: bool = False) -> None:
        with self._stats_lock:  # the loop and the network thread both count
            self.stats.inline += inline
            self.stats.chunks += 1
            self.stats.bytes += length

    async def _locate(self, request: ChunkRequest) -> FileRegion:
        """Where the requested bytes are in a stored blob (the answer is sent from the file).

        A blob already open is found without a system call; opening one reads the
        disk, so that happens on the reader thread.
        """
        blob = self._blobs.get(request.sha256)
        if blob is None:
            blob = await self._reader.run(open_blob, self.store, request.sha256)
            if blob is None:
                raise ChunkRequestError(
                    "not_found", f"no artifact {request.sha256}", request.sha256, request.offset
                )
            self._blobs.put(request.sha256, blob)
        size = blob.size
        if request.offset >= size:
            raise ChunkRequestError(
                "bad_request",
                f"offset {request.offset} is at or past the end of the artifact ({size} bytes)",
                request.sha256,
                request.offset,
            )
        return _region(blob, request)

    async def _send(
        self,
        topic: str,
        payload: bytes | FileRegion,
        correlation: bytes | None,
        properties: dict[str, str],
        expiry_s: int | None,
    ) -> None:
        try:
            await self.client.publish(
                topic,
                payload,
                qos=1,
                correlation_data=correlation or None,
                user_properties=properties,
                expiry_s=expiry_s,  # the broker drops it once the device stops waiting
            )
        except MqttError as exc:
            # The device re-requests what times out; nothing else to do here.
            log.warning("chunk answer not delivered", extra={"topic": topic, "reason": str(exc)})


def _region(blob: _OpenBlob, request: ChunkRequest) -> FileRegion:
    """The requested bytes (the last chunk may be shorter); ``request.offset`` is in the blob."""
    return FileRegion(blob, request.offset, min(request.length, blob.size - request.offset))


def _chunk_properties(request: ChunkRequest) -> dict[str, str]:
    return {
        "schema": SCHEMA_CHUNK,
        "version": str(SCHEMA_VERSION),
        "sha256": request.sha256,
        "offset": str(request.offset),
    }


def _time_left(message: Message) -> float:
    """Seconds until the broker would have dropped ``message`` (it has an expiry)."""
    assert message.expiry_s is not None
    return message.expiry_s - (time.monotonic() - message.received)


def _expiry_left(message: Message) -> int | None:
    """The expiry an answer to ``message`` gets: what the request has left (None: none)."""
    return None if message.expiry_s is None else max(math.ceil(_time_left(message)), 1)


def stats_event(stats: ServeStats, started: float) -> dict[str, Any]:
    elapsed = max(time.monotonic() - started, 1e-9)
    return {**stats.as_dict(), "mib_per_s": round(stats.bytes / elapsed / 2**20, 2)}
