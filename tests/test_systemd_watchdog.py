"""agent.system.notify and agent.system.watchdog in this process, with real sockets and a real
event loop: the parts the subprocess tests cannot reach (a blocked event loop,
abstract socket addresses, WATCHDOG_PID for another process, no watchdog)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from agent.system.notify import Notifier
from agent.system.watchdog import Run, Watchdog, start_watchdog
from tests.systemd_support import NotifyListener


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    notify = NotifyListener()
    yield notify
    notify.close()


def test_abstract_socket_address() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier("@" + name).notify("READY=1", "STATUS=ok")
        assert sock.recv(1024) == b"READY=1\nSTATUS=ok"


def test_status_is_one_line(listener: NotifyListener) -> None:
    notifier = Notifier(str(listener.path))
    notifier.status("model x failed:\n  bad  tensor")
    listener.wait_for("STATUS=model x failed: bad tensor", timeout=5)


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.notify("READY=1")  # a no-op, no error


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 1.0),
        ("2000000", "", 1.0),
        ("2000000", "self", 1.0),
        ("2000000", "1", None),  # the watchdog is meant for another process
        ("0", None, None),
        ("", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert Notifier("/nonexistent").watchdog_interval() == expected


def test_a_blocked_event_loop_sends_no_pings(listener: NotifyListener) -> None:
    watchdog = Watchdog(Notifier(str(listener.path)), 0.05, lambda: [], 60.0, lambda: "ok")

    async def scenario() -> tuple[float, float]:
        task = asyncio.get_running_loop().create_task(watchdog.run())
        await asyncio.sleep(0.5)
        blocked_from = time.monotonic()
        time.sleep(1.0)  # the loop is stuck: nothing may ping meanwhile
        blocked_to = time.monotonic()
        await asyncio.sleep(0.5)
        task.cancel()
        return blocked_from, blocked_to

    blocked_from, blocked_to = asyncio.run(scenario())
    time.sleep(0.2)  # let the listener thread take the last datagrams
    before = listener.ping_times(end=blocked_from)
    during = listener.ping_times(blocked_from + 0.01, blocked_to - 0.01)
    after = listener.ping_times(blocked_to)
    assert len(before) >= 5 and len(after) >= 5
    assert during == []


def test_a_stalled_run_stops_pings_and_a_finished_one_resumes_them(
    listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[Run] = []
    watchdog = Watchdog(Notifier(str(listener.path)), 0.05, lambda: runs, 1.0, lambda: "fine")
    now = time.monotonic()
    watchdog.tick()
    runs.append(Run("m", "3", now - 0.5))  # running, within the limit
    watchdog.tick()
    runs.append(Run("slow", "1", now - 5.0))  # stuck
    watchdog.tick()
    watchdog.tick()  # still stuck: no ping, no second error
    runs.clear()
    watchdog.tick()
    time.sleep(0.2)
    fields = [f for _, m in listener.messages for f in m]
    assert fields == [
        "WATCHDOG=1",
        "WATCHDOG=1",
        "STATUS=inference stalled: model slow version 1 has run for 5 s (limit 1 s); "
        "watchdog pings stopped",
        "STATUS=fine",
        "WATCHDOG=1",
    ]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert (errors[0].model, errors[0].version) == ("slow", "1")  # type: ignore[attr-defined]


def test_stall_timeout_zero_never_stalls(listener: NotifyListener) -> None:
    old = [Run("m", "1", time.monotonic() - 3600)]
    watchdog = Watchdog(Notifier(str(listener.path)), 0.05, lambda: old, 0.0, lambda: "")
    watchdog.tick()
    listener.wait_for("WATCHDOG=1", timeout=5)


def test_no_watchdog_without_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, listener: NotifyListener
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    async def scenario() -> object:
        started = start_watchdog(Notifier(str(listener.path)), lambda: [], 60.0, lambda: "")
        await asyncio.sleep(0.3)
        return started

    assert asyncio.run(scenario()) is None
    assert listener.messages == []
