"""The fleet view: the latest reported state, job progress, health and drift per device.

``StatusBook`` takes the messages devices publish (validated: size, JSON,
schema for the topic, version, device named in the topic), keeps the latest of
each kind per device plus a bounded job history, and writes the whole book to
a JSON file atomically (at most every ``flush_interval_s``, and serialising
it at most 10% of the time: a big fleet's file is written less often), which
``edge-controller status`` reads. The service writes it off its event loop.

Job reports bind to envelopes (docs/fleet-protocol.md): a ``jobs`` message is
kept only if its ``envelope_sha256`` is an envelope the controller knows was
published as the deployment the message names, for that device
(:class:`~agent.controller.envelopes.PublishedEnvelopes`). Anything else (a
device rejecting bytes someone else put on its desired topic, a report with no
digest or another envelope's) is counted and listed as an *unverified message*
(per device and fleet-wide, in the status file) and never becomes the device's
job, so it cannot steer a rollout. The job inside a ``reported`` state is
checked the same way when it carries a digest (devices put only deployments
they verified there, so one without a digest, from an older agent, is kept).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from agent.controller.envelopes import PublishedEnvelopes
from agent.controller.store import StoreError, write_atomically
from agent.protocol.topics import MAX_JSON_BYTES, REPORT_SCHEMAS, SCHEMA_VERSION

log = logging.getLogger("agent.controller.status")

STATUS_SCHEMA: Final = "edge.controller_status"
JOB_HISTORY: Final = 50
UNVERIFIED_KEPT: Final = 100  # fleet-wide; and the last UNVERIFIED_PER_DEVICE per device
UNVERIFIED_PER_DEVICE: Final = 10


class StatusRejected(Exception):
    """A device message that does not fit its topic's schema (kept out of the book)."""


