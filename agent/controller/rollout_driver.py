"""Rollouts on disk and the thin driver that performs what ``rollout.decide`` asks.

Layout under the store directory::

    rollouts/<id>.json    the rollout state (``rollout.state_to_json``), written atomically
    rollouts/<id>.lease   which controller drives it, until when
    rollouts/.lock        flock: every read-modify-write of the two above

**One driver per rollout.** Any number of controllers (``serve`` processes, a
foreground ``deploy --group`` or ``rollout resume``) may share the store; a
rollout is driven only by the holder of its lease (``[rollout] lease_ttl_s``,
default ``LEASE_TTL_S``, renewed on every step). A controller that dies stops
renewing and another takes over once the lease expires. The lease file names
the holder's host and PID, so an operator (or a test) can tell which process
drives a rollout. Operator commands (pause/resume/abort) change the state
file under the lock; the driver re-reads the state before each step, so a
command is never lost and takes effect at the next step.

**No double deploy.** A wave is marked ``deploying`` before its deployments are
issued; the issued deployment ids are recorded before anything is published.
After a crash a recorded wave is published again (the same retained envelope:
devices recognise it and ignore it) and an unrecorded one is issued again (its
earlier deployments were never published).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.controller import rollout as ro
from agent.controller.deploy import MAX_DEVICES, IssuedDeployment, issue_deployment
from agent.controller.envelopes import PublishedEnvelopes
from agent.controller.store import ArtifactStore, write_atomically
from agent.mqtt.client import MqttClient
from agent.protocol.topics import desired_topic

log = logging.getLogger("agent.controller.rollout")

LEASE_TTL_S: Final = 15.0
_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Key order of agent.protocol.deployment.sign_deployment's envelope.
_ENVELOPE_ORDER: Final = ("schema", "version", "payloadType", "payload", "signatures")


def new_rollout_id() -> str:
    return f"r-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def check_rollout_id(rollout_id: str) -> str:
    if not rollout_id or len(rollout_id) > 64 or set(rollout_id) - _ID_CHARS:
        raise ro.RolloutError(f"rollout id {rollout_id!r}: lower-case letters, digits and '-'")
    return rollout_id


class RolloutNotFoundError(ro.RolloutError):
    code = "not_found"


@dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: float
    host: str = ""  # of the process that wrote (holds) it
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "expires_at": self.expires_at,
        }


class RolloutBook:
    """The rollouts directory of a controller store."""

    def __init__(self, store_dir: Path) -> None:
        self.directory = store_dir / "rollouts"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def path(self, rollout_id: str) -> Path:
        return self.directory / f"{check_rollout_id(rollout_id)}.json"

    def ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if not p.name.startswith("."))

    def load(self, rollout_id: str) -> ro.RolloutState:
        path = self.path(rollout_id)
        try:
            data: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RolloutNotFoundError(f"no rollout {rollout_id}") from None
        except (OSError, ValueError) as exc:
            raise ro.RolloutError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ro.RolloutError(f"{path}: not a JSON object")
        return ro.state_from_json(data)

    def save(self, state: ro.RolloutState) -> None:
        data = json.dumps(ro.state_to_json(state), indent=1).encode() + b"\n"
        write_atomically(self.path(state.plan.rollout_id), data)

    def create(self, state: ro.RolloutState) -> None:
        with self.locked():
            if self.path(state.plan.rollout_id).exists():
                raise ro.RolloutError(f"rollout {state.plan.rollout_id} exists already")
            self.save(state)

    def update(
        self, rollout_id: str, change: Callable[[ro.RolloutState], ro.RolloutState]
    ) -> ro.RolloutState:
        """Load, change, save under the lock; returns the saved state."""
        with self.locked():
            state = change(self.load(rollout_id))
            self.save(state)
            return state

    # -- leases -----------------------------------------------------------

    def _lease_path(self, rollout_id: str) -> Path:
        return self.directory / f"{check_rollout_id(rollout_id)}.lease"

    def lease(self, rollout_id: str) -> Lease | None:
        try:
            data = json.loads(self._lease_path(rollout_id).read_bytes())
            pid = data.get("pid")
            return Lease(
                str(data["owner"]),
                float(data["expires_at"]),
                str(data.get("host", "")),
                pid if isinstance(pid, int) else None,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def acquire(self, rollout_id: str, owner: str, now: float, ttl: float = LEASE_TTL_S) -> bool:
        """Take or renew the lease; False if another owner holds an unexpired one.

        Only the process that drives the rollout calls this, so the lease records
        this process's host and PID.
        """
        with self.locked():
            current = self.lease(rollout_id)
            if current is not None and current.owner != owner and current.expires_at > now:
                return False
            lease = Lease(owner, now + ttl, os.uname().nodename, os.getpid())
            data = json.dumps(lease.to_json()).encode()
            write_atomically(self._lease_path(rollout_id), data)
            return True

    def release(self, rollout_id: str, owner: str) -> None:
        with self.locked():
            current = self.lease(rollout_id)
            if current is not None and current.owner == owner:
                with contextlib.suppress(OSError):
                    self._lease_path(rollout_id).unlink()


def recorded_deployments(
    store: ArtifactStore, deployment_ids: set[str]
) -> list[IssuedDeployment]:
    """Issued deployments by id, read back from the store's records, each with the
    envelope's bytes exactly as first published."""
    found = []
    for path in sorted(store.deployments.glob("*.json")):
        if path.stem.split("-", 1)[-1] not in deployment_ids:
            continue
        try:
            record = json.loads(path.read_bytes())
            envelope = record["envelope"]
            published = record.get("published")
            if isinstance(published, str):
                payload = published.encode()
            else:  # recorded before "published" existed: the signer's key order
                ordered = {k: envelope[k] for k in _ENVELOPE_ORDER if k in envelope}
                payload = json.dumps(ordered | envelope, separators=(",", ":")).encode()
            found.append(IssuedDeployment(record["deployment"], envelope, payload))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "unreadable deployment record", extra={"path": str(path), "reason": str(exc)}
            )
    return found


