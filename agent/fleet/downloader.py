"""Resumable, windowed, chunked download of a deployment's files.

Files are content-addressed (requested by SHA-256). Each one is assembled in
``<state>/downloads/<sha256>.part``, a file of exactly the declared size that
chunks are written into at their offsets; ``<sha256>.ranges`` records which
byte ranges are on disk *and fsynced* (the data is synced before the record
that claims it), so after a disconnect, a controller restart or an agent crash
the download continues with the ranges still missing. A finished file is
checked against its declared SHA-256 as a whole; only then is it renamed to its
destination (in the staging directory).

Chunks are written, and the SHA-256 extended over the file's contiguous
prefix, on one low-priority thread per download, never on the event loop. A
chunk that lands in order is hashed from memory as it is written; chunks that
came early are read back once the gap before them is filled. The check at the
end is then only a comparison, or the hash of a short tail. Each chunk's
writeback to disk is started as it is written (Linux), so the fsyncs that make
ranges and the finished file durable have little left to wait for.

Fetching is an interface (:class:`ChunkFetcher`); :class:`MqttChunkFetcher` is
the protocol of docs/fleet-protocol.md: a request on
``{p}/artifacts/request/{d}`` with MQTT v5 response topic and correlation data,
the answer on ``{p}/devices/{d}/artifacts``. A response is only accepted for an
outstanding request whose correlation data, digest, offset *and length* it
matches exactly, so nothing beyond the declared size is ever written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from agent.common.background import BackgroundThread, run_in_background
from agent.common.durable import fsync_dir, write_atomically
from agent.common.pacing import RateLimiter
from agent.errors import AgentError
from agent.protocol.deployment import DeploymentFile, DigestMismatchError

log = logging.getLogger("agent.fleet.download")

RANGES_SCHEMA: Final = "edge.partial_download"
CHECKPOINT_EVERY_S: Final = 0.5
CHECKPOINT_EVERY_BYTES: Final = 16 * 1024 * 1024
HASH_BLOCK: Final = 1024 * 1024
# Linux only (and not in typeshed): sync_file_range(fd, offset, count, flags).
_sync_file_range: Callable[[int, int, int, int], None] | None = getattr(
    os, "sync_file_range", None
)
_WRITE_NOW: Final = int(getattr(os, "SYNC_FILE_RANGE_WRITE", 2))


class DownloadError(AgentError):
    code = "download_failed"


class ChunkTimeoutError(DownloadError):
    """No (valid) answer in time, as many times as allowed."""

    code = "download_timed_out"


class ArtifactNotFoundError(DownloadError):
    code = "artifact_not_found"


class ChunkInvalidError(DownloadError):
    """An answer that does not match its request (size, digest, offset) or is refused."""

    code = "chunk_invalid"


class StorageError(DownloadError):
    code = "storage_failed"


class NoSpaceError(StorageError):
    """The file system of the downloads is full (ENOSPC, EDQUOT)."""


# --------------------------------------------------------------------------- byte ranges


class RangeSet:
    """A set of half-open byte ranges ``[start, end)``, kept merged and sorted."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        merged: list[tuple[int, int]] = []
        placed = False
        for a, b in self._ranges:
            if b < start:
                merged.append((a, b))
            elif end < a:
                if not placed:
                    merged.append((start, end))
                    placed = True
                merged.append((a, b))
            else:
                start, end = min(a, start), max(b, end)
        if not placed:
            merged.append((start, end))
        merged.sort()
        self._ranges = merged

    def update(self, other: RangeSet) -> None:
        for start, end in other.ranges:
            self.add(start, end)

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._ranges)

    def total(self) -> int:
        return sum(b - a for a, b in self._ranges)

    def prefix(self) -> int:
        """Where the range starting at 0 ends (0 if byte 0 is missing)."""
        return self._ranges[0][1] if self._ranges and self._ranges[0][0] == 0 else 0

    def covers(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self._ranges)

    def missing(self, size: int, chunk: int) -> list[tuple[int, int]]:
        """``(offset, length)`` requests, at most ``chunk`` long, for what ``[0, size)`` lacks."""
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for a, b in [*self._ranges, (size, size)]:
            if a > cursor:
                gaps.append((cursor, min(a, size)))
            cursor = max(cursor, b)
            if cursor >= size:
                break
        requests = []
        for start, end in gaps:
            for offset in range(start, end, chunk):
                requests.append((offset, min(chunk, end - offset)))
        return requests

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges!r})"