def validate_report(device: str, kind: str, payload: bytes) -> dict[str, Any] | None:
    """The message as a dict; None for an empty payload (a cleared retained message)."""
    if not payload:
        return None
    if len(payload) > MAX_JSON_BYTES:
        raise StatusRejected(f"{kind} message larger than {MAX_JSON_BYTES} bytes")
    try:
        data: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StatusRejected(f"{kind} message is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise StatusRejected(f"{kind} message is not a JSON object")
    expected = REPORT_SCHEMAS[kind]
    if data.get("schema") != expected:
        raise StatusRejected(f"{kind} message has schema {data.get('schema')!r}, not {expected!r}")
    if data.get("version") != SCHEMA_VERSION:
        raise StatusRejected(f"{kind} message has version {data.get('version')!r}")
    if "device" in data and data["device"] != device:
        raise StatusRejected(f"{kind} message names device {data['device']!r} on {device}'s topic")
    return data


class StatusBook:
    """Latest messages per device, mirrored into a JSON file."""

    def __init__(
        self,
        path: Path | None,
        flush_interval_s: float = 0.2,
        envelopes: PublishedEnvelopes | None = None,
    ) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self.envelopes = envelopes if envelopes is not None else PublishedEnvelopes()
        self.devices: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        self.unverified: list[dict[str, Any]] = []  # the latest UNVERIFIED_KEPT, oldest first
        self.unverified_count = 0
        self._dirty = False
        self._last_flush = 0.0
        self._flush_cost = 0.0  # seconds the last encode took (on the loop)

    def observe(self, device: str, kind: str, payload: bytes, now: float | None = None) -> bool:
        """Record one message; False (and logged) if it was rejected."""
        try:
            message = validate_report(device, kind, payload)
        except StatusRejected as exc:
            self.rejected += 1
            log.warning("device message rejected", extra={"device": device, "reason": str(exc)})
            return False
        received = now if now is not None else time.time()
        entry = self.devices.setdefault(device, {"device": device})
        entry["last_seen"] = received
        self._dirty = True
        if message is not None and kind in ("jobs", "reported"):
            why = self._unbound(device, kind, message)
            if why:
                self._record_unverified(device, kind, message, why, received, entry)
                if kind == "jobs":
                    return True  # seen, but it is not this device's job
                message = {**message, "job": None}
        if message is None:
            entry.pop(kind, None)
        else:
            entry[kind] = {"received_at": received, "message": message}
            if kind == "jobs":
                history = entry.setdefault("job_history", [])
                history.append(
                    {
                        key: message.get(key)
                        for key in ("deployment_id", "phase", "status", "reason_code", "ts")
                    }
                )
                del history[:-JOB_HISTORY]
        return True

    def _unbound(self, device: str, kind: str, message: Mapping[str, Any]) -> str:
        """Why a job report is not bound to an envelope published as its deployment ('': it is)."""
        job: Any = message if kind == "jobs" else message.get("job")
        if not isinstance(job, dict):
            return ""
        digest = job.get("envelope_sha256")
        if digest is None and kind == "reported":
            return ""  # an older agent: only verified deployments become its job
        named = job.get("deployment_id")
        if self.envelopes.binds(device, named, digest):
            return ""
        if not isinstance(digest, str) or not digest:
            return f"report about deployment {named!r} names no envelope digest"
        known = self.envelopes.get(digest)
        if known is None:
            return (
                f"envelope {digest[:64]!r} is not one this controller published "
                f"(report names deployment {named!r})"
            )
        if known.deployment_id != named:
            return f"envelope {digest[:16]} is deployment {known.deployment_id}, not {named!r}"
        return f"envelope {digest[:16]} (deployment {named}) is not for {device}"

    def _record_unverified(
        self,
        device: str,
        kind: str,
        message: Mapping[str, Any],
        why: str,
        received: float,
        entry: dict[str, Any],
    ) -> None:
        job: Any = message if kind == "jobs" else message.get("job")
        item = {
            "device": device,
            "received_at": received,
            "topic_kind": kind,
            "deployment_id": job.get("deployment_id"),
            "envelope_sha256": job.get("envelope_sha256"),
            "phase": job.get("phase"),
            "status": job.get("status"),
            "reason_code": job.get("reason_code"),
            "why": why,
        }
        self.unverified_count += 1
        self.unverified.append(item)
        del self.unverified[:-UNVERIFIED_KEPT]
        record = entry.setdefault("unverified", {"count": 0, "recent": []})
        record["count"] += 1
        record["recent"].append(item)
        del record["recent"][:-UNVERIFIED_PER_DEVICE]
        log.warning(
            f"unverified message received on device {device}",
            extra={"device": device, "reason": why},
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "schema": STATUS_SCHEMA,
            "version": SCHEMA_VERSION,
            "written_at": time.time(),
            "devices": self.devices,
            "unverified": {"count": self.unverified_count, "recent": self.unverified},
        }

    def flush_due(self, force: bool = False) -> bool:
        """Whether the file should be rewritten now (there is news, and it is time)."""
        if self.path is None or not self._dirty:
            return False
        spacing = max(self.flush_interval_s, 10 * self._flush_cost)
        return force or time.monotonic() - self._last_flush >= spacing

    def encode(self) -> bytes:
        """The whole book as the file's bytes; clean from here until the next message.

        Serialising is the part that runs on the controller's loop, so the spacing
        rule (at most 10% of the time) counts it, not the disk write after it.
        """
        started = time.monotonic()
        data = json.dumps(self.snapshot(), indent=1).encode() + b"\n"
        self._dirty = False
        self._last_flush = started
        self._flush_cost = time.monotonic() - started
        return data

    def write(self, data: bytes) -> None:
        """Blocking (off the loop): replace the file with ``data`` from ``encode``."""
        assert self.path is not None
        try:
            write_atomically(self.path, data)
        except StoreError as exc:
            self._dirty = True  # written again with the next flush
            log.error("cannot write the status file", extra={"reason": str(exc)})


def load_status(path: Path) -> dict[str, Any]:
    data: Any = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != STATUS_SCHEMA:
        raise ValueError(f"{path} is not a controller status file")
    return data


def _message(entry: Mapping[str, Any], kind: str) -> dict[str, Any]:
    item = entry.get(kind)
    if isinstance(item, dict) and isinstance(item.get("message"), dict):
        message: dict[str, Any] = item["message"]
        return message
    return {}


def unverified_lines(status: Mapping[str, Any]) -> list[str]:
    """For ``edge-controller status``: the unverified messages of the status file, if any."""
    record = status.get("unverified")
    if not isinstance(record, dict) or not record.get("count"):
        return []
    recent = [r for r in record.get("recent", []) if isinstance(r, dict)]
    lines = [f"{record['count']} unverified messages (reports not bound to a published envelope):"]
    for item in recent[-5:]:
        seen = item.get("received_at")
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen)) if seen else "-"
        lines.append(
            f"  unverified message received on device {item.get('device')} at {at}: "
            f"{item.get('phase')}/{item.get('status')} {item.get('reason_code') or ''} "
            f"- {item.get('why')}"
        )
    return lines
