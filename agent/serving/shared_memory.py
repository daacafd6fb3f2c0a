"""System shared memory regions (Triton's system shared memory extension).

A local client creates a POSIX shared-memory object (``shm_open``, so a file
under ``/dev/shm``), registers a window of it under a name, and then names the
region in a tensor's ``shared_memory_region`` parameter instead of sending its
bytes. Inputs are read from the mapping in place; outputs are written into it.

Every region is checked when registered: the key must name one object directly
under ``/dev/shm`` (no path, no ``..``, no symlink followed), a regular file
the agent itself can open for reading and writing (the file's permissions are
the ownership check) with no other hard link, and the window must lie inside
the object. Every use is checked against the window. Regions are unmapped when
unregistered and when the agent stops; a mapping still referenced by a request
in flight is released when that request lets go of it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import InvalidInputError, NotPermittedError

SHM_ROOT = Path("/dev/shm")
MAX_REGIONS = 256  # per agent: each holds a mapping and a file descriptor's worth of kernel state
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,200}")
_NAME_MAX = 256


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    __slots__ = ("_map", "status", "view")

    def __init__(self, status: RegionStatus, mapping: mmap.mmap) -> None:
        self.status = status
        self._map = mapping
        offset = status.offset
        self.view = memoryview(mapping)[offset : offset + status.byte_size]

    def release(self) -> None:
        # A request in flight may still read it: then it is unmapped when that lets go.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._map.close()


def _check_key(key: str) -> str:
    """The file name under /dev/shm that ``key`` (a shm_open name) denotes."""
    if not key.isascii() or _KEY.fullmatch(key) is None:
        raise InvalidInputError(
            f"shared memory key {key!r} is not a shm_open name (one component of letters, "
            "digits, '_', '.', '-', optionally after a leading '/')"
        )
    file_name = key.lstrip("/")
    if file_name in (".", "..") or file_name.startswith(".."):
        raise InvalidInputError(f"shared memory key {key!r} is not a shm_open name")
    return file_name


class SharedMemoryRegistry:
    """The regions registered with this agent. Used from the event-loop thread only."""

    def __init__(self, enabled: bool, root: Path = SHM_ROOT) -> None:
        self.enabled = enabled
        self._root = root
        self._regions: dict[str, _Region] = {}

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise NotPermittedError(
                "system shared memory is off (set server.shared_memory = \"system\" in the "
                "agent config)"
            )

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._require_enabled()
        if not name or len(name) > _NAME_MAX:
            raise InvalidInputError("a shared memory region needs a name (at most 256 characters)")
        if name in self._regions:
            raise InvalidInputError(f"shared memory region '{name}' is already registered")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidInputError(
                f"cannot register shared memory region '{name}': {MAX_REGIONS} regions are "
                "registered already (unregister some)"
            )
        if byte_size <= 0:
            raise InvalidInputError(f"shared memory region '{name}': byte_size must be > 0")
        path = self._root / _check_key(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidInputError(
                f"shared memory region '{name}': cannot open key {key!r} "
                f"({exc.strerror or exc})"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInputError(
                    f"shared memory region '{name}': key {key!r} is not a shared memory object"
                )
            if st.st_nlink != 1:  # a hard link would let a key name some other file
                raise InvalidInputError(
                    f"shared memory region '{name}': key {key!r} has {st.st_nlink} links "
                    "(a shared memory object has one)"
                )
            if offset + byte_size > st.st_size:
                raise InvalidInputError(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"is beyond the end of {key!r} ({st.st_size} bytes)"
                )
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), mapping)

    def unregister(self, name: str) -> None:
        """Unregister ``name``; an empty name unregisters every region (as Triton)."""
        self._require_enabled()
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.release()

    def status(self, name: str = "") -> list[RegionStatus]:
        self._require_enabled()
        if not name:
            return [r.status for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise InvalidInputError(f"no shared memory region '{name}' is registered")
        return [region.status]

    def _window(self, what: str, name: str, offset: int, size: int) -> memoryview:
        region = self._regions.get(name)
        if region is None:
            raise InvalidInputError(f"{what}: no shared memory region '{name}' is registered")
        total = region.status.byte_size
        if offset < 0 or size < 0 or offset + size > total:
            raise InvalidInputError(
                f"{what}: shared memory offset {offset} + byte_size {size} is outside "
                f"region '{name}' ({total} bytes)"
            )
        return region.view[offset : offset + size]

    def read(self, what: str, name: str, offset: int, size: int) -> memoryview:
        """The bytes of an input in region ``name``, in place."""
        return self._window(what, name, offset, size)

    def write(self, what: str, name: str, offset: int, size: int, data: bytes) -> None:
        """Write an output into region ``name``; it must fit the window the client gave."""
        window = self._window(what, name, offset, size)
        if len(data) > size:
            raise InvalidInputError(
                f"{what}: the output is {len(data)} bytes but shared memory byte_size is {size}"
            )
        window[: len(data)] = data

    def close(self) -> None:
        for region in self._regions.values():
            region.release()
        self._regions.clear()