# --------------------------------------------------------------------------- partial files


class PartialFile:
    """``<dir>/<sha256>.part`` (the bytes) and ``<sha256>.ranges`` (what is durable)."""

    def __init__(
        self,
        directory: Path,
        artifact: DeploymentFile,
        fsync: Callable[[int], None] = os.fsync,
        max_unrecorded: int = CHECKPOINT_EVERY_BYTES,
    ) -> None:
        self.artifact = artifact
        self._fsync = fsync
        # Written bytes the record may lag behind before writers wait for it.
        self.max_unrecorded = max_unrecorded
        self.part = directory / f"{artifact.sha256}.part"
        self.ranges_path = directory / f"{artifact.sha256}.ranges"
        self.durable = RangeSet()
        self.written = RangeSet()  # includes chunks not yet fsynced
        self._fd = -1
        self._last_checkpoint = time.monotonic()
        self._checkpointing: asyncio.Lock | None = None
        # SHA-256 of bytes [0, hashed), extended by write() while the download runs,
        # so that finishing does not have to read the whole file again.
        self._digest = hashlib.sha256()
        self.hashed = 0

    def open(self) -> None:
        size = self.artifact.size
        self.durable = self._read_ranges()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.part, flags, 0o600)
        if os.fstat(self._fd).st_size != size:
            if self.durable.total():
                log.warning("partial file has the wrong size; starting over",
                            extra={"sha256": self.artifact.sha256})
            self.durable = RangeSet()
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, size)  # sparse: never more than the declared size
        self.written = RangeSet(self.durable.ranges)
        self._checkpointing = asyncio.Lock()

    def _read_ranges(self) -> RangeSet:
        try:
            data = self.ranges_path.read_bytes()
        except FileNotFoundError:
            return RangeSet()
        try:
            doc = json.loads(data)
            if (
                doc["schema"] != RANGES_SCHEMA
                or doc["sha256"] != self.artifact.sha256
                or doc["size"] != self.artifact.size
            ):
                raise ValueError("for another file")
            ranges = RangeSet(
                (int(a), int(b)) for a, b in doc["done"] if 0 <= int(a) < int(b) <= doc["size"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unusable ranges file; starting the file over",
                        extra={"path": str(self.ranges_path), "reason": str(exc)})
            return RangeSet()
        return ranges

    def missing(self, chunk: int) -> list[tuple[int, int]]:
        return self.written.missing(self.artifact.size, chunk)

    @property
    def complete(self) -> bool:
        return self.written.total() == self.artifact.size

    def write(self, offset: int, data: bytes) -> None:
        """Blocking: store a chunk and extend the running SHA-256 as far as the file is
        contiguous. Calls must not overlap (the download's writer thread makes them).

        ``written`` is changed only here; the loop reads it meanwhile, which is safe:
        ``RangeSet.add`` swaps in a new list, and a range is added only once its
        bytes are in the file, so a checkpoint's fsync covers every range it saw.
        """
        end = offset + len(data)
        if offset < 0 or end > self.artifact.size:  # never past the declared size
            raise ChunkInvalidError(f"chunk [{offset}, {end}) is outside the declared size")
        view = memoryview(data)
        position = offset
        while view:
            count = os.pwrite(self._fd, view, position)
            view = view[count:]
            position += count
        if _sync_file_range is not None:
            # Start writing the chunk to disk now, without waiting: the fsyncs of the
            # checkpoints and of finish() then find little left to write. Only a hint:
            # a write error surfaces in those fsyncs.
            with contextlib.suppress(OSError):
                _sync_file_range(self._fd, offset, end - offset, _WRITE_NOW)
        if offset == self.hashed:  # in order (the usual case): hash what is in memory
            self._digest.update(data)
            self.hashed = end
        self.written.add(offset, end)
        self.hash_prefix(self.written.prefix())  # chunks that came early, now in order

    def unrecorded(self) -> int:
        """Bytes written that the ranges record does not claim yet."""
        return self.written.total() - self.durable.total()

    async def checkpoint(self, force: bool = False) -> None:
        """fsync the data, then record the ranges that are now durable.

        Back-pressure: once ``max_unrecorded`` bytes are unrecorded, the caller waits
        for a checkpoint that covers its own write, however long the fsync takes, so
        the bytes on disk but not in the record stay under ``max_unrecorded`` plus one
        chunk per writer (the bound docs/fleet-updates.md states).
        """
        behind = self.unrecorded() >= self.max_unrecorded
        if (
            not force
            and not behind
            and time.monotonic() - self._last_checkpoint < CHECKPOINT_EVERY_S
        ):
            return
        assert self._checkpointing is not None
        if self._checkpointing.locked() and not force and not behind:
            return  # one is under way (on time alone); the next call after it catches up
        async with self._checkpointing:
            self._last_checkpoint = time.monotonic()
            snapshot = RangeSet(self.written.ranges)
            if snapshot == self.durable:
                return
            await asyncio.to_thread(self._fsync, self._fd)
            doc = {
                "schema": RANGES_SCHEMA,
                "version": 1,
                "sha256": self.artifact.sha256,
                "size": self.artifact.size,
                "done": [list(r) for r in snapshot.ranges],
            }
            data = json.dumps(doc, separators=(",", ":")).encode()
            await asyncio.to_thread(write_atomically, self.ranges_path, data)
            self.durable = snapshot

    def hash_prefix(self, upto: int) -> None:
        """Blocking: extend the running SHA-256 over ``[hashed, upto)``, bytes already written.

        Only one caller at a time (``write`` on the download's writer thread, then
        ``finish``).
        """
        while self.hashed < upto:
            block = os.pread(self._fd, min(HASH_BLOCK, upto - self.hashed), self.hashed)
            if not block:
                raise OSError(f"{self.part} is shorter than the bytes written to it")
            self._digest.update(block)
            self.hashed += len(block)  # per block: digest and position always agree

    def finish(self, destinations: Sequence[Path]) -> None:
        """Blocking: hash (the rest), fsync, move to the first destination, copy to the others."""
        self.hash_prefix(self.artifact.size)
        digest = self._digest
        if digest.hexdigest() != self.artifact.sha256:
            self.discard()
            raise DigestMismatchError(
                f"{self.artifact.path}: downloaded content has SHA-256 {digest.hexdigest()}, "
                f"the deployment declares {self.artifact.sha256}"
            )
        self._fsync(self._fd)
        self.close()
        first = destinations[0]
        first.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, first)
        fsync_dir(first.parent)
        for other in destinations[1:]:
            other.parent.mkdir(parents=True, exist_ok=True)
            copy_durably(first, other)
        self.ranges_path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.part.unlink(missing_ok=True)
        self.ranges_path.unlink(missing_ok=True)


