"""The fleet at a glance: device rows, groups and the status table (pure: no I/O).

Input is the status book's per-device entries (``StatusBook.devices``: the
latest ``reported``, ``jobs``, ``health`` and ``drift`` message of each device
with the time it arrived); output is one :class:`DeviceRow` per device, a text
table for ``edge-controller status`` / ``watch``, the same as JSON, and the
:class:`~agent.controller.rollout.DeviceObservation` a rollout judges a device by.

Groups come from the controller config: ``[groups] name = ["dev-001", "edge-*",
"tag:line-3"]`` (device ids, shell-style patterns matched against the devices
known from their reports, and ``tag:<tag>``: the known devices whose latest
reported state carries that tag). A device reporting tags is also in the group
``tag:<tag>`` of each, declared or not. Tags that break the rule of
:mod:`agent.protocol.tags` are ignored.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from agent.controller.rollout import DeviceObservation
from agent.protocol.tags import reported_tags

PATTERN_CHARS: Final = frozenset("*?[")
TAG_PREFIX: Final = "tag:"


def _message(entry: Mapping[str, Any], kind: str) -> dict[str, Any]:
    item = entry.get(kind)
    if isinstance(item, dict) and isinstance(item.get("message"), dict):
        message: dict[str, Any] = item["message"]
        return message
    return {}


def _received(entry: Mapping[str, Any], kind: str) -> float | None:
    item = entry.get(kind)
    if isinstance(item, dict) and isinstance(item.get("received_at"), int | float):
        return float(item["received_at"])
    return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- groups


def device_tags(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The valid tags of the device's latest reported state."""
    return reported_tags(_message(entry, "reported").get("tags"))


def _member(device: str, tags: Sequence[str], member: str) -> bool:
    if member.startswith(TAG_PREFIX):
        return member[len(TAG_PREFIX) :] in tags
    if PATTERN_CHARS & set(member):
        return fnmatch.fnmatchcase(device, member)
    return device == member


