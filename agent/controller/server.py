"""The chunk server: answers ``edge.chunk_request`` messages from the blob store.

Controllers subscribe ``$share/{group}/{prefix}/artifacts/request/+``, so the
broker hands each request to one of them and several controller processes can
serve one fleet. The protocol's pure parts (request parsing, answer headers,
error codes) are ``agent.protocol.chunks``, shared with the device's fetcher;
``ChunkServer`` finds the bytes in the store and publishes the answer, whose
payload is sent from the blob's file (``FileRegion``), not from memory.

A blob is served only to a device that an unexpired known deployment targets
with it (``BlobGrants``, precomputed per (device, blob) as deployments become
known, so the check on the network thread's fast path is one dict lookup);
anything else gets a ``not_authorized`` error, counted in ``ServeStats``.

The answer always goes to ``{prefix}/devices/{d}/artifacts`` for the device
named by the request topic (which the broker's ACL ties to the client
certificate): a response topic naming anything else is refused rather than
trusted, since the controller may publish anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agent.common.background import BackgroundThread
from agent.common.pacing import RateLimiter
from agent.controller.store import ArtifactStore
from agent.mqtt.client import FileRegion, Message, MqttClient, MqttError
from agent.protocol.chunks import (
    BAD_REQUEST,
    DEFAULT_MAX_CHUNK_BYTES,
    ERROR_PROPERTIES,
    NOT_AUTHORIZED,
    NOT_FOUND,
    ChunkRequest,
    ChunkRequestError,
    check_correlation,
    chunk_properties,
    encode_chunk_error,
    parse_chunk_request,
)
from agent.protocol.topics import artifacts_topic, device_of_request_topic, request_subscription

__all__ = [
    "BlobGrants",
    "ChunkRequest",
    "ChunkRequestError",
    "ChunkServer",
    "ServeStats",
    "open_blob",
    "parse_chunk_request",
    "stats_event",
]

log = logging.getLogger("agent.controller.server")

MAX_OPEN_BLOBS: Final = 64
MAX_CONCURRENT_REQUESTS: Final = 64
# A request with less time left than this is not answered: the answer would
# reach a device that has already given up on it and asked again.
SHED_BELOW_S: Final = 0.5


class BlobGrants(Protocol):
    """Which device may fetch which blob (``PublishedEnvelopes``); called on any thread."""

    def allowed(self, device: str, sha256: str) -> bool: ...


@dataclass
class ServeStats:
    chunks: int = 0
    bytes: int = 0
    errors: int = 0
    dropped: int = 0  # requests that could not be answered at all (bad topic)
    shed: int = 0  # requests left unanswered because the device has stopped waiting
    inline: int = 0  # of the chunks, those answered on the MQTT network thread
    not_authorized: int = 0  # of the errors, requests for a blob no deployment gives the device

    def as_dict(self) -> dict[str, int]:
        return {
            "chunks": self.chunks,
            "bytes": self.bytes,
            "errors": self.errors,
            "not_authorized": self.not_authorized,
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
        grants: BlobGrants,
        prefix: str,
        share_group: str,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_bytes_per_s: int = 0,
    ) -> None:
        self.client = client
        self.store = store
        self.grants = grants
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
                user_properties=chunk_properties(request.sha256, request.offset),
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
            self.stats.not_authorized += error.code == NOT_AUTHORIZED
            log.warning(
                "chunk request refused",
                extra={"device": device, "code": error.code, "reason": error.message},
            )
            await self._send(
                reply_to,
                encode_chunk_error(error),
                message.correlation_data,
                dict(ERROR_PROPERTIES),
                _expiry_left(message),
            )
            return
        await self._rate.take(region.length)
        await self._send(
            reply_to,
            region,
            message.correlation_data,
            chunk_properties(request.sha256, request.offset),
            _expiry_left(message),
        )
        self._served(region.length)

    def _check(self, message: Message, device: str) -> ChunkRequest:
        """The request ``message`` carries from ``device``, or ChunkRequestError: malformed,
        or for a blob no current deployment gives the device (refused before the store
        is looked at, so the answer does not tell whether the blob exists)."""
        reply_to = artifacts_topic(self.prefix, device)
        if message.response_topic != reply_to:
            raise ChunkRequestError(
                BAD_REQUEST,
                f"response topic {message.response_topic!r} is not {reply_to!r}",
            )
        check_correlation(message.correlation_data)
        request = parse_chunk_request(device, message.payload, self.max_chunk_bytes)
        if not self.grants.allowed(device, request.sha256):
            raise ChunkRequestError(
                NOT_AUTHORIZED,
                f"no current deployment gives {device} artifact {request.sha256}",
                request.sha256,
                request.offset,
            )
        return request

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
                    NOT_FOUND, f"no artifact {request.sha256}", request.sha256, request.offset
                )
            self._blobs.put(request.sha256, blob)
        size = blob.size
        if request.offset >= size:
            raise ChunkRequestError(
                BAD_REQUEST,
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
