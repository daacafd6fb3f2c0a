"""agent.controller.status.StatusBook: when the status file is due, and a failed write."""

from __future__ import annotations

import json
from pathlib import Path

from agent.controller.status import StatusBook, load_status

REPORTED = json.dumps(
    {"schema": "edge.reported_state", "version": 1, "device": "dev-a", "online": True}
).encode()


def test_a_message_makes_the_file_due_once_and_encode_writes_what_was_seen(
    tmp_path: Path,
) -> None:
    book = StatusBook(tmp_path / "status.json", flush_interval_s=60.0)
    assert not book.flush_due(force=True)  # nothing to say yet
    assert book.observe("dev-a", "reported", REPORTED)
    assert book.flush_due()  # never written: due at once
    data = book.encode()
    assert not book.flush_due(force=True)  # clean until the next message
    book.write(data)
    status = load_status(tmp_path / "status.json")
    assert status["devices"]["dev-a"]["reported"]["message"]["online"] is True

    assert book.observe("dev-a", "reported", REPORTED)
    assert not book.flush_due()  # within flush_interval_s of the last encode
    assert book.flush_due(force=True)


def test_a_failed_write_leaves_the_book_due_again(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    book = StatusBook(blocker / "status.json", flush_interval_s=0.0)
    assert book.observe("dev-a", "reported", REPORTED)
    data = book.encode()
    assert not book.flush_due(force=True)
    book.write(data)  # logged, not raised: the controller keeps serving
    assert book.flush_due(force=True)  # dirty again: the next flush writes it
    assert not (blocker / "status.json").exists()


def test_a_book_without_a_file_is_never_due() -> None:
    book = StatusBook(None)
    assert book.observe("dev-a", "reported", REPORTED)
    assert not book.flush_due(force=True)