def resolve_group(
    name: str,
    groups: Mapping[str, Sequence[str]],
    known: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """The group's devices, sorted: declared ids, pattern matches among ``known``
    devices, and (``tag:<t>`` members) the known devices reporting tag ``t``; a
    group named ``tag:<t>`` is that tag's devices, declared or not.

    Raises KeyError for a group that is neither declared nor a tag group.
    """
    members: Sequence[str]
    if name in groups:
        members = groups[name]
    elif name.startswith(TAG_PREFIX):
        members = (name,)
    else:
        raise KeyError(name)
    found = {m for m in members if not m.startswith(TAG_PREFIX) and not PATTERN_CHARS & set(m)}
    if any(m.startswith(TAG_PREFIX) or PATTERN_CHARS & set(m) for m in members):
        for device, entry in known.items():
            tags = device_tags(entry)
            if any(_member(device, tags, m) for m in members):
                found.add(device)
    return sorted(found)


def groups_of(
    device: str, entry: Mapping[str, Any], groups: Mapping[str, Sequence[str]]
) -> list[str]:
    tags = device_tags(entry)
    names = [
        name for name, members in groups.items() if any(_member(device, tags, m) for m in members)
    ]
    # Declared group names cannot contain ':', so the tag groups never collide.
    return sorted(names) + [f"{TAG_PREFIX}{t}" for t in tags]


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class ModelHealth:
    version: str
    active: bool
    error_rate: float | None  # over the last health interval (None: no requests)
    p99_ms: float | None
    requests: int  # in the last interval


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool | None
    since: float | None  # online/offline since (the device's own clock)
    last_seen: float | None
    active: dict[str, int | None]  # model -> active version
    job: dict[str, Any]  # deployment_id, model, model_version, phase, status, reason_code, message
    job_progress: float | None  # 0..1 while Downloading
    cpu_percent: float | None
    health_at: float | None
    models: dict[str, list[ModelHealth]] = field(default_factory=dict)
    drift: dict[str, str] = field(default_factory=dict)  # "model:version" -> status
    groups: list[str] = field(default_factory=list)
    tags: tuple[str, ...] = ()  # from the latest reported state

    @property
    def drift_flags(self) -> list[str]:
        return sorted(k for k, v in self.drift.items() if v in ("drift", "warn"))

    def worst_error_rate(self) -> float | None:
        rates = [
            h.error_rate for hs in self.models.values() for h in hs if h.error_rate is not None
        ]
        return max(rates) if rates else None

    def worst_p99(self) -> float | None:
        values = [h.p99_ms for hs in self.models.values() for h in hs if h.p99_ms is not None]
        return max(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "online": self.online,
            "since": self.since,
            "last_seen": self.last_seen,
            "active_versions": self.active,
            "job": self.job or None,
            "job_progress": self.job_progress,
            "health": {
                "received_at": self.health_at,
                "cpu_percent": self.cpu_percent,
                "error_rate": self.worst_error_rate(),
                "p99_ms": self.worst_p99(),
                "models": {
                    name: [
                        {
                            "version": h.version,
                            "active": h.active,
                            "error_rate": h.error_rate,
                            "p99_ms": h.p99_ms,
                            "requests": h.requests,
                        }
                        for h in hs
                    ]
                    for name, hs in sorted(self.models.items())
                },
            },
            "drift": dict(sorted(self.drift.items())),
            "drift_flags": self.drift_flags,
            "groups": self.groups,
            "tags": list(self.tags),
        }


def _model_health(item: Mapping[str, Any]) -> ModelHealth:
    interval = item.get("interval") if isinstance(item.get("interval"), dict) else {}
    assert isinstance(interval, dict)
    success = _num(interval.get("success")) or 0.0
    failure = _num(interval.get("failure")) or 0.0
    total = success + failure
    latency = interval.get("latency_ms") if isinstance(interval.get("latency_ms"), dict) else None
    if latency is None and isinstance(item.get("latency_ms"), dict):
        latency = item["latency_ms"]
    p99 = _num(latency.get("p99")) if isinstance(latency, dict) else None
    return ModelHealth(
        version=str(item.get("version", "?")),
        active=bool(item.get("active")),
        error_rate=(failure / total) if total > 0 else None,
        p99_ms=p99,
        requests=int(total),
    )


def device_row(
    device: str, entry: Mapping[str, Any], groups: Mapping[str, Sequence[str]] | None = None
) -> DeviceRow:
    reported = _message(entry, "reported")
    job_message = _message(entry, "jobs")
    reported_job = reported.get("job") if isinstance(reported.get("job"), dict) else None
    # The newer of the last job message and the job in the reported state.
    job: dict[str, Any] = dict(job_message)
    if reported_job is not None:
        job_ts = _received(entry, "jobs") or 0.0
        reported_ts = _received(entry, "reported") or 0.0
        if not job or reported_ts > job_ts:
            job = dict(reported_job)
    progress = None
    if job.get("phase") == "Downloading" and isinstance(job.get("progress"), dict):
        total = _num(job["progress"].get("total")) or 0.0
        done = _num(job["progress"].get("bytes")) or 0.0
        progress = done / total if total > 0 else None
    active: dict[str, int | None] = {}
    models = reported.get("models")
    if isinstance(models, dict):
        for name, info in sorted(models.items()):
            if isinstance(info, dict):
                value = info.get("active_version")
                active[str(name)] = value if isinstance(value, int) else None
    health = _message(entry, "health")
    host = health.get("host") if isinstance(health.get("host"), dict) else {}
    assert isinstance(host, dict)
    model_health: dict[str, list[ModelHealth]] = {}
    items = health.get("models")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                model_health.setdefault(item["name"], []).append(_model_health(item))
    drift: dict[str, str] = {}
    drift_items = _message(entry, "drift").get("models")
    if isinstance(drift_items, list):
        for item in drift_items:
            if isinstance(item, dict) and isinstance(item.get("status"), str):
                drift[f"{item.get('name')}:{item.get('version')}"] = item["status"]
    online = reported.get("online")
    last_seen = _num(entry.get("last_seen"))
    return DeviceRow(
        device=device,
        online=online if isinstance(online, bool) else None,
        since=_num(reported.get("since")),
        last_seen=last_seen,
        active=active,
        job={
            k: job.get(k)
            for k in (
                "deployment_id", "model", "model_version", "phase", "status", "reason_code",
                "message",
            )
        }
        if job
        else {},
        job_progress=progress,
        cpu_percent=_num(host.get("cpu_percent")),
        health_at=_received(entry, "health"),
        models=model_health,
        drift=drift,
        groups=groups_of(device, entry, groups or {}),
        tags=device_tags(entry),
    )


def fleet_rows(
    devices: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]] | None = None,
    only: Iterable[str] | None = None,
) -> list[DeviceRow]:
    """Rows for every device (sorted by id); ``only``: just these (unknown ones included)."""
    names = sorted(set(only)) if only is not None else sorted(devices)
    return [device_row(name, devices.get(name, {}), groups) for name in names]