ObservationSource = Callable[[ro.RolloutPlan], Mapping[str, ro.DeviceObservation]]


class RolloutDriver:
    """Performs the actions of ``rollout.decide`` for the rollouts whose lease it holds."""

    def __init__(
        self,
        store: ArtifactStore,
        book: RolloutBook,
        client: MqttClient,
        prefix: str,
        key: ec.EllipticCurvePrivateKey,
        owner: str,
        clock: Callable[[], float] = time.time,
        lease_ttl_s: float = LEASE_TTL_S,
        envelopes: PublishedEnvelopes | None = None,
    ) -> None:
        self.store = store
        self.book = book
        self.client = client
        self.prefix = prefix
        self.key = key
        self.owner = owner
        self.clock = clock
        self.lease_ttl_s = lease_ttl_s
        # Where issued deployments are registered before they are published, so that
        # the devices' reports bind and their chunk requests are granted.
        self.envelopes = envelopes
        self._republished: set[str] = set()

    def _issue(
        self, plan: ro.RolloutPlan, version: int, devices: tuple[str, ...], downgrade: bool
    ) -> list[IssuedDeployment]:
        issued = []
        for start in range(0, len(devices), MAX_DEVICES):
            issued.append(
                issue_deployment(
                    self.store,
                    plan.model,
                    version,
                    devices[start : start + MAX_DEVICES],
                    self.key,
                    expires_in_s=plan.expires_in_s,
                    allow_downgrade=downgrade,
                    probation_s=plan.probation_s,
                )
            )
        return issued

    async def _publish(self, issued: list[IssuedDeployment]) -> None:
        if self.envelopes is not None:
            self.envelopes.add_all(issued)
        for deployment in issued:
            for device in deployment.deployment["devices"]:
                await self.client.publish(
                    desired_topic(self.prefix, device), deployment.payload, qos=1, retain=True
                )

    async def republish_current(self, state: ro.RolloutState) -> None:
        """After taking a rollout over: publish its current wave's deployments again
        (the same envelopes; a device ignores one it has seen)."""
        rid = state.plan.rollout_id
        if rid in self._republished:
            return
        self._republished.add(rid)
        ids: set[str] = set()
        index = state.current_wave
        if index is not None and state.waves[index].status in ("deployed", "soaking"):
            ids |= set(state.waves[index].deployments.values())
        ids |= set(state.rollback_deployments.values())
        if ids:
            await self._publish(recorded_deployments(self.store, ids))

    async def step(self, rollout_id: str, observe: ObservationSource) -> ro.RolloutState | None:
        """One step of one rollout, if this driver holds (or gets) its lease.

        Returns the state after the step, or None if another controller drives it.
        """
        now = self.clock()
        if not self.book.acquire(rollout_id, self.owner, now, self.lease_ttl_s):
            return None
        state = self.book.load(rollout_id)
        if state.finished:
            self.book.release(rollout_id, self.owner)
            return state
        await self.republish_current(state)
        observations = observe(state.plan)
        decision = ro.decide(state, observations, now)
        with self.book.locked():
            # An operator command may have landed since the load: decide again on
            # the fresh state if so, so that a pause or abort always wins.
            fresh = self.book.load(rollout_id)
            if fresh != state:
                decision = ro.decide(fresh, observations, now)
            self.book.save(decision.state)
        state = decision.state
        for action in decision.actions:
            state = await self._perform(state, action)
        if state.finished:
            self.book.release(rollout_id, self.owner)
        return state

    async def _perform(self, state: ro.RolloutState, action: ro.Action) -> ro.RolloutState:
        rid = state.plan.rollout_id
        plan = state.plan
        if isinstance(action, ro.DeployWave):
            self.book.update(rid, lambda s: ro.wave_deploying(s, action.wave, self.clock()))
            issued = self._issue(plan, plan.version, action.devices, downgrade=False)
            ids = {d: i.deployment_id for i in issued for d in i.deployment["devices"]}
            state = self.book.update(
                rid, lambda s: ro.wave_deployed(s, action.wave, ids, self.clock())
            )
            await self._publish(issued)
            log.info(
                "rollout wave deployed",
                extra={"rollout": rid, "wave": action.wave + 1, "devices": len(ids)},
            )
            return state
        issued = []
        for version, devices in action.by_version.items():
            issued += self._issue(plan, version, devices, downgrade=True)
        ids = {d: i.deployment_id for i in issued for d in i.deployment["devices"]}
        state = self.book.update(rid, lambda s: ro.rolled_back(s, ids, self.clock()))
        await self._publish(issued)
        log.warning("rollout rolled back", extra={"rollout": rid, "devices": len(ids)})
        return state


def owner_id(label: str) -> str:
    """A lease owner unique to this process, e.g. ``serve edge-controller-a pid 4242 on host``."""
    return f"{label} pid {os.getpid()} on {os.uname().nodename}"
