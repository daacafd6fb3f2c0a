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
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from agent.common.loop_calls import LoopCalls

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

    Calls go over a SimpleQueue and results come back through ``LoopCalls`` (an
    eventfd the loop watches, one wake-up per burst): a round trip costs a
    fraction of a ThreadPoolExecutor's (its futures, their locks and a self-pipe
    write per result), which counts once per chunk of a download.
    One loop only: the one that makes the first call.
    """

    def __init__(self, name: str, nice: int = BACKGROUND_NICE) -> None:
        self._name = name
        self._nice = nice
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._results: LoopCalls | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the thread, after every call submitted before it.

        Cancelling the await does not stop the call; ``close`` waits for it.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError(f"background thread {self._name} is closed")
        if self._loop is None:
            self._loop, self._results = loop, LoopCalls(loop)
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        elif loop is not self._loop:
            raise RuntimeError(f"background thread {self._name} serves another event loop")
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((future, fn, args))
        return await future

    async def close(self) -> None:
        """Wait for the calls already submitted, then end the thread."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(thread.join)
        assert self._results is not None
        self._results.close()  # on the loop, once the thread has made its last call

    def _work(self) -> None:
        _lower_priority(self._nice)
        results = self._results
        assert results is not None
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            try:
                outcome = fn(*args)
            except BaseException as exc:  # handed to the caller, as an executor does
                results.call(_fail, future, exc)
            else:
                results.call(_succeed, future, outcome)
                del outcome
            del job, future, fn, args  # keep no chunk alive while waiting for the next


_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[object, ...]]


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
