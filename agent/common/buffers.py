"""Large file contents held in anonymous memory, so that letting go of them is cheap.

Freeing a bytes object of a few hundred MB hands its pages back to the kernel
(munmap) while holding the GIL, during which no request makes progress
(docs/architecture.md, "Measured costs"). That happened once per model
load, right at the switch of an update. An anonymous ``mmap`` releases the GIL
for that munmap (closed or collected), so large files are read into one.
Releasing it on the event loop would still block the loop for the syscall:
callers on the loop hand it to ``release`` on a thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from typing import Final, TypeAlias

# release() hands memory back in pieces of this size, pausing between them.
RELEASE_PIECE_BYTES: Final = 4 * 1024 * 1024
RELEASE_PAUSE_S: Final = 0.001

# Below this a plain bytes object: its free is short and it is what callers expect.
MAPPED_FROM_BYTES: Final = 8 * 1024 * 1024

# The verified contents of a file: bytes, or for a large file an anonymous mmap
# (a read-write buffer: index, slice, memoryview, hash and write it like bytes).
FileBytes: TypeAlias = bytes | mmap.mmap


def read_whole(fd: int) -> FileBytes:
    """Blocking: everything in ``fd`` from its current offset (0 for a fresh open)."""
    size = os.fstat(fd).st_size
    if size < MAPPED_FROM_BYTES:
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            return handle.readall()
    buffer = mmap.mmap(-1, size)
    try:
        with memoryview(buffer) as view:
            done = 0
            while done < size:
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    raise OSError(errno.EIO, "the file shrank while it was read")
                done += n
        if os.read(fd, 1):
            raise OSError(errno.EIO, "the file grew while it was read")
    except BaseException:
        buffer.close()
        raise
    return buffer


def release(*buffers: FileBytes | None) -> None:
    """Blocking (call it off the loop): give mapped buffers' memory back now.

    A piece at a time, with a pause between: unmapping hundreds of MB at once
    holds the process's memory map lock and interrupts every core running one
    of its threads for tens of milliseconds, so serving threads that fault in a
    page or allocate meanwhile wait that long. Any later use of the buffer
    raises ValueError. Bytes are left to the garbage collector: they are small
    (below MAPPED_FROM_BYTES) or shared.
    """
    for data in buffers:
        if not isinstance(data, mmap.mmap):
            continue
        for start in range(0, len(data) - RELEASE_PIECE_BYTES, RELEASE_PIECE_BYTES):
            data.madvise(mmap.MADV_DONTNEED, start, RELEASE_PIECE_BYTES)
            time.sleep(RELEASE_PAUSE_S)
        data.close()


def as_bytes(data: FileBytes) -> bytes:
    """For APIs that take only bytes (a copy if ``data`` is mapped)."""
    return data if isinstance(data, bytes) else bytes(data)
