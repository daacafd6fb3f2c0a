"""glibc malloc tuning for a process that churns through large buffers (the chunk server).

Python hands every allocation over 512 bytes to the C allocator. glibc serves a
large one from a fresh mmap() until a first free raises its threshold, and gives
the top of a heap back to the kernel whenever more than twice that threshold is
free there. A chunk server allocates and frees a few buffers of one chunk each
per request (the read, paho's outgoing packet), so with the defaults most chunks
fault in fresh zeroed pages again: in a perf profile of ``edge-controller serve``
during 1 MiB-chunk downloads, page faults, page clearing and their cgroup
accounting were about a third of its CPU. Fixed thresholds above the chunk size
keep those buffers in the heap for reuse, at the cost of up to ``TRIM_BYTES`` of
freed memory that stays resident per heap.

The device agent does not call this: its downloads showed no such cost, and its
idle memory is budgeted.
"""

from __future__ import annotations

import ctypes
from typing import Final

# mallopt() parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD: Final = -1
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3

MMAP_MAX_BYTES: Final = 32 * 2**20  # glibc's ceiling for the mmap threshold on 64-bit
TRIM_BYTES: Final = 64 * 2**20
TOP_PAD_BYTES: Final = 16 * 2**20


def keep_large_buffers(largest_buffer_bytes: int) -> bool:
    """Serve buffers up to about ``largest_buffer_bytes`` from the heap and keep freed ones.

    Returns False, changing nothing, where the C library has no glibc-style
    ``mallopt`` (musl accepts and ignores it; macOS has none).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Room for a chunk plus its MQTT header and a second one being copied.
    mmap_threshold = min(MMAP_MAX_BYTES, max(4 * 2**20, 2 * largest_buffer_bytes + 2**16))
    settings = (
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, TRIM_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
