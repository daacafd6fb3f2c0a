"""Staged rollouts as a pure state machine (no I/O, no clock: ``now`` is an argument).

A rollout deploys one model version to a group of devices in waves: the first
wave (a percentage or a count of the group), then the rest in waves of
``wave_size``. A wave passes once every device in it reports the rollout's
deployment ``Active``/``SUCCEEDED`` and then stays healthy (error rate, p99
latency, drift within the plan's thresholds) for ``soak_s`` seconds; only then is
the next wave deployed. A device that fails, rolls back, or turns unhealthy, or
a wave that does not succeed within ``wave_timeout_s``, halts the rollout; with
``rollback_on_halt`` the failed wave's devices are then sent a new deployment of
the version they ran before (``allow_downgrade``).

:func:`decide` is the only step function: it takes the state and what devices
reported, and returns the next state plus the actions for the driver
(:class:`DeployWave`, :class:`RollBack`). The driver performs an action and
reports back with :func:`wave_deployed` / :func:`rolled_back`; until it does,
``decide`` asks again (a crash between deciding and recording repeats the
action, never skips it; a deployment is recorded before it is published, so a
repeat never sends two different deployments to one device). Operator commands
(pause, resume, abort) go through :func:`command`.

States: ``running`` -> ``completed`` | ``halted`` | ``aborted``; ``running``
<-> ``paused``. Each wave: ``pending`` -> ``deploying`` -> ``deployed`` ->
``soaking`` -> ``passed`` | ``failed``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from agent.errors import AgentError

ROLLOUT_SCHEMA: Final = "edge.rollout"
ROLLOUT_VERSION: Final = 1
HISTORY_LIMIT: Final = 200

RolloutStatus = Literal["running", "paused", "halted", "aborted", "completed"]
WaveStatus = Literal["pending", "deploying", "deployed", "soaking", "passed", "failed"]
Command = Literal["pause", "resume", "abort"]

FINISHED: Final = frozenset({"aborted", "completed"})
_ACTIVE_JOB_PHASES: Final = frozenset({"Active"})
_FAILED_PHASES: Final = frozenset({"Failed", "RolledBack"})
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(%?)\Z")


class RolloutError(AgentError):
    """A rollout cannot be planned, or a command does not apply in its state."""

    code = "rollout_invalid"


# --------------------------------------------------------------------------- planning


def parse_size(text: str, what: str) -> tuple[float, bool]:
    """``"10%"`` -> (10.0, True); ``"25"`` -> (25.0, False). Raises RolloutError."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise RolloutError(f"{what} {text!r}: a count (e.g. 5) or a percentage (e.g. 10%)")
    value = float(match.group(1))
    percent = bool(match.group(2))
    if percent and not 0 < value <= 100:
        raise RolloutError(f"{what} {text!r}: a percentage above 0 and at most 100")
    if not percent and (value < 1 or value != int(value)):
        raise RolloutError(f"{what} {text!r}: a whole count of at least 1")
    return value, percent


def _count(size: tuple[float, bool], total: int) -> int:
    value, percent = size
    wanted = math.ceil(total * value / 100 - 1e-9) if percent else int(value)
    return max(1, min(total, wanted))


def plan_waves(
    devices: Sequence[str], first: str = "10%", wave_size: str | None = None
) -> tuple[tuple[str, ...], ...]:
    """Split ``devices`` (in the given order) into waves.

    ``first``: the first wave's size; ``wave_size``: each later wave's size (both
    a count or a percentage of the whole group); by default the rest is one wave.
    """
    if not devices:
        raise RolloutError("the group has no devices")
    if len(set(devices)) != len(devices):
        raise RolloutError("a device is listed twice")
    total = len(devices)
    head = _count(parse_size(first, "--first"), total)
    later = total - head
    step = _count(parse_size(wave_size, "--wave-size"), total) if wave_size else max(later, 1)
    waves = [tuple(devices[:head])]
    for start in range(head, total, step):
        waves.append(tuple(devices[start : start + step]))
    return tuple(waves)


@dataclass(frozen=True)
class Thresholds:
    """When a device of a soaking wave counts as unhealthy (None: not checked)."""

    max_error_rate: float | None = 0.05
    max_p99_ms: float | None = None
    halt_on_drift: bool = True
    max_failed_devices: int = 0  # failures tolerated per wave before halting