def observation(entry: Mapping[str, Any], model: str, version: int) -> DeviceObservation:
    """What a rollout of ``model`` ``version`` judges this device by."""
    row = device_row(str(entry.get("device", "")), entry)
    health = next(
        (h for h in row.models.get(model, []) if h.version == str(version)),
        None,
    )
    job = row.job
    return DeviceObservation(
        online=row.online,
        active_version=row.active.get(model),
        job_deployment_id=job.get("deployment_id") if job else None,
        job_phase=job.get("phase") if job else None,
        job_status=job.get("status") if job else None,
        job_reason=str(job.get("reason_code") or "") if job else "",
        health_at=row.health_at if health is not None else None,
        error_rate=health.error_rate if health is not None else None,
        p99_ms=health.p99_ms if health is not None else None,
        drift=row.drift.get(f"{model}:{version}"),
    )


# --------------------------------------------------------------------------- the table


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "?"
    seconds = max(0.0, now - then)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _state(row: DeviceRow, now: float) -> str:
    word = "online" if row.online else "offline" if row.online is False else "unknown"
    return f"{word} {_ago(row.since, now)}" if row.since is not None else word


# Job failure reason codes (agent.fleet.lifecycle.Reason, and the rejections' error
# codes) in words, for when the device's own message is missing.
REASON_WORDS: Final = {
    "superseded": "replaced by a newer deployment",
    "download_timed_out": "a model chunk got no answer (is a controller serving?)",
    "download_deadline_exceeded": "the download took longer than fleet.download_timeout_s",
    "artifact_not_found": "the controller does not have this version (not published?)",
    "chunk_invalid": "the controller sent a bad chunk",
    "digest_mismatch": "a downloaded file does not match the deployment's digest",
    "storage_failed": "the device could not store the download (disk full?)",
    "validation_failed": "the new version does not load or answer its test inputs",
    "activation_failed": "the new version could not be started",
    "probation_failed": "too many failed requests during probation: rolled back",
    "crash_loop": "the agent kept restarting during the update",
    "interrupted": "the update was interrupted",
    "trust_store_invalid": "the device's trust store is missing or invalid",
    "signature_untrusted_key": "signed by a key the device does not trust",
    "signature_invalid": "the deployment's signature is not valid",
    "expired": "the deployment expired before the device got it",
    "not_yet_valid": "the deployment is not valid yet (clock skew?)",
    "sequence_replayed": "an old deployment sent again (replay refused)",
    "version_rollback": "a downgrade without --allow-downgrade",
    "wrong_device": "the deployment names other devices",
    "identity_mismatch": "the version is signed as another model or version",
    "model_unsigned": "the version is not signed",
}


def reason_words(job: Mapping[str, Any]) -> str:
    """Why a job failed, in words: the device's message, else the code's meaning."""
    code = str(job.get("reason_code") or "")
    message = job.get("message")
    if isinstance(message, str) and message.strip():
        words = " ".join(message.split())
    else:
        words = REASON_WORDS.get(code, code.replace("_", " "))
    return f"{words} ({code})" if code and code not in words else words


def _job(row: DeviceRow) -> str:
    """``MODEL vVERSION Phase/STATUS [NN%][: why it failed]``."""
    if not row.job:
        return "-"
    model = row.job.get("model")
    version = row.job.get("model_version")
    what = f"{model} v{version} " if model is not None else ""
    text = f"{what}{row.job.get('phase')}/{row.job.get('status')}"
    if row.job_progress is not None:
        text += f" {row.job_progress * 100:.0f}%"
    if row.job.get("reason_code"):
        text += f": {reason_words(row.job)}"
    return text


def _health(row: DeviceRow) -> str:
    parts = []
    rate = row.worst_error_rate()
    p99 = row.worst_p99()
    if rate is not None:
        parts.append(f"err {rate * 100:.1f}%")
    if p99 is not None:
        parts.append(f"p99 {p99:.1f}ms")
    if row.cpu_percent is not None:
        parts.append(f"cpu {row.cpu_percent:.0f}%")
    return " ".join(parts) or "-"


