"""The staged-rollout state machine (agent/controller/rollout.py) and the fleet view,
pure: every transition, halts, roll backs, commands, JSON round trips, and a
property test that drives random device behaviour through whole rollouts."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controller import fleetview
from agent.controller import rollout as ro
from agent.controller.deploy import issue_deployment
from agent.controller.rollout_driver import RolloutBook, recorded_deployments
from agent.controller.store import ArtifactStore
from agent.signing.keys import TrustStore
from tests.fleet_device import make_signed_version, make_signing_keys

OK = ro.DeviceObservation


def plan(
    devices: list[str], first: str = "1", size: str | None = None, **kw: object
) -> ro.RolloutPlan:
    values: dict[str, object] = {
        "rollout_id": "r-1",
        "model": "m",
        "version": 3,
        "group": "g",
        "waves": ro.plan_waves(devices, first, size),
        "previous": {d: 2 for d in devices},
        "soak_s": 10.0,
        "wave_timeout_s": 100.0,
    }
    values |= kw
    return ro.RolloutPlan(**values)  # type: ignore[arg-type]


def succeeded(dep: str, **kw: object) -> ro.DeviceObservation:
    base = OK(
        online=True,
        active_version=3,
        job_deployment_id=dep,
        job_phase="Active",
        job_status="SUCCEEDED",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def deploy(state: ro.RolloutState, now: float) -> tuple[ro.RolloutState, dict[str, str]]:
    decision = ro.decide(state, {}, now)
    (action,) = decision.actions
    assert isinstance(action, ro.DeployWave)
    ids = {d: f"dep-{action.wave}" for d in action.devices}
    state = ro.wave_deploying(decision.state, action.wave, now)
    return ro.wave_deployed(state, action.wave, ids, now), ids


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    ("n", "first", "size", "sizes"),
    [
        (100, "10%", None, [10, 90]),
        (100, "10%", "25%", [10, 25, 25, 25, 15]),
        (10, "1", "3", [1, 3, 3, 3]),
        (3, "10%", None, [1, 2]),
        (1, "10%", None, [1]),
        (5, "100%", None, [5]),
        (5, "7", None, [5]),
        (7, "33.3%", "50%", [3, 4]),
    ],
)
def test_plan_waves(n: int, first: str, size: str | None, sizes: list[int]) -> None:
    devices = [f"d{i}" for i in range(n)]
    waves = ro.plan_waves(devices, first, size)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == devices


@pytest.mark.parametrize("bad", ["0", "0%", "101%", "-1", "x", "1.5", ""])
def test_plan_waves_refuses_bad_sizes(bad: str) -> None:
    with pytest.raises(ro.RolloutError):
        ro.plan_waves(["a", "b"], bad)


def test_plan_waves_refuses_empty_and_duplicate_groups() -> None:
    with pytest.raises(ro.RolloutError, match="no devices"):
        ro.plan_waves([], "1")
    with pytest.raises(ro.RolloutError, match="twice"):
        ro.plan_waves(["a", "a"], "1")


# --------------------------------------------------------------------------- the happy path


def test_waves_go_out_one_after_another_after_success_and_soak() -> None:
    state = ro.new_rollout(plan(["a", "b", "c"], "1"), 0.0)
    state, ids = deploy(state, 0.0)
    assert state.waves[0].status == "deployed" and ids == {"a": "dep-0"}
    # In progress: nothing happens.
    seen = {"a": OK(job_deployment_id="dep-0", job_phase="Downloading", job_status="IN_PROGRESS")}
    assert ro.decide(state, seen, 5.0).actions == ()
    # Probation (Active/IN_PROGRESS) is not success yet.
    seen = {"a": succeeded("dep-0", job_status="IN_PROGRESS")}
    assert ro.decide(state, seen, 5.0).state.waves[0].status == "deployed"
    # Succeeded: the soak starts; the next wave waits for it.
    seen = {"a": succeeded("dep-0")}
    decision = ro.decide(state, seen, 6.0)
    assert decision.state.waves[0].status == "soaking" and decision.actions == ()
    decision = ro.decide(decision.state, seen, 15.9)
    assert decision.actions == ()
    decision = ro.decide(decision.state, seen, 16.0)
    assert decision.state.waves[0].status == "passed"
    assert decision.actions == (ro.DeployWave(1, ("b", "c")),)
    state = ro.wave_deployed(decision.state, 1, {"b": "dep-1", "c": "dep-1"}, 16.0)
    seen |= {"b": succeeded("dep-1"), "c": succeeded("dep-1")}
    state = ro.decide(state, seen, 17.0).state
    final = ro.decide(state, seen, 27.0).state
    assert final.status == "completed" and final.finished
    assert final.counts() == {"devices": 3, "passed": 3, "failed": 0}
    assert ro.decide(final, seen, 30.0) == ro.Decision(final)


def test_zero_soak_passes_at_once_and_a_report_for_another_deployment_does_not_count() -> None:
    state = ro.new_rollout(plan(["a", "b"], "1", soak_s=0.0), 0.0)
    state, _ = deploy(state, 0.0)
    stale = {"a": succeeded("older-deployment")}
    assert ro.decide(state, stale, 1.0).state.waves[0].status == "deployed"
    decision = ro.decide(state, {"a": succeeded("dep-0")}, 1.0)
    assert decision.actions == (ro.DeployWave(1, ("b",)),)


def test_a_wave_that_goes_back_from_success_restarts_its_soak() -> None:
    state = ro.new_rollout(plan(["a", "b"], "2"), 0.0)
    state, _ = deploy(state, 0.0)
    both = {"a": succeeded("dep-0"), "b": succeeded("dep-0")}
    state = ro.decide(state, both, 1.0).state
    assert state.waves[0].succeeded_at == 1.0
    state = ro.decide(state, {"a": succeeded("dep-0")}, 2.0).state
    assert state.waves[0].status == "deployed" and state.waves[0].succeeded_at is None
    state = ro.decide(state, both, 3.0).state
    assert state.waves[0].succeeded_at == 3.0


# --------------------------------------------------------------------------- halts


@pytest.mark.parametrize(
    ("observation", "why"),
    [
        (
            OK(
                job_deployment_id="dep-0",
                job_phase="Failed",
                job_status="FAILED",
                job_reason="digest_mismatch",
            ),
            "digest_mismatch",
        ),
        (
            OK(
                job_deployment_id="dep-0",
                job_phase="RolledBack",
                job_status="FAILED",
                job_reason="probation_failed",
            ),
            "probation_failed",
        ),
        (
            OK(
                job_deployment_id="dep-0",
                job_phase="Failed",
                job_status="REJECTED",
                job_reason="expired",
            ),
            "expired",
        ),
        (succeeded("dep-0", health_at=5.0, error_rate=0.5), "error rate 0.500 > 0.05"),
        (succeeded("dep-0", job_status="IN_PROGRESS", health_at=5.0, error_rate=0.2), "error rate"),
        (succeeded("dep-0", health_at=5.0, p99_ms=250.0), "p99 250.0 ms > 100 ms"),
        (succeeded("dep-0", drift="drift"), "drift detected"),
    ],
)
def test_failures_and_unhealthy_devices_halt(observation: OK, why: str) -> None:
    p = plan(["a", "b"], "1", thresholds=ro.Thresholds(max_error_rate=0.05, max_p99_ms=100.0))
    state, _ = deploy(ro.new_rollout(p, 0.0), 1.0)
    decision = ro.decide(state, {"a": observation}, 6.0)
    assert decision.state.status == "halted"
    assert why in decision.state.halt_reason
    assert decision.state.waves[0].status == "failed"
    assert decision.state.waves[1].status == "pending"
    assert decision.actions == ()  # no roll back configured
    assert decision.state.finished
    # A halted rollout never deploys again.
    assert ro.decide(decision.state, {"a": succeeded("dep-0")}, 99.0).actions == ()


def test_health_from_before_the_wave_and_thresholds_turned_off_do_not_halt() -> None:
    p = plan(["a"], "1", thresholds=ro.Thresholds(max_error_rate=None, halt_on_drift=False))
    state, _ = deploy(ro.new_rollout(p, 0.0), 10.0)
    seen = {"a": succeeded("dep-0", health_at=11.0, error_rate=0.9, drift="drift")}
    assert ro.decide(state, seen, 12.0).state.status == "running"
    p = plan(["a"], "1")
    state, _ = deploy(ro.new_rollout(p, 0.0), 10.0)
    old = {"a": succeeded("dep-0", health_at=9.0, error_rate=0.9)}
    assert ro.decide(state, old, 12.0).state.status == "running"


def test_failures_up_to_the_tolerance_do_not_halt() -> None:
    p = plan(["a", "b", "c"], "3", thresholds=ro.Thresholds(max_failed_devices=1))
    state, _ = deploy(ro.new_rollout(p, 0.0), 0.0)
    failed = OK(job_deployment_id="dep-0", job_phase="Failed", job_status="FAILED")
    seen = {"a": failed, "b": succeeded("dep-0")}
    decision = ro.decide(state, seen, 1.0)
    assert decision.state.status == "running" and dict(decision.state.waves[0].failures) == {
        "a": "Failed/FAILED failed"
    }
    decision = ro.decide(decision.state, seen | {"c": failed}, 2.0)
    assert decision.state.status == "halted"


def test_a_wave_that_does_not_finish_in_time_halts() -> None:
    state, _ = deploy(ro.new_rollout(plan(["a", "b"], "2"), 0.0), 0.0)
    seen = {"a": succeeded("dep-0")}
    assert ro.decide(state, seen, 100.0).state.status == "running"
    decision = ro.decide(state, seen, 100.5)
    assert decision.state.status == "halted"
    assert "1 of 2 devices did not succeed within 100s (b: no report" in decision.state.halt_reason


def test_halt_rolls_the_failed_wave_back_to_each_devices_previous_version() -> None:
    devices = ["a", "b", "c", "d", "e"]
    previous = {"a": 2, "b": 1, "c": None, "d": 2, "e": 2}
    p = plan(devices, "4", rollback_on_halt=True, previous=previous)
    state, _ = deploy(ro.new_rollout(p, 0.0), 0.0)
    seen = {
        "a": succeeded("dep-0", health_at=1.0, error_rate=0.3),  # bad: serves v3
        "b": succeeded("dep-0"),  # serves v3; was on v1
        "c": succeeded("dep-0"),  # no previous version: cannot roll back
        # failed before activating: still serves v2 -> nothing to do
        "d": OK(
            active_version=2, job_deployment_id="dep-0", job_phase="Failed", job_status="FAILED"
        ),
    }
    decision = ro.decide(state, seen, 2.0)
    assert decision.state.status == "halted" and decision.state.rollback == "pending"
    assert not decision.state.finished
    assert decision.actions == (ro.RollBack(0, {1: ("b",), 2: ("a",)}),)
    # Not recorded (driver crashed): asked again.
    again = ro.decide(decision.state, seen, 3.0)
    assert again.actions == decision.actions
    done = ro.rolled_back(again.state, {"a": "rb-1", "b": "rb-2"}, 4.0)
    assert done.rollback == "done" and done.finished
    assert ro.decide(done, seen, 5.0).actions == ()
    with pytest.raises(ro.RolloutError):
        ro.rolled_back(done, {}, 6.0)


def test_nothing_to_roll_back_finishes_the_halt() -> None:
    p = plan(["a"], "1", rollback_on_halt=True)
    state, _ = deploy(ro.new_rollout(p, 0.0), 0.0)
    seen = {
        "a": OK(
            active_version=2, job_deployment_id="dep-0", job_phase="Failed", job_status="FAILED"
        )
    }
    decision = ro.decide(state, seen, 1.0)
    assert decision.state.rollback == "done" and decision.actions == ()


# --------------------------------------------------------------------------- commands


def test_pause_resume_abort() -> None:
    state = ro.new_rollout(plan(["a", "b"], "1"), 0.0)
    paused = ro.command(state, "pause", 1.0)
    assert paused.status == "paused" and ro.decide(paused, {}, 2.0).actions == ()
    with pytest.raises(ro.RolloutError):
        ro.command(paused, "pause", 2.0)
    resumed = ro.command(paused, "resume", 3.0)
    assert isinstance(ro.decide(resumed, {}, 4.0).actions[0], ro.DeployWave)
    with pytest.raises(ro.RolloutError):
        ro.command(resumed, "resume", 4.0)
    aborted = ro.command(resumed, "abort", 5.0)
    assert aborted.status == "aborted" and aborted.finished
    assert ro.decide(aborted, {}, 6.0).actions == ()
    for what in ("pause", "resume", "abort"):
        with pytest.raises(ro.RolloutError):
            ro.command(aborted, what, 7.0)
    assert [text for _, text in aborted.history][-3:] == [
        "paused by the operator",
        "resumed by the operator",
        "aborted by the operator",
    ]


def test_recording_checks() -> None:
    state = ro.new_rollout(plan(["a", "b"], "2"), 0.0)
    with pytest.raises(ro.RolloutError, match="no deployment for b"):
        ro.wave_deployed(state, 0, {"a": "x"}, 1.0)
    deployed = ro.wave_deployed(state, 0, {"a": "x", "b": "y"}, 1.0)
    with pytest.raises(ro.RolloutError):
        ro.wave_deployed(deployed, 0, {"a": "x", "b": "y"}, 1.0)
    with pytest.raises(ro.RolloutError):
        ro.wave_deploying(deployed, 0, 1.0)
    # A wave half-recorded before a crash re-issues only what is missing.
    partial = replace(
        state, waves=(replace(state.waves[0], status="deploying", deployments={"a": "x"}),)
    )
    assert ro.decide(partial, {}, 2.0).actions == (ro.DeployWave(0, ("b",)),)


def test_new_rollout_validation() -> None:
    good = plan(["a", "b"], "1")
    with pytest.raises(ro.RolloutError):
        ro.new_rollout(replace(good, waves=(("a",), ("a",))), 0.0)
    with pytest.raises(ro.RolloutError):
        ro.new_rollout(replace(good, waves=(("a",), ())), 0.0)
    with pytest.raises(ro.RolloutError):
        ro.new_rollout(replace(good, soak_s=-1.0), 0.0)


# --------------------------------------------------------------------------- JSON / storage


def test_json_round_trip_and_storage(tmp_path: Path) -> None:
    p = plan(
        ["a", "b", "c"],
        "1",
        rollback_on_halt=True,
        thresholds=ro.Thresholds(max_error_rate=None, max_p99_ms=12.5),
    )
    state, _ = deploy(ro.new_rollout(p, 0.0), 1.0)
    state = ro.decide(state, {"a": succeeded("dep-0")}, 2.0).state
    assert ro.state_from_json(ro.state_to_json(state)) == state
    book = RolloutBook(tmp_path)
    book.create(state)
    with pytest.raises(ro.RolloutError, match="exists"):
        book.create(state)
    assert book.ids() == ["r-1"] and book.load("r-1") == state
    paused = book.update("r-1", lambda s: ro.command(s, "pause", 3.0))
    assert book.load("r-1").status == "paused" == paused.status
    with pytest.raises(ro.RolloutError):
        book.load("r-2")
    with pytest.raises(ro.RolloutError):
        book.load("../x")
    for broken in ({}, {"schema": "edge.rollout", "version": 1}, {"schema": "x"}):
        with pytest.raises(ro.RolloutError):
            ro.state_from_json(broken)
    data = ro.state_to_json(state)
    data["status"] = "exploded"
    with pytest.raises(ro.RolloutError):
        ro.state_from_json(data)


def test_leases(tmp_path: Path) -> None:
    book = RolloutBook(tmp_path)
    assert book.acquire("r-1", "one", 100.0, ttl=10.0)
    lease = book.lease("r-1")
    assert lease is not None and (lease.owner, lease.expires_at) == ("one", 110.0)
    assert (lease.pid, lease.host) == (os.getpid(), os.uname().nodename)  # who to look for
    assert book.acquire("r-1", "one", 105.0, ttl=10.0)  # renew
    assert not book.acquire("r-1", "two", 114.0, ttl=10.0)
    assert book.acquire("r-1", "two", 115.1, ttl=10.0)  # expired: taken over
    book.release("r-1", "one")  # not the owner: no effect
    assert not book.acquire("r-1", "one", 116.0)
    book.release("r-1", "two")
    assert book.acquire("r-1", "one", 116.0)


def test_republished_deployments_are_the_bytes_first_published(tmp_path: Path) -> None:
    """A driver taking a rollout over publishes the current wave again; a device knows
    a deployment it has seen by the SHA-256 of the envelope, so the bytes must match
    exactly (else the device verifies it again and rejects it as a replay)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    signing = make_signing_keys(tmp_path / "signing")
    version_dir = make_signed_version(tmp_path / "repo", "m", 1, {"model.onnx": b"x" * 99}, signing)
    store = ArtifactStore(tmp_path / "store")
    store.publish(version_dir, "m", 1, TrustStore.from_directory(signing.trust_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    issued = [issue_deployment(store, "m", 1, [f"d{i}"], key) for i in range(3)]
    wanted = {issued[0].deployment_id, issued[2].deployment_id}
    again = recorded_deployments(store, wanted)
    assert [d.payload for d in again] == [issued[0].payload, issued[2].payload]
    # Records written before the exact bytes were kept: rebuilt in the signer's order.
    for path in store.deployments.glob("*.json"):
        record = json.loads(path.read_bytes())
        del record["published"]
        path.write_text(json.dumps(record, sort_keys=True))
    assert [d.payload for d in recorded_deployments(store, wanted)] == [
        issued[0].payload,
        issued[2].payload,
    ]


# --------------------------------------------------------------------------- property


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 12),
    first=st.sampled_from(["1", "2", "10%", "50%"]),
    size=st.sampled_from([None, "1", "3", "30%"]),
    script=st.lists(st.sampled_from(["ok", "slow", "fail", "sick"]), min_size=12, max_size=12),
    rollback=st.booleans(),
)
def test_random_fleets_never_skip_a_wave_or_deploy_twice(
    n: int, first: str, size: str | None, script: list[str], rollback: bool
) -> None:
    devices = [f"d{i}" for i in range(n)]
    p = plan(devices, first, size, soak_s=2.0, wave_timeout_s=30.0, rollback_on_halt=rollback)
    state = ro.new_rollout(p, 0.0)
    deployed: list[str] = []
    seen: dict[str, ro.DeviceObservation] = {}
    now = 0.0
    for _ in range(200):
        decision = ro.decide(state, seen, now)
        state = decision.state
        for action in decision.actions:
            if isinstance(action, ro.DeployWave):
                # Every earlier wave has passed before a later one goes out.
                assert all(w.status == "passed" for w in state.waves[: action.wave])
                deployed += action.devices
                ids = {d: f"dep-{action.wave}" for d in action.devices}
                state = ro.wave_deployed(
                    ro.wave_deploying(state, action.wave, now), action.wave, ids, now
                )
                for d in action.devices:
                    behaviour = script[int(d[1:])]
                    if behaviour == "ok":
                        seen[d] = succeeded(ids[d])
                    elif behaviour == "fail":
                        seen[d] = OK(
                            active_version=2,
                            job_deployment_id=ids[d],
                            job_phase="Failed",
                            job_status="FAILED",
                        )
                    elif behaviour == "sick":
                        seen[d] = succeeded(ids[d], health_at=now + 1, error_rate=0.9)
            else:
                assert rollback and state.status == "halted"
                state = ro.rolled_back(
                    state, {d: "rb" for v in action.by_version.values() for d in v}, now
                )
        if state.finished:
            break
        now += 1.0
    assert state.finished
    assert len(deployed) == len(set(deployed)), "a device got the rollout twice"
    if state.status == "completed":
        assert sorted(deployed) == sorted(devices)
        assert all(script[int(d[1:])] == "ok" for d in devices)
    else:
        assert state.status == "halted"
        failed = next(i for i, w in enumerate(state.waves) if w.status == "failed")
        assert all(w.status == "pending" for w in state.waves[failed + 1 :])
        assert any(script[int(d[1:])] != "ok" for d in p.waves[failed])