@dataclass(frozen=True)
class RolloutPlan:
    rollout_id: str
    model: str
    version: int
    group: str
    waves: tuple[tuple[str, ...], ...]
    previous: Mapping[str, int | None]  # each device's version of the model at planning time
    soak_s: float = 60.0
    wave_timeout_s: float = 3600.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    rollback_on_halt: bool = False
    expires_in_s: int = 7 * 24 * 3600
    probation_s: int = 60
    created_at: float = 0.0

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for wave in self.waves for d in wave)


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class DeviceObservation:
    """What the controller knows about one device, for the rollout's model."""

    online: bool | None = None
    active_version: int | None = None
    job_deployment_id: str | None = None
    job_phase: str | None = None
    job_status: str | None = None
    job_reason: str = ""
    health_at: float | None = None  # when the latest health message was received
    error_rate: float | None = None  # of the rollout's version, over the last interval
    p99_ms: float | None = None
    drift: str | None = None  # drift status of the rollout's version: ok / warn / drift / ...


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class WaveState:
    status: WaveStatus = "pending"
    deployments: Mapping[str, str] = field(default_factory=dict)  # device -> deployment id
    deployed_at: float | None = None
    succeeded_at: float | None = None  # every device SUCCEEDED: the soak started
    finished_at: float | None = None
    failures: Mapping[str, str] = field(default_factory=dict)  # device -> why


@dataclass(frozen=True)
class RolloutState:
    plan: RolloutPlan
    status: RolloutStatus = "running"
    waves: tuple[WaveState, ...] = ()
    halt_reason: str = ""
    rollback: Literal["none", "pending", "done"] = "none"
    rollback_deployments: Mapping[str, str] = field(default_factory=dict)  # device -> id
    updated_at: float = 0.0
    history: tuple[tuple[float, str], ...] = ()

    @property
    def current_wave(self) -> int | None:
        """Index of the first wave that has not passed (None: all passed)."""
        for index, wave in enumerate(self.waves):
            if wave.status != "passed":
                return index
        return None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED or (self.status == "halted" and self.rollback != "pending")

    def counts(self) -> dict[str, int]:
        """Devices per outcome so far (for progress output)."""
        passed = sum(len(w.deployments) for w in self.waves if w.status == "passed")
        failed = sum(len(w.failures) for w in self.waves)
        return {"devices": len(self.plan.devices), "passed": passed, "failed": failed}


def new_rollout(plan: RolloutPlan, now: float) -> RolloutState:
    if not plan.waves or any(not wave for wave in plan.waves):
        raise RolloutError("a rollout needs at least one wave and no empty wave")
    if len(set(plan.devices)) != len(plan.devices):
        raise RolloutError("a device is in two waves")
    if plan.soak_s < 0 or plan.wave_timeout_s <= 0:
        raise RolloutError("soak must be >= 0 and the wave timeout > 0")
    state = RolloutState(plan=plan, waves=tuple(WaveState() for _ in plan.waves), updated_at=now)
    return _note(
        state,
        now,
        f"rollout of {plan.model} version {plan.version} to group {plan.group}: "
        f"{len(plan.devices)} devices in {len(plan.waves)} waves",
    )


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class DeployWave:
    """Issue (sign, record, publish) the rollout's version to these devices."""

    wave: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class RollBack:
    """Deploy each device's previous version (``allow_downgrade``); version -> devices."""

    wave: int
    by_version: Mapping[int, tuple[str, ...]]


Action = DeployWave | RollBack


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    actions: tuple[Action, ...] = ()


# --------------------------------------------------------------------------- transitions


def _note(state: RolloutState, now: float, text: str) -> RolloutState:
    history = (*state.history, (now, text))[-HISTORY_LIMIT:]
    return replace(state, history=history, updated_at=now)


def _set_wave(state: RolloutState, index: int, wave: WaveState) -> RolloutState:
    waves = list(state.waves)
    waves[index] = wave
    return replace(state, waves=tuple(waves))


