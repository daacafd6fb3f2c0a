"""Spacing a stream of bytes out to a rate (pure bookkeeping plus one asyncio sleep).

Used on both ends of a fleet download: a controller caps what it sends (a
shared uplink), a device caps what it asks for (its own link, or the CPU that
receiving takes from serving).
"""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """Spaces transfers so that at most ``bytes_per_s`` go through (0: no limit)."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._next_free = 0.0

    def delay(self) -> float:
        """Seconds until a transfer asked for now could start."""
        if self.bytes_per_s <= 0:
            return 0.0
        return max(self._next_free - time.monotonic(), 0.0)

    async def take(self, count: int) -> None:
        """Wait for the turn of a transfer of ``count`` bytes."""
        if self.bytes_per_s <= 0:
            return
        now = time.monotonic()
        start = max(self._next_free, now)
        self._next_free = start + count / self.bytes_per_s
        if start > now:
            await asyncio.sleep(start - now)