# --------------------------------------------------------------------------- fleet view


def _entry(device: str, **messages: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"device": device, "last_seen": 100.0}
    for kind, message in messages.items():
        entry[kind] = {"received_at": 100.0, "message": message}
    return entry


def test_fleet_rows_table_groups_and_observation() -> None:
    reported = {
        "schema": "edge.reported_state",
        "version": 1,
        "device": "dev-1",
        "online": True,
        "since": 40.0,
        "models": {"m": {"active_version": 3, "last_known_good": 2}},
        "job": {
            "deployment_id": "dep",
            "phase": "Active",
            "status": "IN_PROGRESS",
            "reason_code": "",
        },
        "tags": ["plant-a"],
    }
    health = {
        "host": {"cpu_percent": 12.0},
        "models": [
            {
                "name": "m",
                "version": "3",
                "active": True,
                "interval": {"success": 90, "failure": 10, "latency_ms": {"p99": 7.5}},
            },
            {
                "name": "m",
                "version": "2",
                "active": False,
                "interval": {"success": 0, "failure": 0},
            },
        ],
    }
    drift = {"models": [{"name": "m", "version": "3", "status": "drift"}]}
    devices = {
        "dev-1": _entry("dev-1", reported=reported, health=health, drift=drift),
        "dev-2": _entry("dev-2", reported={"online": False, "since": 90.0, "models": {}}),
    }
    groups = {"canary": ["dev-1"], "all": ["dev-*"], "declared": ["dev-9"]}
    assert fleetview.resolve_group("all", groups, devices) == ["dev-1", "dev-2"]
    assert fleetview.resolve_group("declared", groups, devices) == ["dev-9"]
    assert fleetview.resolve_group("tag:plant-a", groups, devices) == ["dev-1"]
    with pytest.raises(KeyError):
        fleetview.resolve_group("nope", groups, devices)
    # tag:<t> members next to ids and patterns; bad reported tags are ignored.
    devices["dev-3"] = _entry(
        "dev-3", reported={"online": True, "tags": ["plant-a", "bad tag", "x:y", 7, "a" * 33]}
    )
    devices["edge-4"] = _entry("edge-4", reported={"online": True, "tags": ["plant-b"]})
    tagged = {"a": ["tag:plant-a", "dev-9"], "ab": ["tag:plant-a", "tag:plant-b", "edge-*"]}
    assert fleetview.resolve_group("a", tagged, devices) == ["dev-1", "dev-3", "dev-9"]
    assert fleetview.resolve_group("ab", tagged, devices) == ["dev-1", "dev-3", "edge-4"]
    assert fleetview.resolve_group("tag:bad tag", tagged, devices) == []
    assert fleetview.device_tags(devices["dev-3"]) == ("plant-a",)
    assert fleetview.groups_of("edge-4", devices["edge-4"], tagged) == ["ab", "tag:plant-b"]
    del devices["dev-3"], devices["edge-4"]
    rows = fleetview.fleet_rows(devices, groups)
    one = rows[0].to_json()
    assert one["groups"] == ["all", "canary", "tag:plant-a"]
    assert one["tags"] == ["plant-a"] and rows[1].to_json()["tags"] == []
    assert one["health"]["error_rate"] == pytest.approx(0.1)
    assert one["health"]["p99_ms"] == 7.5 and one["health"]["cpu_percent"] == 12.0
    assert one["drift_flags"] == ["m:3"] and one["active_versions"] == {"m": 3}
    lines = fleetview.table_lines(rows, now=100.0)
    assert lines[0].split() == list(fleetview.COLUMNS)
    assert "online 60s" in lines[1] and "m:3" in lines[1] and "Active/IN_PROGRESS" in lines[1]
    assert "err 10.0%" in lines[1] and "p99 7.5ms" in lines[1] and "m:3" in lines[1]
    assert "offline 10s" in lines[2]
    assert lines[1].endswith("plant-a") and lines[2].endswith("-")  # the TAGS column
    assert lines[-1].startswith("2 devices: 1 online, 1 offline/unknown, 0 failed jobs, 1 with")
    seen = fleetview.observation(devices["dev-1"], "m", 3)
    assert seen == ro.DeviceObservation(
        online=True,
        active_version=3,
        job_deployment_id="dep",
        job_phase="Active",
        job_status="IN_PROGRESS",
        job_reason="",
        health_at=100.0,
        error_rate=pytest.approx(0.1),  # type: ignore[arg-type]
        p99_ms=7.5,
        drift="drift",
    )
    # Another version's health says nothing about this one.
    assert fleetview.observation(devices["dev-1"], "m", 4).error_rate is None
    # Garbage in the book does not break the view.
    junk = {
        "x": {
            "device": "x",
            "reported": {"message": {"models": [1], "online": "yes"}},
            "health": {"message": {"models": "no", "host": 3}},
        }
    }
    (row,) = fleetview.fleet_rows(junk)
    assert row.online is None and row.active == {}
