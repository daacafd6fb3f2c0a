"""Topic names, schema names and limits of docs/fleet-protocol.md (controller side).

Identifier patterns, the JSON size limit and the deployment schema come from
``agent.protocol.deployment``, the module devices verify deployments with.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from agent.protocol.deployment import DEPLOYMENT_SCHEMA as SCHEMA_DEPLOYMENT
from agent.protocol.deployment import (
    DEVICE_ID,
    MODEL_NAME,
    SCHEMA_VERSION,
    SHA256_HEX,
    is_device_id,
)
from agent.protocol.deployment import MAX_MESSAGE_BYTES as MAX_JSON_BYTES
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id

# \Z with fullmatch: '$' would accept a trailing newline.
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")
_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

# The device-to-controller topics the controller follows, with their schema.
REPORT_SCHEMAS: Final[dict[str, str]] = {
    "reported": "edge.reported_state",
    "jobs": "edge.job_progress",
    "health": "edge.health",
    "drift": "edge.drift",
    "errors": "edge.error_report",
}


def is_model_name(value: object) -> bool:
    return isinstance(value, str) and MODEL_NAME.fullmatch(value) is not None and ".." not in value


def check_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"topic prefix {prefix!r}: letters, digits, '_', '.', '-' and '/' only")
    return prefix


def check_share_group(group: str) -> str:
    if not _GROUP.fullmatch(group):
        raise ValueError(f"share group {group!r}: 1-64 letters, digits, '_', '.' or '-'")
    return group


def desired_topic(prefix: str, device: str) -> str:
    return f"{prefix}/devices/{device}/desired"


def artifacts_topic(prefix: str, device: str) -> str:
    return f"{prefix}/devices/{device}/artifacts"


def request_topic(prefix: str, device: str) -> str:
    return f"{prefix}/artifacts/request/{device}"


def request_subscription(prefix: str, group: str) -> str:
    return f"$share/{group}/{prefix}/artifacts/request/+"


def report_subscriptions(prefix: str) -> list[str]:
    return [f"{prefix}/devices/+/{kind}" for kind in REPORT_SCHEMAS]


def device_of_request_topic(prefix: str, topic: str) -> str | None:
    """The device id in ``{prefix}/artifacts/request/{d}``, or None if it is not one."""
    head = f"{prefix}/artifacts/request/"
    if not topic.startswith(head):
        return None
    device = topic[len(head) :]
    return device if is_device_id(device) else None


def split_report_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """``(device, kind)`` for ``{prefix}/devices/{d}/{kind}`` with a report kind, else None."""
    head = f"{prefix}/devices/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 2 or not is_device_id(parts[0]) or parts[1] not in REPORT_SCHEMAS:
        return None
    return parts[0], parts[1]


def encode_json(message: dict[str, Any]) -> bytes:
    """Compact, key-sorted UTF-8 JSON: the bytes that go on the wire (and get signed)."""
    return json.dumps(message, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


__all__ = [
    "DEVICE_ID",
    "MAX_JSON_BYTES",
    "MODEL_NAME",
    "REPORT_SCHEMAS",
    "RESERVED_DEVICE_PREFIX",
    "SCHEMA_DEPLOYMENT",
    "SCHEMA_VERSION",
    "SHA256_HEX",
    "is_device_id",
    "is_reserved_device_id",
]