def command(state: RolloutState, what: Command, now: float) -> RolloutState:
    """An operator's pause / resume / abort; raises RolloutError if it does not apply."""
    if what == "pause":
        if state.status != "running":
            raise RolloutError(f"cannot pause a rollout that is {state.status}")
        return _note(replace(state, status="paused"), now, "paused by the operator")
    if what == "resume":
        if state.status != "paused":
            raise RolloutError(f"cannot resume a rollout that is {state.status}")
        return _note(replace(state, status="running"), now, "resumed by the operator")
    if what == "abort":
        if state.status in FINISHED:
            raise RolloutError(f"cannot abort a rollout that is {state.status}")
        return _note(replace(state, status="aborted"), now, "aborted by the operator")
    raise RolloutError(f"unknown command {what!r}")


def wave_deploying(state: RolloutState, index: int, now: float) -> RolloutState:
    """The driver is about to issue the wave's deployments (persisted first)."""
    wave = state.waves[index]
    if wave.status not in ("pending", "deploying"):
        raise RolloutError(f"wave {index + 1} is {wave.status}, not pending")
    return _set_wave(state, index, replace(wave, status="deploying"))


def wave_deployed(
    state: RolloutState, index: int, deployments: Mapping[str, str], now: float
) -> RolloutState:
    """The driver issued (and recorded) deployments for the wave's devices."""
    wave = state.waves[index]
    if wave.status not in ("pending", "deploying"):
        raise RolloutError(f"wave {index + 1} is {wave.status}; it was already deployed")
    merged = {**wave.deployments, **deployments}
    missing = [d for d in state.plan.waves[index] if d not in merged]
    if missing:
        raise RolloutError(f"wave {index + 1}: no deployment for {', '.join(missing[:5])}")
    state = _set_wave(
        state, index, replace(wave, status="deployed", deployments=merged, deployed_at=now)
    )
    return _note(
        state, now, f"wave {index + 1}/{len(state.waves)} deployed to {len(merged)} devices"
    )


def rolled_back(state: RolloutState, deployments: Mapping[str, str], now: float) -> RolloutState:
    """The driver issued the roll-back deployments."""
    if state.rollback != "pending":
        raise RolloutError("no roll back is pending")
    state = replace(
        state,
        rollback="done",
        rollback_deployments={**state.rollback_deployments, **deployments},
    )
    return _note(state, now, f"rolled back {len(deployments)} devices to their previous version")


def judge_device(
    plan: RolloutPlan, deployment_id: str, seen: DeviceObservation | None, since: float
) -> tuple[str, str]:
    """``("succeeded" | "pending" | "failed", why)`` for one device of a deployed wave.

    Health and drift count only from messages received after ``since`` (the wave's
    deployment), and only once the device runs the new version.
    """
    if seen is None or seen.job_deployment_id != deployment_id:
        return "pending", "no report for this deployment yet"
    if seen.job_phase in _FAILED_PHASES:
        reason = seen.job_reason or (seen.job_status or "").lower()
        return "failed", f"{seen.job_phase}/{seen.job_status} {reason}".strip()
    if seen.job_phase not in _ACTIVE_JOB_PHASES:
        return "pending", f"{seen.job_phase}/{seen.job_status}"
    limits = plan.thresholds
    fresh = seen.health_at is not None and seen.health_at >= since
    rate, p99 = seen.error_rate, seen.p99_ms
    if fresh and limits.max_error_rate is not None and rate is not None and (
        rate > limits.max_error_rate
    ):
        return "failed", f"error rate {rate:.3f} > {limits.max_error_rate:g}"
    if fresh and limits.max_p99_ms is not None and p99 is not None and p99 > limits.max_p99_ms:
        return "failed", f"p99 {p99:.1f} ms > {limits.max_p99_ms:g} ms"
    if limits.halt_on_drift and seen.drift == "drift":
        return "failed", "drift detected"
    if seen.job_status == "SUCCEEDED":
        return "succeeded", ""
    return "pending", "Active/IN_PROGRESS (probation)"


def _rollback_targets(
    state: RolloutState, index: int, observations: Mapping[str, DeviceObservation]
) -> dict[int, tuple[str, ...]]:
    """Previous version -> devices of wave ``index`` that do not run it (known ones only)."""
    plan = state.plan
    out: dict[int, list[str]] = {}
    for device in plan.waves[index]:
        previous = plan.previous.get(device)
        if previous is None or previous == plan.version:
            continue
        seen = observations.get(device)
        ours = seen is not None and seen.job_deployment_id == state.waves[index].deployments.get(
            device
        )
        job_over = ours and seen is not None and seen.job_phase in _FAILED_PHASES
        runs_previous = seen is not None and seen.active_version == previous
        if job_over and runs_previous:
            continue  # it stopped (or rolled back) by itself and serves what it did
        out.setdefault(previous, []).append(device)
    return {version: tuple(devices) for version, devices in sorted(out.items())}


