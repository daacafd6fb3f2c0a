"""The update life cycle as a pure state machine.

::

    Idle -> Offered -> Downloading -> Verified -> Validating -> Activating -> Active
                 \\____________\\___________\\___________\\____________\\-> Failed
                                                          Active (probation) -> RolledBack

A job's state is a phase plus the AWS IoT Jobs status reported with it:

===========  ===========================================================
phase        status
===========  ===========================================================
Idle         (no job)
Offered      QUEUED
Downloading  IN_PROGRESS
Verified     IN_PROGRESS
Validating   IN_PROGRESS
Activating   IN_PROGRESS
Active       IN_PROGRESS during probation, then SUCCEEDED
Failed       FAILED, TIMED_OUT or CANCELED (REJECTED for a deployment
             that never became a job: see :func:`rejected`)
RolledBack   FAILED (the new version misbehaved during probation; the
             last known good version serves again)
===========  ===========================================================

``apply`` is the only way to move: an event that is not allowed in the
current state raises :class:`IllegalTransitionError` and the state stays as it
was. ``recovery`` says what the orchestrator must do with a persisted state
after a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from agent.errors import AgentError


class Phase(enum.StrEnum):
    IDLE = "Idle"
    OFFERED = "Offered"
    DOWNLOADING = "Downloading"
    VERIFIED = "Verified"
    VALIDATING = "Validating"
    ACTIVATING = "Activating"
    ACTIVE = "Active"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"


class JobStatus(enum.StrEnum):
    """The AWS IoT Jobs execution statuses."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"


class Event(enum.StrEnum):
    OFFER = "offer"  # a verified deployment was accepted: a new job
    START_DOWNLOAD = "start_download"
    DOWNLOAD_VERIFIED = "download_verified"  # files complete, digests and model signature good
    START_VALIDATION = "start_validation"
    VALIDATION_PASSED = "validation_passed"
    ACTIVATED = "activated"  # the new version serves; probation begins
    PROBATION_PASSED = "probation_passed"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    ROLL_BACK = "roll_back"  # probation failed; the last known good version serves again


class Reason:
    """Stable reason codes for job failures (deployment rejections use their error's code)."""

    SUPERSEDED: Final = "superseded"  # a newer deployment replaced a job before activation
    DOWNLOAD_TIMED_OUT: Final = "download_timed_out"  # a chunk got no answer, retries used up
    # The whole transfer took longer than fleet.download_timeout_s.
    DOWNLOAD_DEADLINE_EXCEEDED: Final = "download_deadline_exceeded"
    ARTIFACT_NOT_FOUND: Final = "artifact_not_found"
    CHUNK_INVALID: Final = "chunk_invalid"
    DIGEST_MISMATCH: Final = "digest_mismatch"
    STORAGE_FAILED: Final = "storage_failed"
    VALIDATION_FAILED: Final = "validation_failed"
    ACTIVATION_FAILED: Final = "activation_failed"
    PROBATION_FAILED: Final = "probation_failed"
    CRASH_LOOP: Final = "crash_loop"  # the agent kept dying in this phase
    INTERRUPTED: Final = "interrupted"


class IllegalTransitionError(AgentError):
    """An event that the current phase does not allow (a bug in the orchestrator)."""

    code = "illegal_transition"


@dataclass(frozen=True, slots=True)
class JobState:
    phase: Phase
    status: JobStatus | None  # None only in Idle
    reason_code: str = ""

    @property
    def terminal(self) -> bool:
        return self.phase in (Phase.FAILED, Phase.ROLLED_BACK) or (
            self.phase is Phase.ACTIVE and self.status is JobStatus.SUCCEEDED
        )

    @property
    def busy(self) -> bool:
        """A job is under way (not idle, not finished)."""
        return self.phase is not Phase.IDLE and not self.terminal

    @property
    def cancellable(self) -> bool:
        """Nothing has changed on the serving side yet: a newer deployment may replace it."""
        return self.phase in _CANCELLABLE

    @property
    def in_probation(self) -> bool:
        return self.phase is Phase.ACTIVE and self.status is JobStatus.IN_PROGRESS


IDLE: Final = JobState(Phase.IDLE, None)

