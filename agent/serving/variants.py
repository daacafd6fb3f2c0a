"""On-device model variants: the pure rules (no I/O, no onnxruntime).

A version opts in with a signed ``optimize.json`` in its directory (covered by
model.sig like every other file)::

    {"schema": "edge.optimize", "version": 1,
     "allow": ["graph", "int8"],      # which variants the device may try
     "rtol": 0.01, "atol": 0.05,      # optional: else validation.json's tolerance
     "min_speedup": 0.10}             # optional, at least 0.10

A variant is kept only if it reproduces the version's signed golden vectors
within that tolerance and its median time per run is at least ``min_speedup``
below the original's on this device. What was decided is a *record*, stored
with the variant outside the version directory, keyed by the signed model's
digest, the onnxruntime version, the execution provider and the digest of the
signed files that made the decision (policy and vectors). The record is
authenticated with an HMAC key of the device and names the variant's SHA-256;
a record that does not authenticate, or a variant whose bytes differ from it,
is discarded and the decision is made again (never run).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final

from agent.errors import AgentError

POLICY_FILE: Final = "optimize.json"
POLICY_SCHEMA: Final = "edge.optimize"
RECORD_SCHEMA: Final = "edge.variant"
RECORD_FILE: Final = "record.json"
KINDS: Final = ("graph", "int8")
MIN_SPEEDUP: Final = 0.10
MAX_POLICY_BYTES: Final = 16 * 1024
# The signed files whose contents decide (policy, golden vectors and their tolerance).
DECIDING_FILES: Final = (POLICY_FILE, "validation.npz", "validation.json")
_SAFE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


class OptimizePolicyError(AgentError):
    """The signed optimize.json is malformed."""

    code = "optimize_policy"


class VariantRecordError(AgentError):
    """A stored variant record does not authenticate or does not match its key."""

    code = "variant_record"


@dataclass(frozen=True, slots=True)
class OptimizePolicy:
    allow: tuple[str, ...]
    rtol: float | None = None  # None: the version's validation tolerance
    atol: float | None = None
    min_speedup: float = MIN_SPEEDUP


def parse_policy(data: bytes) -> OptimizePolicy:
    if len(data) > MAX_POLICY_BYTES:
        raise OptimizePolicyError(f"{POLICY_FILE} is larger than {MAX_POLICY_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise OptimizePolicyError(f"{POLICY_FILE} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OptimizePolicyError(f"{POLICY_FILE}: not a JSON object")
    if doc.get("schema") != POLICY_SCHEMA or doc.get("version") != 1:
        raise OptimizePolicyError(f"{POLICY_FILE}: expected schema {POLICY_SCHEMA!r} version 1")
    unknown = set(doc) - {"schema", "version", "allow", "rtol", "atol", "min_speedup"}
    if unknown:
        raise OptimizePolicyError(f"{POLICY_FILE}: unknown field(s) {', '.join(sorted(unknown))}")
    allow = doc.get("allow", [])
    if not isinstance(allow, list) or any(k not in KINDS for k in allow):
        raise OptimizePolicyError(f"{POLICY_FILE}: 'allow' must be a list of {list(KINDS)}")
    values: dict[str, float | None] = {}
    for name in ("rtol", "atol", "min_speedup"):
        value = doc.get(name)
        if value is None:
            values[name] = None
            continue
        if type(value) not in (int, float) or not 0 <= value < float("inf"):
            raise OptimizePolicyError(f"{POLICY_FILE}: {name} {value!r} is not a number >= 0")
        values[name] = float(value)
    if (values["rtol"] is None) != (values["atol"] is None):
        raise OptimizePolicyError(f"{POLICY_FILE}: give both rtol and atol, or neither")
    speedup = values["min_speedup"]
    if speedup is not None and speedup < MIN_SPEEDUP:
        raise OptimizePolicyError(f"{POLICY_FILE}: min_speedup must be at least {MIN_SPEEDUP}")
    return OptimizePolicy(
        tuple(dict.fromkeys(allow)),
        values["rtol"],
        values["atol"],
        MIN_SPEEDUP if speedup is None else speedup,
    )


@dataclass(frozen=True, slots=True)
class VariantKey:
    model_sha256: str  # of the verified (signed) model bytes
    runtime_version: str
    provider: str
    decision_sha256: str  # of the signed files that decide (deciding_digest)

    def directory(self) -> PurePosixPath:
        """Relative to the variant store: <model>/<onnxruntime>/<provider>/<decision>."""
        parts = (self.model_sha256, self.runtime_version, self.provider, self.decision_sha256[:16])
        for part in parts:
            if not _SAFE.fullmatch(part) or part in (".", ".."):
                raise VariantRecordError(f"unusable name {part!r} in a variant key")
        return PurePosixPath(*parts)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def deciding_digest(files: Mapping[str, bytes]) -> str:
    """One digest over the signed deciding files present (name and content)."""
    present = {name: sha256(files[name]) for name in DECIDING_FILES if name in files}
    return sha256(json.dumps(present, sort_keys=True).encode())


@dataclass(frozen=True, slots=True)
class Candidate:
    """One variant tried: did it reproduce the vectors, how much faster was it."""

    kind: str
    valid: bool
    speedup: float | None = None  # median original time / median variant time - 1
    max_abs_error: float | None = None  # against the golden vectors
    reason: str = ""
    sha256: str = ""
    size: int = 0


def speedup(original_s: Sequence[float], variant_s: Sequence[float]) -> float:
    """Relative gain of the variant from alternating rounds: the median of the ratios of
    rounds run next to each other (they share the device's load of the moment), not of
    means (one descheduled round on a busy device must not decide)."""
    if not original_s or len(original_s) != len(variant_s):
        raise ValueError("timing rounds missing or unpaired")
    ratios = [a / b for a, b in zip(original_s, variant_s, strict=True) if b > 0]
    return statistics.median(ratios) - 1.0 if ratios else 0.0


def confirmed_speedup(passes: Sequence[float]) -> float:
    """The gain a variant is judged by: the smallest of independent timing passes, so
    that a lucky pass on a noisy device does not keep a variant that is no faster."""
    if not passes:
        raise ValueError("no timing passes")
    return min(passes)


def judge(candidate: Candidate, min_speedup: float) -> Candidate:
    """The candidate with its verdict in ``reason`` (empty: kept)."""
    if not candidate.valid:
        return candidate
    if candidate.speedup is None or candidate.speedup < min_speedup:
        gain = "unmeasured" if candidate.speedup is None else f"{candidate.speedup:+.1%}"
        return _replace(candidate, reason=f"not faster enough ({gain}, needs {min_speedup:+.0%})")
    return _replace(candidate, reason="")


def choose(candidates: Sequence[Candidate]) -> Candidate | None:
    """The kept candidate with the largest speedup, or None (the original serves)."""
    kept = [c for c in candidates if c.valid and not c.reason and c.speedup is not None]
    return max(kept, key=lambda c: c.speedup or 0.0, default=None)


def _replace(c: Candidate, **changes: Any) -> Candidate:
    return Candidate(**{**asdict(c), **changes})


@dataclass(frozen=True, slots=True)
class Record:
    key: VariantKey
    chosen: str | None  # kind of the kept variant, None: the original serves
    candidates: tuple[Candidate, ...]
    original_max_abs_error: float | None = None
    created_at: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def kept(self) -> Candidate | None:
        return next((c for c in self.candidates if c.kind == self.chosen), None)

    def summary(self) -> dict[str, Any]:
        """What health messages and the CLI show."""
        kept = self.kept()
        return {
            "variant": self.chosen or "original",
            "speedup": None if kept is None else round(kept.speedup or 0.0, 4),
            "max_abs_error": None if kept is None else kept.max_abs_error,
            "original_max_abs_error": self.original_max_abs_error,
            "model_sha256": self.key.model_sha256,
            "onnxruntime": self.key.runtime_version,
            "provider": self.key.provider,
            "tried": {c.kind: c.reason or "kept" for c in self.candidates},
        }


def _canonical(record: Record) -> bytes:
    body = {
        "schema": RECORD_SCHEMA,
        "version": 1,
        "key": asdict(record.key),
        "chosen": record.chosen,
        "candidates": [asdict(c) for c in record.candidates],
        "original_max_abs_error": record.original_max_abs_error,
        "created_at": record.created_at,
        "notes": list(record.notes),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode_record(record: Record, mac_key: bytes) -> bytes:
    body = _canonical(record)
    mac = hmac.new(mac_key, body, hashlib.sha256).hexdigest()
    return json.dumps({"body": body.decode(), "hmac_sha256": mac}).encode()


def decode_record(data: bytes, mac_key: bytes, expected: VariantKey) -> Record:
    """The record, if it authenticates under ``mac_key`` and is for ``expected``."""
    try:
        outer = json.loads(data)
        body = str(outer["body"]).encode()
        mac = str(outer["hmac_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VariantRecordError(f"unreadable variant record: {exc}") from None
    want = hmac.new(mac_key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise VariantRecordError("variant record does not authenticate (HMAC mismatch)")
    try:
        doc = json.loads(body)
        if doc["schema"] != RECORD_SCHEMA or doc["version"] != 1:
            raise ValueError("wrong schema")
        record = Record(
            key=VariantKey(**doc["key"]),
            chosen=doc["chosen"],
            candidates=tuple(Candidate(**c) for c in doc["candidates"]),
            original_max_abs_error=doc["original_max_abs_error"],
            created_at=float(doc["created_at"]),
            notes=tuple(doc["notes"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise VariantRecordError(f"malformed variant record: {exc}") from None
    if record.key != expected:
        raise VariantRecordError("variant record is for another model, runtime or provider")
    if record.chosen is not None and record.kept() is None:
        raise VariantRecordError(f"variant record chooses {record.chosen!r} but lists no such try")
    return record


def variant_matches(record: Record, variant: bytes | memoryview) -> bool:
    """Whether ``variant`` is the bytes the record was made with."""
    kept = record.kept()
    return kept is not None and len(variant) == kept.size and hmac.compare_digest(
        sha256(variant), kept.sha256
    )
