"""The chunk request/answer protocol of docs/fleet-protocol.md (pure: bytes in, values out).

One implementation for both ends: the device's fetcher (``agent.fleet.downloader``)
encodes requests and checks answers with it, the controller's chunk server
(``agent.controller.server``) parses requests and encodes answers with it.

A request is JSON (``edge.chunk_request``) on ``{p}/artifacts/request/{d}``
with MQTT v5 response topic and correlation data; the answer is either the
bytes themselves, described by user properties (``edge.chunk``: schema,
version, sha256, offset), or a JSON ``edge.chunk_error`` with a ``code`` from
``ERROR_CODES``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import AgentError
from agent.protocol.deployment import MAX_MESSAGE_BYTES, SHA256_HEX, load_strict_json

SCHEMA_CHUNK_REQUEST: Final = "edge.chunk_request"
SCHEMA_CHUNK: Final = "edge.chunk"
SCHEMA_CHUNK_ERROR: Final = "edge.chunk_error"
CHUNK_VERSION: Final = 1

MAX_JSON_BYTES: Final = MAX_MESSAGE_BYTES  # requests and error answers
DEFAULT_MAX_CHUNK_BYTES: Final = 1024 * 1024
MAX_CORRELATION_BYTES: Final = 256
REQUEST_KEYS: Final = frozenset({"schema", "version", "device", "sha256", "offset", "length"})

# Error codes of an ``edge.chunk_error`` answer.
BAD_REQUEST: Final = "bad_request"  # malformed, out of range, wrong topic or response topic
NOT_FOUND: Final = "not_found"  # the controller's store has no such blob
NOT_AUTHORIZED: Final = "not_authorized"  # no current deployment gives the device this blob
ERROR_CODES: Final = frozenset({BAD_REQUEST, NOT_FOUND, NOT_AUTHORIZED})

ERROR_PROPERTIES: Final[Mapping[str, str]] = {
    "schema": SCHEMA_CHUNK_ERROR,
    "version": str(CHUNK_VERSION),
}


class ChunkRequestError(Exception):
    """A request that gets an ``edge.chunk_error`` answer (``code`` from ERROR_CODES)."""

    def __init__(
        self, code: str, message: str, sha256: str | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sha256 = sha256
        self.offset = offset


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    device: str
    sha256: str
    offset: int
    length: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- requests


class RequestEncoder:
    """A device's requests, byte for byte what ``json.dumps`` of the request would give;
    the fields that never change are encoded once."""

    def __init__(self, device: str) -> None:
        # The JSON object of the fixed fields minus its closing brace.
        self._head = json.dumps(
            {"schema": SCHEMA_CHUNK_REQUEST, "version": CHUNK_VERSION, "device": device},
            separators=(",", ":"),
        )[:-1]

    def encode(self, sha256: str, offset: int, length: int) -> bytes:
        return (
            f'{self._head},"sha256":{json.dumps(sha256)},'
            f'"offset":{int(offset)},"length":{int(length)}}}'
        ).encode()


def parse_chunk_request(
    topic_device: str, payload: bytes, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> ChunkRequest:
    """Validate a request's payload; raise ChunkRequestError(bad_request) if it is bad.

    The error echoes the digest and offset when they are well formed, so the
    device can match the refusal to its request.
    """
    if len(payload) > MAX_JSON_BYTES:
        raise ChunkRequestError(BAD_REQUEST, f"request larger than {MAX_JSON_BYTES} bytes")
    try:
        data: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChunkRequestError(BAD_REQUEST, "request is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ChunkRequestError(BAD_REQUEST, "request is not a JSON object")
    sha = data.get("sha256")
    sha_echo = sha if isinstance(sha, str) and SHA256_HEX.match(sha) else None
    offset: Any = data.get("offset")
    offset_echo = offset if _is_int(offset) and 0 <= offset < 2**63 else None

    def bad(message: str) -> ChunkRequestError:
        return ChunkRequestError(BAD_REQUEST, message, sha_echo, offset_echo)

    if data.get("schema") != SCHEMA_CHUNK_REQUEST:
        raise bad(f"schema {data.get('schema')!r} is not {SCHEMA_CHUNK_REQUEST!r}")
    if data.get("version") != CHUNK_VERSION or not _is_int(data.get("version")):
        raise bad(f"version {data.get('version')!r} is not {CHUNK_VERSION}")
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    missing = sorted(REQUEST_KEYS - set(data))
    if missing:
        raise bad(f"missing field {missing[0]!r}")
    if data["device"] != topic_device:
        raise bad(f"device {data['device']!r} does not match the request topic ({topic_device})")
    if sha_echo is None:
        raise bad("sha256 is not a lower-case hex SHA-256 digest")
    if offset_echo is None:
        raise bad(f"offset {offset!r} is not a non-negative integer")
    length = data["length"]
    if not _is_int(length) or length <= 0:
        raise bad(f"length {length!r} is not a positive integer")
    if length > max_chunk_bytes:
        raise bad(f"length {length} exceeds the maximum chunk size {max_chunk_bytes}")
    return ChunkRequest(topic_device, sha_echo, offset_echo, length)


def check_correlation(correlation: bytes | None) -> None:
    if not correlation or len(correlation) > MAX_CORRELATION_BYTES:
        raise ChunkRequestError(
            BAD_REQUEST, f"correlation data missing or over {MAX_CORRELATION_BYTES} bytes"
        )


# --------------------------------------------------------------------------- answers


def chunk_properties(sha256: str, offset: int) -> dict[str, str]:
    """The user properties of an answer carrying bytes of ``sha256`` from ``offset``."""
    return {
        "schema": SCHEMA_CHUNK,
        "version": str(CHUNK_VERSION),
        "sha256": sha256,
        "offset": str(offset),
    }


def encode_chunk_error(error: ChunkRequestError) -> bytes:
    """An ``edge.chunk_error`` answer's payload (sent with ``ERROR_PROPERTIES``)."""
    return json.dumps(
        {
            "schema": SCHEMA_CHUNK_ERROR,
            "version": CHUNK_VERSION,
            "sha256": error.sha256,
            "offset": error.offset,
            "code": error.code,
            "message": error.message,
        },
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    ).encode()


def chunk_problem(
    properties: Mapping[str, str], sha256: str, offset: int, length: int, size: int
) -> str:
    """Why an ``edge.chunk`` answer of ``size`` bytes does not answer the request
    (``sha256``, ``offset``, ``length``) exactly; '' if it does."""
    if properties.get("version") != str(CHUNK_VERSION):
        return f"chunk version {properties.get('version')!r}"
    if properties.get("sha256") != sha256 or properties.get("offset") != str(offset):
        return (
            f"answer for {properties.get('sha256', '?')[:12]}@{properties.get('offset')} to a "
            f"request for {sha256[:12]}@{offset}"
        )
    if size != length:
        return f"{size} bytes for a request of {length} ({sha256[:12]}@{offset})"
    return ""


def decode_chunk_error(payload: bytes) -> tuple[str, str]:
    """``(code, message)`` of an ``edge.chunk_error`` payload; ``("", why)`` if unreadable.

    The message is cut to 300 characters (it ends up in the device's reports).
    """
    if len(payload) > MAX_JSON_BYTES:
        return "", "oversized chunk error"
    try:
        doc: Any = load_strict_json(payload, "chunk error")
    except AgentError:
        return "", "unparsable chunk error"
    if not isinstance(doc, dict):
        return "", "unparsable chunk error"
    return str(doc.get("code", "")), str(doc.get("message", ""))[:300]
