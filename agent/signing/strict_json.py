"""Strict JSON reading for signature files: duplicate keys, wrong types and odd encodings
are refused with a message naming the field, so that any change to a file is detected."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

from agent.errors import VerificationError
from agent.signing.oms_errors import BundleMalformedError

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}\Z")


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateJsonKeyError(key)
        result[key] = value
    return result


class DuplicateJsonKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_json(data: bytes, what: str, error: type[VerificationError]) -> Any:
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except DuplicateJsonKeyError as exc:
        raise error(f"{what}: JSON object has the key {exc.key!r} twice") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON, truncated or corrupt ({exc})") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None


def malformed(where: str, problem: str) -> NoReturn:
    raise BundleMalformedError(f"{where}: {problem}")


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        malformed(where, f"expected a JSON object, got {json_type(value)}")
    return value


def json_array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        malformed(where, f"expected a JSON array, got {json_type(value)}")
    return value


def json_string(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        malformed(where, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        malformed(f"{where}.{key}", f"expected a string, got {json_type(value)}")
    return value


def field_value(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        malformed(where, f"missing field {key!r}")
    return obj[key]


def only_keys(obj: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        malformed(where, f"unexpected field(s) {', '.join(map(repr, unknown))}")


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def base64_field(value: str, where: str) -> bytes:
    """Strict standard base64: the only encoding of the decoded bytes that is accepted."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        malformed(where, "not valid base64")
    if base64.b64encode(decoded).decode("ascii") != value:
        malformed(where, "not canonical base64")
    return decoded


def hex_digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
        malformed(where, "expected a 64-digit hex SHA-256 digest")
    return value.lower()
