"""Calls handed from other threads to one asyncio loop: run there in order, one
wake-up per burst.

A thread appends its call to a deque and wakes the loop only if no wake-up is
pending yet; the loop then runs every call queued by that time. Both inference
results (scheduler.Workers) and paho's callbacks (mqtt_client) come back this
way: a wake-up per call would cost a system call each, after which the calling
thread must win the GIL back before it can go on.

The wake-up is an eventfd the loop watches (add_reader): one write on the
calling thread, one read on the loop. call_soon_threadsafe's self-pipe costs
the loop a handle more and a failing recv per wake-up (measured in
docs/architecture.md, "Measured costs"); it is the fallback where eventfd or add_reader is
not available, or where nobody can say when the last call has been made
(``eventfd=False``: the descriptor is never closed then, so none is opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Callable
from typing import Any


class LoopCalls:
    def __init__(self, loop: asyncio.AbstractEventLoop, eventfd: bool = True) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._wake_pending = False
        self._fd = -1  # eventfd the loop reads; -1: call_soon_threadsafe
        if eventfd and hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                loop.add_reader(fd, self._on_wake)
                self._fd = fd
            except NotImplementedError:  # a loop without add_reader
                os.close(fd)

    def call(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Any thread: have ``fn(*args)`` run on the loop, after the calls made before it.

        Returns False if the loop has closed (nobody will run it).
        """
        self._calls.append((fn, args))
        if not self._wake_pending:
            self._wake_pending = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)
                return True
            try:
                self._loop.call_soon_threadsafe(self._run)
            except RuntimeError:  # the loop has closed
                return False
        return True

    def close(self) -> None:
        """On the loop's thread, once no other thread calls any more: free the eventfd."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._loop.remove_reader(fd)
            os.close(fd)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already read by an earlier wake-up
            os.eventfd_read(self._fd)
        self._run()

    def _run(self) -> None:
        # Cleared before draining: a call appended after this either runs below or
        # finds the flag clear and wakes the loop again.
        self._wake_pending = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception as error:  # as the loop does for a failing callback
                self._loop.call_exception_handler(
                    {"message": "call handed to the loop failed", "exception": error}
                )