_CANCELLABLE: Final = frozenset(
    {Phase.OFFERED, Phase.DOWNLOADING, Phase.VERIFIED, Phase.VALIDATING}
)
_FAILABLE: Final = frozenset(_CANCELLABLE | {Phase.ACTIVATING})
_STEPS: Final[dict[tuple[Phase, Event], Phase]] = {
    (Phase.OFFERED, Event.START_DOWNLOAD): Phase.DOWNLOADING,
    (Phase.DOWNLOADING, Event.DOWNLOAD_VERIFIED): Phase.VERIFIED,
    (Phase.VERIFIED, Event.START_VALIDATION): Phase.VALIDATING,
    (Phase.VALIDATING, Event.VALIDATION_PASSED): Phase.ACTIVATING,
    (Phase.ACTIVATING, Event.ACTIVATED): Phase.ACTIVE,
}
_FAILURES: Final[dict[Event, tuple[frozenset[Phase], JobStatus]]] = {
    Event.FAIL: (_FAILABLE, JobStatus.FAILED),
    Event.TIME_OUT: (frozenset({Phase.OFFERED, Phase.DOWNLOADING}), JobStatus.TIMED_OUT),
    Event.CANCEL: (_CANCELLABLE, JobStatus.CANCELED),
}

# Every state the machine can be in; anything else is a bug.
LEGAL_STATES: Final = frozenset(
    {(Phase.IDLE, None), (Phase.OFFERED, JobStatus.QUEUED)}
    | {(p, JobStatus.IN_PROGRESS) for p in (Phase.DOWNLOADING, Phase.VERIFIED,
                                           Phase.VALIDATING, Phase.ACTIVATING, Phase.ACTIVE)}
    | {(Phase.ACTIVE, JobStatus.SUCCEEDED), (Phase.ROLLED_BACK, JobStatus.FAILED)}
    | {(Phase.FAILED, s) for s in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELED)}
)


def _illegal(state: JobState, event: Event) -> IllegalTransitionError:
    status = f"/{state.status}" if state.status else ""
    return IllegalTransitionError(f"event {event} is not allowed in {state.phase}{status}")


def apply(state: JobState, event: Event, reason_code: str = "") -> JobState:
    """The state after ``event``; ``reason_code`` is required for FAIL, TIME_OUT, CANCEL, ROLL_BACK.

    Raises IllegalTransitionError (and nothing changes) if ``event`` is not allowed.
    """
    failing = event in _FAILURES or event is Event.ROLL_BACK
    if failing and not reason_code:
        raise IllegalTransitionError(f"event {event} needs a reason code")
    if not failing and reason_code:
        raise IllegalTransitionError(f"event {event} takes no reason code")
    if event is Event.OFFER:
        if state.busy:
            raise _illegal(state, event)
        return JobState(Phase.OFFERED, JobStatus.QUEUED)
    if event is Event.PROBATION_PASSED:
        if not state.in_probation:
            raise _illegal(state, event)
        return JobState(Phase.ACTIVE, JobStatus.SUCCEEDED)
    if event is Event.ROLL_BACK:
        if not state.in_probation:
            raise _illegal(state, event)
        return JobState(Phase.ROLLED_BACK, JobStatus.FAILED, reason_code)
    if event in _FAILURES:
        phases, status = _FAILURES[event]
        if state.phase not in phases:
            raise _illegal(state, event)
        return JobState(Phase.FAILED, status, reason_code)
    following = _STEPS.get((state.phase, event))
    if following is None:
        raise _illegal(state, event)
    return JobState(following, JobStatus.IN_PROGRESS)


def rejected(reason_code: str) -> JobState:
    """How a deployment that never became a job is reported (the device's job is untouched)."""
    return JobState(Phase.FAILED, JobStatus.REJECTED, reason_code)


def from_names(phase: str, status: str | None, reason_code: str = "") -> JobState:
    """A persisted state back from its names; ValueError if it is not a legal state."""
    state = JobState(Phase(phase), JobStatus(status) if status else None, reason_code)
    if (state.phase, state.status) not in LEGAL_STATES:
        raise ValueError(f"{phase}/{status} is not a state of the update life cycle")
    return state


class Recovery(enum.Enum):
    """What to do with a job found in the state directory at start-up."""

    NOTHING = "nothing"  # idle or finished
    DOWNLOAD = "download"  # (re)start or resume the download, then carry on
    VALIDATE = "validate"  # re-verify what was staged, then validate
    ACTIVATE = "activate"  # finish the activation (the previous version serves meanwhile)
    PROBATION = "probation"  # the new version serves; watch it again


_RECOVERY: Final[dict[Phase, Recovery]] = {
    Phase.OFFERED: Recovery.DOWNLOAD,
    Phase.DOWNLOADING: Recovery.DOWNLOAD,
    Phase.VERIFIED: Recovery.VALIDATE,
    Phase.VALIDATING: Recovery.VALIDATE,
    Phase.ACTIVATING: Recovery.ACTIVATE,
    Phase.ACTIVE: Recovery.PROBATION,
}


def recovery(state: JobState) -> Recovery:
    if not state.busy:
        return Recovery.NOTHING
    return _RECOVERY[state.phase]