def copy_durably(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        shutil.copyfile(source, temp, follow_symlinks=False)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def file_matches(path: Path, artifact: DeploymentFile) -> bool:
    """True if ``path`` is a regular file with the artifact's size and SHA-256."""
    try:
        with open(path, "rb", buffering=0) as handle:
            if os.fstat(handle.fileno()).st_size != artifact.size or path.is_symlink():
                return False
            digest = hashlib.sha256()
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == artifact.sha256


# --------------------------------------------------------------------------- fetching


class ChunkFetcher(Protocol):
    async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of artifact ``sha256`` from ``offset``, or raise.

        ChunkTimeoutError: no answer in time (worth retrying); ArtifactNotFoundError,
        ChunkInvalidError: the answer was a refusal or did not match the request.
        """
        ...

    async def wait_online(self) -> None:
        """Return when requests can be sent (the broker connection is up)."""
        ...

    def online(self) -> bool: ...


# --------------------------------------------------------------------------- the download


@dataclass(frozen=True, slots=True)
class DownloadSettings:
    chunk_bytes: int = 1024 * 1024  # the [fleet] defaults
    window: int = 16
    retries: int = 8  # per chunk, counted only while online
    retry_backoff_s: float = 0.2
    max_bytes_per_s: int = 0  # chunk requests are spaced to this rate (0: no cap)


ProgressCallback = Callable[[int, int], None]  # (bytes on disk, total)


class AdaptiveWindow:
    """How many chunk requests may be outstanding: halved on a timeout, regrown by one per
    window of answers (TCP's additive increase, multiplicative decrease).

    When the controllers fall behind, every device of the fleet sends less
    instead of re-requesting into queues that already make it time out.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.limit = self.size
        self.timeouts = 0
        self._in_use = 0
        self._answers = 0
        self._last_cut = -math.inf
        self._freed = asyncio.Event()

    async def acquire(self) -> float:
        """Wait for a free slot; returns when it was taken (pass it to ``release``)."""
        while self._in_use >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        self._in_use += 1
        return time.monotonic()

    def release(self, taken: float, timed_out: bool) -> None:
        self._in_use -= 1
        if timed_out:
            self.timeouts += 1
            # One cut per round trip: requests sent before the last cut that time
            # out as well say nothing new about the current window.
            if taken > self._last_cut:
                self.limit = max(1, self.limit // 2)
                self._last_cut = time.monotonic()
                self._answers = 0
        else:
            self._answers += 1
            if self._answers >= self.limit and self.limit < self.size:
                self.limit += 1
                self._answers = 0
        self._freed.set()


class Downloader:
    """Downloads a set of artifacts into their destinations, resuming from ``directory``."""

    def __init__(
        self,
        directory: Path,
        fetcher: ChunkFetcher,
        settings: DownloadSettings,
        on_progress: ProgressCallback | None = None,
        *,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.directory = directory
        self.fetcher = fetcher
        self.settings = settings
        self._fsync = fsync  # the data's fsync (tests pass a slow one)
        self.on_progress = on_progress
        self.requests = 0  # chunk requests sent (for tests and benchmarks)
        self.hashed_in_transfer = 0  # bytes hashed while the transfer still ran
        self.window = AdaptiveWindow(settings.window)
        self._pace = RateLimiter(settings.max_bytes_per_s)

    def unrecorded_bound(self) -> int:
        """The most bytes of a file that can be on disk but not in its ranges record:
        the back-pressure threshold plus one chunk per request in the window."""
        return CHECKPOINT_EVERY_BYTES + self.settings.window * self.settings.chunk_bytes

    async def download(self, targets: Sequence[tuple[DeploymentFile, Path]]) -> None:
        """Make every destination hold its artifact (verified by SHA-256)."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        by_sha: dict[str, list[tuple[DeploymentFile, Path]]] = {}
        for artifact, dest in targets:
            by_sha.setdefault(artifact.sha256, []).append((artifact, dest))
        total = sum(entries[0][0].size for entries in by_sha.values())
        partials: list[PartialFile] = []
        done_bytes = 0
        for entries in by_sha.values():
            artifact = entries[0][0]
            dests = [d for _, d in entries]
            present = await run_in_background(_present, dests, artifact, name="fleet-hash")
            if all(present):
                done_bytes += artifact.size
                continue
            if any(present):  # one copy made it before a crash: copy it to the others
                source = dests[present.index(True)]
                for dest, ok in zip(dests, present, strict=True):
                    if not ok:
                        await asyncio.to_thread(copy_durably, source, dest)
                done_bytes += artifact.size
                continue
            partial = PartialFile(self.directory, artifact, self._fsync,
                                  CHECKPOINT_EVERY_BYTES)
            try:
                await asyncio.to_thread(partial.open)
            except OSError as exc:
                raise StorageError(f"cannot open {partial.part}: {exc.strerror}") from exc
            partials.append(partial)
        try:
            self._progress(done_bytes + sum(p.written.total() for p in partials), total)
            await self._fetch_all(partials, done_bytes, total)
            self.hashed_in_transfer = sum(p.hashed for p in partials)
            for partial in partials:
                dests = [d for _, d in by_sha[partial.artifact.sha256]]
                try:
                    await run_in_background(partial.finish, dests, name="fleet-hash")
                except OSError as exc:
                    raise StorageError(f"cannot store {partial.artifact.path}: {exc}") from exc
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                # The partial files are what filled the disk: give the space back, so the
                # agent can still write its state and report the failure.
                for partial in partials:
                    await asyncio.to_thread(partial.discard)
                free = await asyncio.to_thread(_free_bytes, self.directory)
                raise NoSpaceError(
                    f"{exc}: the file system of {self.directory} is full (the download needs "
                    f"{total} bytes, {free} are free once its partial files are removed)"
                ) from cause
            raise
        finally:
            for partial in partials:
                partial.close()

    def _progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)

    async def _fetch_all(self, partials: list[PartialFile], done_bytes: int, total: int) -> None:
        queue: deque[tuple[PartialFile, int, int]] = deque(
            (p, offset, length) for p in partials for offset, length in
            p.missing(self.settings.chunk_bytes)
        )
        if not queue:
            return

        async def worker() -> None:
            while queue:
                partial, offset, length = queue.popleft()
                data = await self._fetch_with_retries(partial.artifact, offset, length)
                try:
                    await writer.run(partial.write, offset, data)
                    await partial.checkpoint()
                except OSError as exc:
                    raise StorageError(f"cannot write {partial.part}: {exc.strerror}") from exc
                self._progress(done_bytes + sum(p.written.total() for p in partials), total)

        self.window = AdaptiveWindow(min(self.settings.window, len(queue)))
        writer = BackgroundThread("fleet-write")
        workers = [asyncio.create_task(worker()) for _ in range(self.window.size)]
        fetched = False
        try:
            await _gather_or_fail(workers)
            fetched = True
        finally:
            # Writes already handed over finish (the file is closed only after them).
            await asyncio.shield(writer.close())
            for partial in partials:
                if fetched and partial.complete:
                    # finish() fsyncs and moves it next, and deletes the range record:
                    # writing one now would cost two fsyncs for nothing. (A crash in
                    # between re-requests at most the ranges not yet recorded.)
                    continue
                with contextlib.suppress(OSError):
                    await asyncio.shield(partial.checkpoint(force=True))

    async def _fetch_with_retries(
        self, artifact: DeploymentFile, offset: int, length: int
    ) -> bytes:
        failures = 0
        while True:
            await self.fetcher.wait_online()
            await self._pace.take(length)
            self.requests += 1
            taken = await self.window.acquire()
            timed_out = False
            try:
                try:
                    data = await self.fetcher.fetch(artifact.sha256, offset, length)
                except ChunkTimeoutError:
                    timed_out = self.fetcher.online()
                    raise
                finally:
                    self.window.release(taken, timed_out)
                if len(data) != length:  # whatever the fetcher: exactly what was asked
                    raise ChunkInvalidError(
                        f"{len(data)} bytes for a request of {length} ({artifact.path}@{offset})"
                    )
                return data
            except (ChunkTimeoutError, ChunkInvalidError, ArtifactNotFoundError) as exc:
                if not self.fetcher.online() and isinstance(exc, ChunkTimeoutError):
                    continue  # lost in a disconnect: does not count
                failures += 1
                if failures > self.settings.retries:
                    raise
                log.info(
                    "chunk retry",
                    extra={"path": artifact.path, "offset": offset, "attempt": failures,
                           "reason": str(exc)},
                )
                await asyncio.sleep(min(self.settings.retry_backoff_s * failures, 2.0))


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def _present(paths: Sequence[Path], artifact: DeploymentFile) -> list[bool]:
    return [file_matches(path, artifact) for path in paths]


async def _gather_or_fail(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for all; on the first failure cancel the rest and raise it."""
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