def _halt(
    state: RolloutState,
    index: int,
    reason: str,
    observations: Mapping[str, DeviceObservation],
    now: float,
) -> Decision:
    wave = replace(state.waves[index], status="failed", finished_at=now)
    state = _set_wave(state, index, wave)
    state = _note(replace(state, status="halted", halt_reason=reason), now, f"halted: {reason}")
    if not state.plan.rollback_on_halt:
        return Decision(state)
    targets = _rollback_targets(state, index, observations)
    if not targets:
        return Decision(_note(replace(state, rollback="done"), now, "nothing to roll back"))
    state = replace(state, rollback="pending")
    return Decision(state, (RollBack(index, targets),))


def decide(
    state: RolloutState, observations: Mapping[str, DeviceObservation], now: float
) -> Decision:
    """One step: the next state and what the driver must do now."""
    if state.status == "halted" and state.rollback == "pending":
        index = next((i for i, w in enumerate(state.waves) if w.status == "failed"), 0)
        targets = _rollback_targets(state, index, observations)
        if not targets:
            return Decision(_note(replace(state, rollback="done"), now, "nothing to roll back"))
        return Decision(state, (RollBack(index, targets),))
    if state.status != "running":
        return Decision(state)
    current = state.current_wave
    if current is None:
        return Decision(
            _note(replace(state, status="completed"), now, "completed: every wave passed")
        )
    index = current
    wave = state.waves[index]
    devices = state.plan.waves[index]
    if wave.status in ("pending", "deploying"):
        todo = tuple(d for d in devices if d not in wave.deployments)
        return Decision(state, (DeployWave(index, todo),))
    deployed_at = wave.deployed_at if wave.deployed_at is not None else now
    failures: dict[str, str] = {}
    waiting: dict[str, str] = {}
    for device in devices:
        verdict, why = judge_device(
            state.plan, wave.deployments[device], observations.get(device), deployed_at
        )
        if verdict == "failed":
            failures[device] = why
        elif verdict == "pending":
            waiting[device] = why
    label = f"wave {index + 1}/{len(state.waves)}"
    if failures != dict(wave.failures):
        state = _set_wave(state, index, replace(wave, failures=failures))
        wave = state.waves[index]
    if len(failures) > state.plan.thresholds.max_failed_devices:
        first = sorted(failures)[0]
        reason = (
            f"{label}: {len(failures)} of {len(devices)} devices failed "
            f"({first}: {failures[first]})"
        )
        return _halt(state, index, reason, observations, now)
    if waiting:
        if wave.status == "soaking":  # a device went back (re-deployed elsewhere, ...)
            state = _set_wave(state, index, replace(wave, status="deployed", succeeded_at=None))
        if now - deployed_at > state.plan.wave_timeout_s:
            first = sorted(waiting)[0]
            reason = (
                f"{label}: {len(waiting)} of {len(devices)} devices did not succeed within "
                f"{state.plan.wave_timeout_s:g}s ({first}: {waiting[first]})"
            )
            return _halt(state, index, reason, observations, now)
        return Decision(state)
    if wave.status == "deployed":
        state = _set_wave(state, index, replace(wave, status="soaking", succeeded_at=now))
        state = _note(
            state, now, f"{label}: every device succeeded; soaking {state.plan.soak_s:g}s"
        )
        wave = state.waves[index]
    assert wave.succeeded_at is not None
    if now - wave.succeeded_at < state.plan.soak_s:
        return Decision(state)
    state = _set_wave(state, index, replace(wave, status="passed", finished_at=now))
    state = _note(state, now, f"{label} passed")
    if state.current_wave is None:
        return Decision(
            _note(replace(state, status="completed"), now, "completed: every wave passed")
        )
    return decide(state, observations, now)  # deploy the next wave at once


# --------------------------------------------------------------------------- JSON


