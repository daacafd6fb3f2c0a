"""The durable telemetry outbox: bounds, order, drop accounting, persistence."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.telemetry.outbox import Outbox, OutboxError, OutboxLimits, Stamp


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _msg(body: str = "", pad: int = 0) -> Any:
    def build(stamp: Stamp) -> bytes:
        return json.dumps({
            "seq": stamp.seq, "message_id": stamp.message_id, "dropped": stamp.dropped,
            "dropped_total": stamp.dropped_total, "body": body, "pad": "x" * pad,
        }).encode()
    return build


def _open(path: Path, clock: Clock | None = None, /, **limits: Any) -> Outbox:
    return Outbox(path / "outbox.sqlite3", OutboxLimits(**limits), clock or Clock())


def _bodies(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in outbox.pending(1_000_000)]


def test_messages_leave_in_order_and_are_deleted_on_ack(tmp_path: Path) -> None:
    box = _open(tmp_path)
    entries = [box.put("edge/devices/d/health", _msg(str(i))) for i in range(10)]
    assert [e.seq for e in entries] == list(range(1, 11))
    assert len({e.message_id for e in entries}) == 10
    pending = box.pending(4)
    assert [e.seq for e in pending] == [1, 2, 3, 4]
    assert [json.loads(e.payload)["body"] for e in pending] == ["0", "1", "2", "3"]
    box.ack([1, 2, 3, 4])
    assert [e.seq for e in box.pending(100)] == list(range(5, 11))
    assert box.count == 6
    box.ack([7])  # out of order acks are fine; the rest still leave in order
    assert [e.seq for e in box.pending(100)] == [5, 6, 8, 9, 10]
    box.ack([7, 999])  # unknown or repeated acks change nothing
    assert box.count == 5


def test_stamp_is_inside_the_payload(tmp_path: Path) -> None:
    box = _open(tmp_path)
    entry = box.put("t", _msg("x"))
    body = json.loads(entry.payload)
    assert body["seq"] == entry.seq and body["message_id"] == entry.message_id
    assert body["dropped"] == 0 and body["dropped_total"] == 0


def test_count_bound_drops_oldest_and_reports_it_in_the_next_message(tmp_path: Path) -> None:
    box = _open(tmp_path, max_messages=5)
    for i in range(5):
        box.put("t", _msg(str(i)))
    sixth = json.loads(box.put("t", _msg("5")).payload)
    assert sixth["dropped"] == 1 and sixth["dropped_total"] == 1
    for i in range(6, 9):
        body = json.loads(box.put("t", _msg(str(i))).payload)
        assert body["dropped"] == 1
    assert body["dropped_total"] == 4
    kept = _bodies(box)
    assert [b["body"] for b in kept] == ["4", "5", "6", "7", "8"]
    assert [b["seq"] for b in kept] == [5, 6, 7, 8, 9]  # the gap 1..4 shows what was lost
    assert box.count == 5
    box.ack([5])
    body = json.loads(box.put("t", _msg("9")).payload)
    assert body["dropped"] == 0 and body["dropped_total"] == 4


def test_byte_bound_drops_enough_oldest(tmp_path: Path) -> None:
    box = _open(tmp_path, max_bytes=10_000)
    for i in range(9):
        box.put("t", _msg(str(i), pad=900))  # ~1,000 bytes each
    assert box.size_bytes < 10_000
    big = json.loads(box.put("t", _msg("big", pad=4000)).payload)
    assert big["dropped"] >= 4
    assert box.size_bytes <= 10_000
    kept = _bodies(box)
    assert kept[-1]["body"] == "big"
    assert [b["seq"] for b in kept] == sorted(b["seq"] for b in kept)
    assert kept[0]["seq"] == big["dropped"] + 1  # exactly the oldest went


def test_a_message_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    box = _open(tmp_path, max_bytes=65_536)
    box.put("t", _msg("small"))
    with pytest.raises(OutboxError, match="exceeds"):
        box.put("t", _msg("huge", pad=70_000))
    assert [b["body"] for b in _bodies(box)] == ["small"]  # nothing else disturbed
    assert box.next_seq() == 2


def test_age_bound_expires_and_counts(tmp_path: Path) -> None:
    clock = Clock()
    box = _open(tmp_path, clock, max_age_s=60.0)
    box.put("t", _msg("old"))
    clock.now += 30
    box.put("t", _msg("newer"))
    clock.now += 45  # "old" is 75 s old now, "newer" 45 s
    assert [b["body"] for b in _bodies(box)] == ["newer"]
    body = json.loads(box.put("t", _msg("next")).payload)
    assert body["dropped"] == 1 and body["dropped_total"] == 1


def test_survives_reopen_with_seq_and_drop_counters(tmp_path: Path) -> None:
    box = _open(tmp_path, max_messages=3)
    for i in range(5):
        box.put("t", _msg(str(i)))  # seqs 1 and 2 are dropped to keep 3
    box.ack([3, 4])
    box.close()
    again = _open(tmp_path, max_messages=3)
    assert [b["body"] for b in _bodies(again)] == ["4"]
    assert again.count == 1 and again.size_bytes > 0
    entry = again.put("t", _msg("5"))
    assert entry.seq == 6  # never reused, even for deleted rows
    assert again.dropped_total() == 2
    again.ack([5, 6])
    again.close()
    third = _open(tmp_path)
    assert third.count == 0
    assert third.put("t", _msg("6")).seq == 7


def _put_forever(path: str, ready: Any) -> None:
    box = Outbox(Path(path), OutboxLimits())
    i = 0
    while True:
        box.put("t", _msg(str(i)))
        i += 1
        if i == 20:
            ready.set()


def test_survives_sigkill_mid_write(tmp_path: Path) -> None:
    """Whatever put() returned for is on disk; a kill at any point leaves a usable outbox."""
    path = tmp_path / "outbox.sqlite3"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_put_forever, args=(str(path), ready))
    proc.start()
    try:
        assert ready.wait(30)
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    box = Outbox(path, OutboxLimits())
    bodies = _bodies(box)
    assert len(bodies) >= 20
    assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))
    assert box.put("t", _msg("after")).seq == len(bodies) + 1


def test_a_corrupt_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, OutboxLimits())
    assert box.count == 0
    assert box.put("t", _msg("fresh")).seq == 1
    assert list(tmp_path.glob("outbox.sqlite3.corrupt-*"))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 3000)),
            st.tuples(st.just("ack"), st.integers(1, 8)),
            st.tuples(st.just("reopen"), st.just(0)),
        ),
        max_size=40,
    ),
    st.integers(1, 8),
)
def test_model(tmp_path_factory: pytest.TempPathFactory, ops: list[Any], max_messages: int) -> None:
    """Against a simple model: bounds hold, order holds, every loss is counted."""
    directory = tmp_path_factory.mktemp("outbox")
    limits: dict[str, Any] = {"max_messages": max_messages, "max_bytes": 12_000}
    box = _open(directory, **limits)
    produced = 0
    acked: set[int] = set()
    for op, arg in ops:
        if op == "put":
            entry = box.put("t", _msg(pad=arg))
            produced += 1
            assert entry.seq == produced
        elif op == "ack":
            head = [e.seq for e in box.pending(arg)]
            box.ack(head)
            acked.update(head)
        else:
            box.close()
            box = _open(directory, **limits)
        assert box.count <= max_messages
        assert box.size_bytes <= 12_000
        seqs = [e.seq for e in box.pending(1000)]
        assert seqs == sorted(seqs)
        # Everything produced is acknowledged, still here, or counted as dropped.
        assert produced == len(acked) + len(seqs) + box.dropped_total()
    box.close()
