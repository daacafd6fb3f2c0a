"""The deployment envelopes the controller knows were published, by SHA-256 of their bytes.

Two things are decided from it (docs/fleet-protocol.md):

- **Reports bind to envelopes.** A device names, in its job reports, the SHA-256
  of the exact envelope bytes it judged (``envelope_sha256``). A report counts
  for deployment D only if that digest is one this registry holds *for D and
  for that device*; a rejection naming D with any other digest (or none) is
  about bytes nobody signed as D, and is kept apart as unverified.
- **Blobs go only to their devices.** The chunk server answers a device's
  request for a blob only if an unexpired known deployment lists both the
  device and the blob (``allowed``: one dict lookup, safe from the MQTT thread).

Sources: the store's deployment records (``load_store``: this controller's and
those of any process sharing the store), deployments this process issues
(``add_issued``), and the retained ``desired`` messages of the broker
(``observe_desired``), which are added only once they verify against the
deployment key: a controller never trusts the broker for what it lets devices
fetch or for what a report is about.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.controller.deploy import IssuedDeployment
from agent.controller.store import ArtifactStore
from agent.protocol.deployment import (
    DeploymentRejectedError,
    DeviceContext,
    verify_deployment,
)
from agent.protocol.topics import is_device_id
from agent.signing.keys import TrustStore

log = logging.getLogger("agent.controller.envelopes")

MAX_FORGED_REMEMBERED: Final = 1024  # digests of desired messages that did not verify


@dataclass(frozen=True, slots=True)
class PublishedEnvelope:
    envelope_sha256: str
    deployment_id: str
    devices: frozenset[str]
    blobs: frozenset[str]  # every file's SHA-256 (config included)
    expires_at: float


def _from_document(digest: str, deployment: dict[str, Any]) -> PublishedEnvelope:
    model = deployment["model"]
    blobs = {str(f["sha256"]) for f in model["files"]}
    if isinstance(model.get("config"), dict):
        blobs.add(str(model["config"]["sha256"]))
    return PublishedEnvelope(
        digest,
        str(deployment["deployment_id"]),
        frozenset(str(d) for d in deployment["devices"]),
        frozenset(blobs),
        float(deployment["expires_at"]),
    )


class PublishedEnvelopes:
    """Known published envelopes, and the (device, blob) pairs they grant."""

    def __init__(
        self,
        trust: TrustStore | None = None,
        store: ArtifactStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The deployment key(s), to verify desired messages; without them a desired
        # message counts only once the store has a record of the same bytes.
        self.trust = trust
        self.store = store
        self.clock = clock
        self._by_digest: dict[str, PublishedEnvelope] = {}
        # (device, blob sha256) -> the latest expiry of a deployment granting it. Replaced,
        # never mutated in place, so the MQTT thread reads a consistent dict.
        self._grants: dict[tuple[str, str], float] = {}
        self._forged: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def get(self, digest: object) -> PublishedEnvelope | None:
        return self._by_digest.get(digest) if isinstance(digest, str) else None

    def add(self, envelope: PublishedEnvelope) -> bool:
        """Record ``envelope``; False if it was known already."""
        if envelope.envelope_sha256 in self._by_digest:
            return False
        self._by_digest[envelope.envelope_sha256] = envelope
        now = self.clock()
        if envelope.expires_at > now:
            grants = dict(self._grants)
            for device in envelope.devices:
                for blob in envelope.blobs:
                    key = (device, blob)
                    grants[key] = max(grants.get(key, 0.0), envelope.expires_at)
            self._grants = {k: v for k, v in grants.items() if v > now}
        return True

    def add_issued(self, issued: IssuedDeployment) -> None:
        self.add(_from_document(issued.envelope_sha256, issued.deployment))

    def add_all(self, issued: Iterable[IssuedDeployment]) -> None:
        for item in issued:
            self.add_issued(item)

    def load_store(self, store: ArtifactStore) -> int:
        """Blocking (disk): every deployment the store recorded; returns how many are new."""
        added = 0
        directory = store.deployments
        if not directory.is_dir():
            return 0
        for path in sorted(directory.glob("*.json")):
            try:
                record = json.loads(path.read_bytes())
                published = record["published"]
                if not isinstance(published, str):
                    continue  # older records: learned from the desired topics instead
                digest = hashlib.sha256(published.encode()).hexdigest()
                added += self.add(_from_document(digest, record["deployment"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning(
                    "unreadable deployment record", extra={"path": str(path), "reason": str(exc)}
                )
        return added

    def observe_desired(self, device: str, payload: bytes) -> PublishedEnvelope | None:
        """A (retained) message on ``device``'s desired topic: recorded if it verifies."""
        if not payload:
            return None
        digest = hashlib.sha256(payload).hexdigest()
        known = self._by_digest.get(digest)
        if known is not None or digest in self._forged:
            return known
        if self.trust is None:
            # Issued by a process sharing the store (a one-shot deploy): read its record.
            if self.store is not None:
                self.load_store(self.store)
            known = self._by_digest.get(digest)
            if known is None:
                self._remember_forged(digest)
            return known
        context = DeviceContext(
            device_id=device, now=self.clock(), highest_sequence=0, max_model_bytes=2**62
        )
        try:
            deployment = verify_deployment(payload, self.trust, context)
        except DeploymentRejectedError as exc:
            self._remember_forged(digest)
            log.warning(
                "desired message that does not verify",
                extra={"device": device, "code": exc.code, "reason": str(exc)},
            )
            return None
        envelope = PublishedEnvelope(
            digest,
            deployment.deployment_id,
            frozenset(deployment.devices),
            frozenset(f.sha256 for f in deployment.artifacts),
            deployment.expires_at,
        )
        self.add(envelope)
        return envelope

    def _remember_forged(self, digest: str) -> None:
        self._forged[digest] = None
        while len(self._forged) > MAX_FORGED_REMEMBERED:
            self._forged.popitem(last=False)

    def binds(self, device: str, deployment_id: object, digest: object) -> bool:
        """Whether a report by ``device`` about ``deployment_id`` naming envelope ``digest``
        is about an envelope published as that deployment, for that device."""
        envelope = self.get(digest)
        return (
            envelope is not None
            and envelope.deployment_id == deployment_id
            and device in envelope.devices
        )

    def allowed(self, device: str, sha256: str) -> bool:
        """On any thread: may ``device`` fetch blob ``sha256`` now?"""
        expires = self._grants.get((device, sha256))
        return expires is not None and expires > self.clock()

    def granted(self) -> int:
        return len(self._grants)


def desired_subscription(prefix: str) -> str:
    return f"{prefix}/devices/+/desired"


def device_of_desired_topic(prefix: str, topic: str) -> str | None:
    """The device id in ``{prefix}/devices/{d}/desired``, or None if it is not one."""
    head, tail = f"{prefix}/devices/", "/desired"
    if not topic.startswith(head) or not topic.endswith(tail):
        return None
    device = topic[len(head) : -len(tail)]
    return device if is_device_id(device) else None


def deploy_trust(public_key: ec.EllipticCurvePublicKey) -> TrustStore:
    """The trust store that verifies what the controller's deployment key signs."""
    return TrustStore.from_public_keys([(public_key, "deployment key")])


def known_envelopes(
    store: ArtifactStore, key: ec.EllipticCurvePrivateKey | None
) -> PublishedEnvelopes:
    """Blocking (disk): a registry with the store's records, verifying desired messages
    with ``key``'s public half (if there is a key)."""
    envelopes = PublishedEnvelopes(
        deploy_trust(key.public_key()) if key is not None else None, store
    )
    envelopes.load_store(store)
    return envelopes
