"""The update life cycle state machine: every transition, every illegal one, random walks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fleet.lifecycle import (
    IDLE,
    LEGAL_STATES,
    Event,
    IllegalTransitionError,
    JobState,
    JobStatus,
    Phase,
    Reason,
    Recovery,
    apply,
    from_names,
    recovery,
    rejected,
)

NEEDS_REASON = {Event.FAIL, Event.TIME_OUT, Event.CANCEL, Event.ROLL_BACK}
HAPPY_PATH = [
    Event.OFFER,
    Event.START_DOWNLOAD,
    Event.DOWNLOAD_VERIFIED,
    Event.START_VALIDATION,
    Event.VALIDATION_PASSED,
    Event.ACTIVATED,
    Event.PROBATION_PASSED,
]
ALL_STATES = [
    JobState(phase, status, "x" if status in _FAILED else "")
    for phase, status in sorted(LEGAL_STATES, key=str)
    for _FAILED in [{JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELED}]
]


def step(state: JobState, event: Event) -> JobState:
    return apply(state, event, "because" if event in NEEDS_REASON else "")


def test_the_happy_path_reaches_active_succeeded() -> None:
    state = IDLE
    seen = []
    for event in HAPPY_PATH:
        state = step(state, event)
        seen.append((str(state.phase), str(state.status)))
    assert seen == [
        ("Offered", "QUEUED"),
        ("Downloading", "IN_PROGRESS"),
        ("Verified", "IN_PROGRESS"),
        ("Validating", "IN_PROGRESS"),
        ("Activating", "IN_PROGRESS"),
        ("Active", "IN_PROGRESS"),
        ("Active", "SUCCEEDED"),
    ]
    assert state.terminal and not state.busy


# The complete transition table: (phase, status) x event -> (phase, status) or None (illegal).
EXPECTED: dict[tuple[Phase, JobStatus | None], dict[Event, tuple[Phase, JobStatus] | None]] = {}


def _expected(state: JobState, event: Event) -> tuple[Phase, JobStatus] | None:
    p, s = state.phase, state.status
    terminal = p in (Phase.FAILED, Phase.ROLLED_BACK) or (
        p is Phase.ACTIVE and s is JobStatus.SUCCEEDED
    )
    if event is Event.OFFER:
        return (Phase.OFFERED, JobStatus.QUEUED) if p is Phase.IDLE or terminal else None
    nxt = {
        (Phase.OFFERED, Event.START_DOWNLOAD): Phase.DOWNLOADING,
        (Phase.DOWNLOADING, Event.DOWNLOAD_VERIFIED): Phase.VERIFIED,
        (Phase.VERIFIED, Event.START_VALIDATION): Phase.VALIDATING,
        (Phase.VALIDATING, Event.VALIDATION_PASSED): Phase.ACTIVATING,
        (Phase.ACTIVATING, Event.ACTIVATED): Phase.ACTIVE,
    }.get((p, event))
    if nxt is not None:
        return nxt, JobStatus.IN_PROGRESS
    probation = p is Phase.ACTIVE and s is JobStatus.IN_PROGRESS
    if event is Event.PROBATION_PASSED:
        return (Phase.ACTIVE, JobStatus.SUCCEEDED) if probation else None
    if event is Event.ROLL_BACK:
        return (Phase.ROLLED_BACK, JobStatus.FAILED) if probation else None
    before_activation = {Phase.OFFERED, Phase.DOWNLOADING, Phase.VERIFIED, Phase.VALIDATING}
    if event is Event.FAIL:
        return (Phase.FAILED, JobStatus.FAILED) if p in before_activation | {
            Phase.ACTIVATING
        } else None
    if event is Event.CANCEL:
        return (Phase.FAILED, JobStatus.CANCELED) if p in before_activation else None
    if event is Event.TIME_OUT:
        return (
            (Phase.FAILED, JobStatus.TIMED_OUT)
            if p in (Phase.OFFERED, Phase.DOWNLOADING)
            else None
        )
    return None


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(ALL_STATES, list(Event))), ids=str
)
def test_every_state_and_event(state: JobState, event: Event) -> None:
    expected = _expected(state, event)
    if expected is None:
        with pytest.raises(IllegalTransitionError):
            step(state, event)
        return
    after = step(state, event)
    assert (after.phase, after.status) == expected
    assert (after.phase, after.status) in LEGAL_STATES
    assert bool(after.reason_code) == (event in NEEDS_REASON)


def test_failure_events_need_a_reason_and_others_refuse_one() -> None:
    downloading = step(step(IDLE, Event.OFFER), Event.START_DOWNLOAD)
    with pytest.raises(IllegalTransitionError, match="reason"):
        apply(downloading, Event.FAIL)
    with pytest.raises(IllegalTransitionError, match="reason"):
        apply(downloading, Event.DOWNLOAD_VERIFIED, "why")
    failed = apply(downloading, Event.FAIL, Reason.DIGEST_MISMATCH)
    assert failed == JobState(Phase.FAILED, JobStatus.FAILED, "digest_mismatch")


def test_rollback_is_only_possible_during_probation() -> None:
    state = IDLE
    for event in HAPPY_PATH[:-1]:
        state = step(state, event)
    assert state.in_probation
    rolled = apply(state, Event.ROLL_BACK, Reason.PROBATION_FAILED)
    assert rolled == JobState(Phase.ROLLED_BACK, JobStatus.FAILED, "probation_failed")
    assert rolled.terminal
    # Probation passed: nothing rolls back any more.
    done = step(state, Event.PROBATION_PASSED)
    with pytest.raises(IllegalTransitionError):
        apply(done, Event.ROLL_BACK, Reason.PROBATION_FAILED)


def test_cancellable_only_before_activation() -> None:
    state = IDLE
    flags = []
    for event in HAPPY_PATH:
        state = step(state, event)
        flags.append(state.cancellable)
    assert flags == [True, True, True, True, False, False, False]


def test_rejected_is_a_report_not_a_state_of_the_device_job() -> None:
    report = rejected("sequence_replayed")
    assert report.status is JobStatus.REJECTED
    assert (report.phase, report.status) not in LEGAL_STATES


def test_persisted_names_round_trip_and_bad_ones_are_refused() -> None:
    for state in ALL_STATES:
        back = from_names(str(state.phase), str(state.status) if state.status else None,
                          state.reason_code)
        assert back == state
    with pytest.raises(ValueError):
        from_names("Active", "QUEUED")
    with pytest.raises(ValueError):
        from_names("Bogus", "FAILED")


@pytest.mark.parametrize(
    ("phase", "status", "action"),
    [
        ("Idle", None, Recovery.NOTHING),
        ("Offered", "QUEUED", Recovery.DOWNLOAD),
        ("Downloading", "IN_PROGRESS", Recovery.DOWNLOAD),
        ("Verified", "IN_PROGRESS", Recovery.VALIDATE),
        ("Validating", "IN_PROGRESS", Recovery.VALIDATE),
        ("Activating", "IN_PROGRESS", Recovery.ACTIVATE),
        ("Active", "IN_PROGRESS", Recovery.PROBATION),
        ("Active", "SUCCEEDED", Recovery.NOTHING),
        ("Failed", "FAILED", Recovery.NOTHING),
        ("Failed", "CANCELED", Recovery.NOTHING),
        ("RolledBack", "FAILED", Recovery.NOTHING),
    ],
)
def test_recovery_after_a_restart(phase: str, status: str | None, action: Recovery) -> None:
    assert recovery(from_names(phase, status, "r" if status in ("FAILED", "CANCELED") else ""))\
        is action


RANK = {
    Phase.OFFERED: 1,
    Phase.DOWNLOADING: 2,
    Phase.VERIFIED: 3,
    Phase.VALIDATING: 4,
    Phase.ACTIVATING: 5,
    Phase.ACTIVE: 6,
    Phase.FAILED: 7,
    Phase.ROLLED_BACK: 7,
}


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Event)), st.sampled_from(["", "r"])), max_size=60))
def test_random_event_sequences_never_reach_an_illegal_state(
    events: list[tuple[Event, str]],
) -> None:
    state = IDLE
    activated_in_job = False
    for event, reason in events:
        before = state
        try:
            state = apply(state, event, reason)
        except IllegalTransitionError:
            assert state == before  # a refused event changes nothing
            continue
        assert (state.phase, state.status) in LEGAL_STATES
        assert state.status is not None
        if event is Event.OFFER:
            assert before.phase is Phase.IDLE or before.terminal
            activated_in_job = False
        else:
            # Within a job, phases only move forward.
            assert RANK[state.phase] >= RANK[before.phase]
        if event is Event.ACTIVATED:
            activated_in_job = True
        if state.phase is Phase.ROLLED_BACK or state.status is JobStatus.SUCCEEDED:
            assert activated_in_job  # only a version that was activated succeeds or rolls back
        assert bool(state.reason_code) == (
            state.status in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELED)
        )
        assert state.busy == (not state.terminal)
        assert recovery(state) is not Recovery.NOTHING or state.terminal
