"""Heavy background work (hashing, validation) at a lower CPU priority than serving.

An update hashes and parses a whole model several times while the agent
serves. On a small device that competes with inference for the same cores;
run at ``nice`` +10 (Linux: per thread) the kernel gives serving threads about
ten times the CPU share when both want it, and the background work still
gets all the idle CPU.

A raised nice value cannot be lowered again without CAP_SYS_NICE, and threads
inherit it from the thread that creates them (onnxruntime's thread pools
included). So every call gets a thread of its own that ends with it: a niced
thread is never reused for anything else, in particular never for creating a
serving session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Final, TypeVar

T = TypeVar("T")

BACKGROUND_NICE: Final = 10


def _lower_priority(nice: int) -> None:
    if nice <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(current, min(current + nice, 19)))


def _start(
    fn: Callable[..., T], args: tuple[object, ...], nice: int, name: str
) -> concurrent.futures.Future[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        _lower_priority(nice)
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def call_in_background(
    fn: Callable[..., T], *args: object, nice: int = BACKGROUND_NICE, name: str = "background"
) -> T:
    """Blocking: ``fn(*args)`` on a new low-priority thread; its result or exception."""
    return _start(fn, args, nice, name).result()


async def run_in_background(
    fn: Callable[..., T], *args: object, nice: int = BACKGROUND_NICE, name: str = "background"
) -> T:
    """``fn(*args)`` on a new low-priority thread, awaited from the loop.

    Cancelling the await does not stop the call (like ``asyncio.to_thread``).
    """
    return await asyncio.wrap_future(_start(fn, args, nice, name))


class BackgroundThread:
    """One low-priority thread of its own that runs calls one after another, in order.

    For a stream of small jobs that must not overlap (a download's chunk writes
    extend one running SHA-256): a thread per call would cost a thread start per
    chunk. The thread is niced once and is never used for anything else.
    """

    def __init__(self, name: str, nice: int = BACKGROUND_NICE) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_lower_priority, initargs=(nice,)
        )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the thread, after every call submitted before it.

        Cancelling the await does not stop the call; ``close`` waits for it.
        """
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    async def close(self) -> None:
        """Wait for the calls already submitted, then end the thread."""
        await asyncio.to_thread(self._executor.shutdown, True)