COLUMNS: Final = ("DEVICE", "STATE", "ACTIVE", "JOB", "HEALTH", "DRIFT", "TAGS")


def table_lines(rows: Sequence[DeviceRow], now: float | None = None) -> list[str]:
    """The status table: a header, one line per device, then a summary line."""
    now = time.time() if now is None else now
    cells = [
        (
            row.device,
            _state(row, now),
            ",".join(f"{m}:{v if v is not None else '-'}" for m, v in row.active.items()) or "-",
            _job(row),
            _health(row),
            ",".join(row.drift_flags) or "-",
            ",".join(row.tags) or "-",
        )
        for row in rows
    ]
    widths = [max([len(COLUMNS[i]), *(len(c[i]) for c in cells)]) for i in range(len(COLUMNS))]
    # The job column carries the failure reason: room for a short sentence.
    widths = [min(w, 96 if COLUMNS[i] == "JOB" else 48) for i, w in enumerate(widths)]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(v[:w].ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    online = sum(1 for r in rows if r.online)
    failed = sum(1 for r in rows if r.job.get("phase") in ("Failed", "RolledBack"))
    drifting = sum(1 for r in rows if r.drift_flags)
    lines = [fmt(COLUMNS), *(fmt(c) for c in cells)]
    lines.append(
        f"{len(rows)} devices: {online} online, {len(rows) - online} offline/unknown, "
        f"{failed} failed jobs, {drifting} with drift flags"
    )
    return lines


# --------------------------------------------------------------------------- one device


def _clock(then: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(then)) if then else "?"


def device_lines(
    device: str,
    entry: Mapping[str, Any],
    groups: Mapping[str, Sequence[str]] | None = None,
    now: float | None = None,
) -> list[str]:
    """``edge-controller status DEVICE``: what the device last reported, for a person."""
    now = time.time() if now is None else now
    row = device_row(device, entry, groups)
    last_seen = f"last seen {_ago(row.last_seen, now)} ago" if row.last_seen else "never seen"
    lines = [f"device {device}: {_state(row, now)} ({last_seen})"]
    if row.groups or row.tags:
        lines.append(
            f"  groups: {', '.join(row.groups) or '-'}    tags: {', '.join(row.tags) or '-'}"
        )
    lines.append("  models:")
    names = sorted(set(row.active) | set(row.models))
    if not names:
        lines.append("    (none reported)")
    for name in names:
        active = row.active.get(name)
        lines.append(f"    {name}: active version {active if active is not None else '-'}")
        for h in row.models.get(name, []):
            stats = [f"{h.requests} requests"]
            if h.error_rate is not None:
                stats.append(f"errors {h.error_rate * 100:.1f}%")
            if h.p99_ms is not None:
                stats.append(f"p99 {h.p99_ms:.1f} ms")
            drift = row.drift.get(f"{name}:{h.version}")
            if drift:
                stats.append(f"drift {drift}")
            mark = " (active)" if h.active else ""
            lines.append(f"      v{h.version}{mark}: {', '.join(stats)} in the last interval")
    if row.job:
        job = row.job
        lines.append(f"  job: {_job(row)}")
        lines.append(f"       deployment {job.get('deployment_id') or '?'}")
    else:
        lines.append("  job: none reported")
    if row.health_at is not None:
        cpu = f"cpu {row.cpu_percent:.0f}%, " if row.cpu_percent is not None else ""
        lines.append(f"  health: {cpu}reported {_ago(row.health_at, now)} ago "
                     f"({_clock(row.health_at)})")
    else:
        lines.append("  health: none reported")
    history = entry.get("job_history")
    if isinstance(history, list) and history:
        lines.append("  recent jobs:")
        for item in history[-5:]:
            if isinstance(item, dict):
                shown = DeviceRow(device, None, None, None, {}, item, None, None, None)
                stamp = _clock(_num(item.get("ts")))
                lines.append(f"    {stamp}  {_job(shown)}  ({item.get('deployment_id')})")
    unverified = entry.get("unverified")
    if isinstance(unverified, dict) and unverified.get("count"):
        lines.append(
            f"  {unverified['count']} report(s) about deployments this controller did not "
            "publish (kept apart; --json shows them)"
        )
    lines.append("  (all fields: --json)")
    return lines

