"""The durable telemetry outbox: store first, publish, delete on PUBACK.

One SQLite database in the state directory (WAL, ``synchronous=FULL``: a
message is on disk when :meth:`Outbox.put` returns). Every message gets a
``seq`` (strictly increasing for the life of the database, never reused: gaps
in what the controller receives are messages dropped here) and a random
``message_id`` (the controller drops duplicates by it: delivery is at least
once). Messages leave in ``seq`` order.

Bounds: at most ``max_messages`` rows and ``max_bytes`` of payload, none older
than ``max_age_s``. To make room the oldest are deleted; every message deleted
without having been acknowledged is counted, and the count is carried by the
next message put (its stamp's ``dropped``), with a running ``dropped_total``.

Blocking (SQLite and fsync): call it from a worker thread, not the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.telemetry.outbox")

OUTBOX_FILENAME = "telemetry-outbox.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


class OutboxError(Exception):
    """A message that can never fit, or the database cannot be used."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_messages: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError("outbox limits must be positive")


@dataclass(frozen=True, slots=True)
class Stamp:
    """What the outbox assigns to a message before it is built."""

    seq: int
    message_id: str
    ts: float
    dropped: int  # messages dropped unacknowledged since the previous one was put
    dropped_total: int  # since the outbox was created


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    message_id: str
    topic: str
    payload: bytes
    created_at: float


PayloadBuilder = Callable[[Stamp], bytes]


class Outbox:
    def __init__(
        self, path: Path, limits: OutboxLimits, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._db = self._open(path)
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        self.put_count = 0

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute("SELECT COUNT(*) FROM messages").fetchone()
        return db

    def _open(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect(path)
        except sqlite3.DatabaseError as exc:
            # A corrupt outbox must not stop the agent: keep it for inspection, start over.
            aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
            log.error(
                "telemetry outbox unreadable; moved aside, starting a new one",
                extra={"path": str(path), "moved_to": str(aside), "reason": str(exc)},
            )
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            return self._connect(path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta counters ------------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- dropping ------------------------------------------------------------------------

    def _delete_where(self, where: str, args: Sequence[object]) -> int:
        row = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages WHERE {where}",
            args,
        ).fetchone()
        n, size = int(row[0]), int(row[1])
        if n:
            self._db.execute(f"DELETE FROM messages WHERE {where}", args)
            self._count -= n
            self._bytes -= size
        return n

    def _expire(self, now: float) -> int:
        return self._delete_where("created_at < ?", (now - self.limits.max_age_s,))

    def _drop_oldest(self, n: int) -> int:
        if n <= 0:
            return 0
        return self._delete_where(
            "seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)", (n,)
        )

    def _drop_oldest_bytes(self, need: int) -> int:
        """Drop the fewest oldest messages that free at least ``need`` bytes."""
        dropped = 0
        for seq, size in self._db.execute(
            "SELECT seq, LENGTH(payload) FROM messages ORDER BY seq"
        ).fetchall():
            if need <= 0:
                break
            self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            self._count -= 1
            self._bytes -= int(size)
            need -= int(size)
            dropped += 1
        return dropped

    # -- the API ---------------------------------------------------------------------------

    def put(self, topic: str, build: PayloadBuilder) -> Entry:
        """Stamp, build and store one message (durably) before anyone publishes it."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self._clock()
                seq = self._meta("next_seq") or 1
                pending = self._meta("dropped_pending")
                total = self._meta("dropped_total")
                dropped_now = self._expire(now)
                dropped_now += self._drop_oldest(self._count - self.limits.max_messages + 1)
                message_id = str(uuid.uuid4())
                payload = b""
                for _ in range(8):  # dropping more changes the count in the payload: settle
                    stamp = Stamp(seq, message_id, now, pending + dropped_now, total + dropped_now)
                    payload = build(stamp)
                    if len(payload) > self.limits.max_bytes:
                        raise OutboxError(
                            f"telemetry message of {len(payload)} bytes exceeds the outbox "
                            f"limit of {self.limits.max_bytes} bytes"
                        )
                    need = self._bytes + len(payload) - self.limits.max_bytes
                    if need <= 0:
                        break
                    dropped_now += self._drop_oldest_bytes(need)
                db.execute(
                    "INSERT INTO messages(seq, message_id, topic, payload, created_at) "
                    "VALUES(?, ?, ?, ?, ?)",
                    (seq, message_id, topic, payload, now),
                )
                self._count += 1
                self._bytes += len(payload)
                self._set_meta("next_seq", seq + 1)
                self._set_meta("dropped_pending", 0)
                self._set_meta("dropped_total", total + dropped_now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._recount()
                raise
            self.put_count += 1
            if dropped_now:
                log.warning(
                    "telemetry outbox full: oldest messages dropped",
                    extra={"dropped": dropped_now, "dropped_total": total + dropped_now},
                )
            return Entry(seq, message_id, topic, payload, now)

    def _recount(self) -> None:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])

    def pending(self, limit: int, after_seq: int = 0) -> list[Entry]:
        """The oldest ``limit`` messages (after ``after_seq``), expired ones dropped first."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                expired = self._expire(self._clock())
                if expired:
                    self._set_meta("dropped_pending", self._meta("dropped_pending") + expired)
                    self._set_meta("dropped_total", self._meta("dropped_total") + expired)
                rows = db.execute(
                    "SELECT seq, message_id, topic, payload, created_at FROM messages "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._recount()
                raise
            if expired:
                log.warning("telemetry messages expired unsent", extra={"dropped": expired})
            return [Entry(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), float(r[4])) for r in rows]

    def ack(self, seqs: Sequence[int]) -> None:
        """The broker acknowledged these: forget them."""
        if not seqs:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for seq in seqs:
                    cur = db.execute(
                        "DELETE FROM messages WHERE seq = ? RETURNING LENGTH(payload)", (seq,)
                    ).fetchone()
                    if cur is not None:
                        self._count -= 1
                        self._bytes -= int(cur[0])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._recount()
                raise

    @property
    def count(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def dropped_total(self) -> int:
        with self._lock:
            return self._meta("dropped_total")

    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq") or 1
