"""Deployment documents: build, sign and publish them (docs/fleet-protocol.md).

A deployment names the devices, the model version and every file's digest and
size (from the store's manifest), a fresh deployment id, a sequence number the
store issues strictly increasing, and its validity window. It is signed with the
deployment key as a DSSE envelope (``agent.protocol.deployment.sign_deployment``,
the same module the agent verifies with) and published retained, QoS 1, to each
device's ``desired`` topic.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.controller.store import ArtifactStore, ModelManifest
from agent.errors import AgentError
from agent.mqtt.client import MqttClient
from agent.protocol.deployment import sign_deployment
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id
from agent.protocol.topics import (
    SCHEMA_DEPLOYMENT,
    SCHEMA_VERSION,
    desired_topic,
    is_device_id,
)

DEFAULT_EXPIRES_IN_S: Final = 7 * 24 * 3600
DEFAULT_PROBATION_S: Final = 60
MAX_DEVICES: Final = 256  # keeps the signed envelope far below the 64 KiB message limit


class DeploymentError(AgentError):
    """A deployment cannot be built (bad device id, bad validity) or published."""

    code = "deployment_invalid"


@dataclass(frozen=True)
class IssuedDeployment:
    deployment: dict[str, Any]
    envelope: dict[str, Any]
    payload: bytes  # the envelope as published

    @property
    def deployment_id(self) -> str:
        return str(self.deployment["deployment_id"])

    @property
    def sequence(self) -> int:
        return int(self.deployment["sequence"])

    @property
    def envelope_sha256(self) -> str:
        """SHA-256 of the published bytes: devices name it in their reports about it."""
        return hashlib.sha256(self.payload).hexdigest()


def check_devices(devices: Sequence[str]) -> None:
    if not devices:
        raise DeploymentError("name at least one device")
    if len(devices) > MAX_DEVICES:
        raise DeploymentError(f"at most {MAX_DEVICES} devices per deployment")
    for device in devices:
        if isinstance(device, str) and is_reserved_device_id(device):
            raise DeploymentError(
                f"device id {device!r} is reserved: ids starting with "
                f"{RESERVED_DEVICE_PREFIX!r} belong to controllers"
            )
        if not is_device_id(device):
            raise DeploymentError(f"device id {device!r}: 1-64 letters, digits, '_', '.' or '-'")
    if len(set(devices)) != len(devices):
        raise DeploymentError("a device is named twice")


def build_deployment(
    manifest: ModelManifest,
    devices: Sequence[str],
    *,
    sequence: int,
    issued_at: int,
    expires_in_s: int = DEFAULT_EXPIRES_IN_S,
    allow_downgrade: bool = False,
    probation_s: int = DEFAULT_PROBATION_S,
    deployment_id: str | None = None,
) -> dict[str, Any]:
    """The deployment document (the payload that gets signed)."""
    check_devices(devices)
    if expires_in_s <= 0:
        raise DeploymentError(f"expires-in {expires_in_s}: must be positive")
    if probation_s < 0:
        raise DeploymentError(f"probation {probation_s}: must not be negative")
    model: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "files": [f.to_json() for f in manifest.files],
    }
    if manifest.config is not None:
        model["config"] = {"sha256": manifest.config.sha256, "size": manifest.config.size}
    return {
        "schema": SCHEMA_DEPLOYMENT,
        "version": SCHEMA_VERSION,
        "deployment_id": deployment_id or str(uuid.uuid4()),
        "sequence": sequence,
        "devices": list(devices),
        "issued_at": issued_at,
        "expires_at": issued_at + expires_in_s,
        "model": model,
        "allow_downgrade": allow_downgrade,
        "probation_s": probation_s,
    }


def issue_deployment(
    store: ArtifactStore,
    model: str,
    version: int,
    devices: Sequence[str],
    key: ec.EllipticCurvePrivateKey,
    *,
    expires_in_s: int = DEFAULT_EXPIRES_IN_S,
    allow_downgrade: bool = False,
    probation_s: int = DEFAULT_PROBATION_S,
    now: float | None = None,
) -> IssuedDeployment:
    """Build and sign a deployment of a published version; record it in the store."""
    check_devices(devices)
    manifest = store.manifest(model, version)
    for entry in (*manifest.files, *((manifest.config,) if manifest.config else ())):
        if not store.has_blob(entry.sha256):
            raise DeploymentError(f"{entry.path} ({entry.sha256}) is missing from the store")
    issued_at = int(now if now is not None else time.time())
    deployment = build_deployment(
        manifest,
        devices,
        sequence=store.next_sequence(),
        issued_at=issued_at,
        expires_in_s=expires_in_s,
        allow_downgrade=allow_downgrade,
        probation_s=probation_s,
    )
    payload = sign_deployment(deployment, key)
    envelope: dict[str, Any] = json.loads(payload)
    store.record_deployment(deployment, envelope, payload)
    return IssuedDeployment(deployment, envelope, payload)


async def publish_deployment(client: MqttClient, prefix: str, issued: IssuedDeployment) -> None:
    """Publish the envelope retained, QoS 1, to every device's desired topic; wait for PUBACKs."""
    for device in issued.deployment["devices"]:
        await client.publish(desired_topic(prefix, device), issued.payload, qos=1, retain=True)