def plan_to_json(plan: RolloutPlan) -> dict[str, Any]:
    t = plan.thresholds
    return {
        "rollout_id": plan.rollout_id,
        "model": plan.model,
        "model_version": plan.version,
        "group": plan.group,
        "waves": [list(w) for w in plan.waves],
        "previous": dict(plan.previous),
        "soak_s": plan.soak_s,
        "wave_timeout_s": plan.wave_timeout_s,
        "thresholds": {
            "max_error_rate": t.max_error_rate,
            "max_p99_ms": t.max_p99_ms,
            "halt_on_drift": t.halt_on_drift,
            "max_failed_devices": t.max_failed_devices,
        },
        "rollback_on_halt": plan.rollback_on_halt,
        "expires_in_s": plan.expires_in_s,
        "probation_s": plan.probation_s,
        "created_at": plan.created_at,
    }


def plan_from_json(data: Mapping[str, Any]) -> RolloutPlan:
    t = data["thresholds"]
    return RolloutPlan(
        rollout_id=str(data["rollout_id"]),
        model=str(data["model"]),
        version=int(data["model_version"]),
        group=str(data["group"]),
        waves=tuple(tuple(str(d) for d in w) for w in data["waves"]),
        previous={str(k): (None if v is None else int(v)) for k, v in data["previous"].items()},
        soak_s=float(data["soak_s"]),
        wave_timeout_s=float(data["wave_timeout_s"]),
        thresholds=Thresholds(
            max_error_rate=None if t["max_error_rate"] is None else float(t["max_error_rate"]),
            max_p99_ms=None if t["max_p99_ms"] is None else float(t["max_p99_ms"]),
            halt_on_drift=bool(t["halt_on_drift"]),
            max_failed_devices=int(t["max_failed_devices"]),
        ),
        rollback_on_halt=bool(data["rollback_on_halt"]),
        expires_in_s=int(data["expires_in_s"]),
        probation_s=int(data["probation_s"]),
        created_at=float(data["created_at"]),
    )


def state_to_json(state: RolloutState) -> dict[str, Any]:
    return {
        "schema": ROLLOUT_SCHEMA,
        "version": ROLLOUT_VERSION,
        "plan": plan_to_json(state.plan),
        "status": state.status,
        "waves": [
            {
                "status": w.status,
                "deployments": dict(w.deployments),
                "deployed_at": w.deployed_at,
                "succeeded_at": w.succeeded_at,
                "finished_at": w.finished_at,
                "failures": dict(w.failures),
            }
            for w in state.waves
        ],
        "halt_reason": state.halt_reason,
        "rollback": state.rollback,
        "rollback_deployments": dict(state.rollback_deployments),
        "updated_at": state.updated_at,
        "history": [list(h) for h in state.history],
    }


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def state_from_json(data: Mapping[str, Any]) -> RolloutState:
    """Raises RolloutError for anything that is not a rollout document."""
    try:
        if data.get("schema") != ROLLOUT_SCHEMA or data.get("version") != ROLLOUT_VERSION:
            raise RolloutError(f"not an {ROLLOUT_SCHEMA} v{ROLLOUT_VERSION} document")
        waves = tuple(
            WaveState(
                status=w["status"],
                deployments={str(k): str(v) for k, v in w["deployments"].items()},
                deployed_at=_opt_float(w["deployed_at"]),
                succeeded_at=_opt_float(w["succeeded_at"]),
                finished_at=_opt_float(w["finished_at"]),
                failures={str(k): str(v) for k, v in w["failures"].items()},
            )
            for w in data["waves"]
        )
        state = RolloutState(
            plan=plan_from_json(data["plan"]),
            status=data["status"],
            waves=waves,
            halt_reason=str(data["halt_reason"]),
            rollback=data["rollback"],
            rollback_deployments={str(k): str(v) for k, v in data["rollback_deployments"].items()},
            updated_at=float(data["updated_at"]),
            history=tuple((float(t), str(text)) for t, text in data["history"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RolloutError(f"malformed rollout document ({exc!r})") from None
    if state.status not in ("running", "paused", "halted", "aborted", "completed"):
        raise RolloutError(f"unknown rollout status {state.status!r}")
    if len(state.waves) != len(state.plan.waves):
        raise RolloutError("wave count differs from the plan")
    return state
