"""A fleet of 100 simulated devices (tests/bench/fleet_sim.py: the agent's real
updater, MQTT client, chunk fetcher and state store; no onnxruntime) against
one real mosquitto and two ``edge-controller serve`` processes sharing a store.

Staged rollouts run with the real ``edge-controller deploy --group``: a good
version rolls out wave by wave to every device, each device gets exactly one
deployment, and the two serving controllers never double-deploy; a version
whose devices report a high error rate halts after its first wave and that wave
is rolled back to the version it ran before, while the rest never sees it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bench.fleet_sim import SimFleet, SimOptions, device_names, raise_fd_limit
from tests.controller_process import (
    ControllerProcess,
    controller_toml,
    publish_version,
    run_controller,
)
from tests.fleet_device import SigningKeys, make_signed_version, make_signing_keys
from tests.mqtt_broker import MosquittoBroker

pytestmark = pytest.mark.timeout(240)

DEVICES = 100
MODEL = "m"
MODEL_BYTES = 1024 * 1024 + 777
# The devices run the agent's updater, which keeps a version on probation as long
# as the deployment says (the controller's default is 60 s): none here.
PROBATION = ("--probation", "0")


@dataclass
class ScaleFleet:
    tmp: Path
    broker: MosquittoBroker
    signing: SigningKeys
    config: Path
    store: Path
    deploy_public: Path

    def sim_options(self, **overrides: Any) -> SimOptions:
        """Simulated devices on this fleet's broker, trusting its keys."""
        values: dict[str, Any] = {
            "host": self.broker.host,
            "port": self.broker.port,
            "prefix": "edge",
            "state_dir": self.tmp / "sim-state",
            "deploy_trust": self.deploy_public,
            "model_trust": self.signing.trust_dir,
            "initial_version": 1,
            "model": MODEL,
            "health_interval_s": 0.3,
        }
        return SimOptions(**(values | overrides))

    def another_controller(self, name: str, **settings: Any) -> Path:
        """The config of one more controller on this fleet's broker and store."""
        return controller_toml(
            self.tmp / f"{name}.toml",
            self.broker,
            self.store,
            trust_dir=self.signing.trust_dir,
            deploy_key=self.tmp / "deploy-keys" / "deployment.key.pem",
            **settings,
        )


def _publish(fleet: ScaleFleet, version: int, size: int) -> None:
    version_dir = make_signed_version(
        fleet.tmp / f"repo-{version}",
        MODEL,
        version,
        {"model.onnx": os.urandom(size)},
        fleet.signing,
    )
    result = publish_version(fleet.config, version_dir, MODEL, version)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def scale_fleet(tmp_path: Path, mqtt_broker: MosquittoBroker) -> ScaleFleet:
    raise_fd_limit(8192)
    signing = make_signing_keys(tmp_path / "signing")
    keygen = run_controller(["keygen", "--out-dir", str(tmp_path / "deploy-keys")])
    assert keygen.returncode == 0, keygen.stderr
    store = tmp_path / "store"
    config = controller_toml(
        tmp_path / "controller.toml",
        mqtt_broker,
        store,
        trust_dir=signing.trust_dir,
        deploy_key=tmp_path / "deploy-keys" / "deployment.key.pem",
    )
    with config.open("a") as handle:
        handle.write('\n[groups]\nall = ["sim-*"]\ncanary = ["sim-0000", "sim-0001"]\n')
    fleet = ScaleFleet(
        tmp_path,
        mqtt_broker,
        signing,
        config,
        store,
        tmp_path / "deploy-keys" / "deployment.pub.pem",
    )
    for version in (1, 2, 3):
        _publish(fleet, version, MODEL_BYTES if version > 1 else 1000)
    return fleet


def _deploy(fleet: ScaleFleet, version: int, *extra: str, timeout: float = 150) -> Any:
    return run_controller(
        [
            "deploy",
            MODEL,
            str(version),
            "--group",
            "all",
            "--config",
            str(fleet.config),
            "--interval",
            "0.2",
            *PROBATION,
            *extra,
        ],
        timeout=timeout,
    )


def _per_device_deployments(sim: SimFleet, version: int) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for event in sim.snapshot():
        if event.get("event") == "job" and event.get("version") == version:
            seen.setdefault(event["device"], set()).add(event["deployment_id"])
    return seen


def _records(store: Path, version: int) -> list[dict[str, Any]]:
    out = []
    for path in sorted((store / "deployments").glob("*.json")):
        record = json.loads(path.read_text())["deployment"]
        if record["model"]["version"] == version:
            out.append(record)
    return out


def test_staged_rollouts_across_100_devices_and_two_controllers(scale_fleet: ScaleFleet) -> None:
    fleet = scale_fleet
    names = device_names(DEVICES)
    options = fleet.sim_options(bad_versions=frozenset({3}))
    second = fleet.another_controller("controller-2")
    with SimFleet(names, 2, options) as sim:
        sim.wait_ready(60)
        controllers = [ControllerProcess(fleet.config), ControllerProcess(second)]
        try:
            for controller in controllers:
                controller.wait_serving()
            started = time.monotonic()
            good = _deploy(fleet, 2, "--first", "10%", "--wave-size", "50%", "--soak", "0.5")
            elapsed = time.monotonic() - started
            assert good.returncode == 0, good.stdout + good.stderr + sim.log_text()
            assert "completed" in good.stdout
            assert "wave 3/3 [########################]   40/40" in good.stdout, good.stdout

            latest = sim.latest_jobs()
            assert sorted(latest) == names
            assert all(
                (e["version"], e["phase"], e["status"]) == (2, "Active", "SUCCEEDED")
                for e in latest.values()
            ), [e for e in latest.values() if e["status"] != "SUCCEEDED"][:3]
            # Exactly one deployment per device and one per wave: nobody double-deployed.
            per_device = _per_device_deployments(sim, 2)
            assert all(len(ids) == 1 for ids in per_device.values())
            records = _records(fleet.store, 2)
            assert [len(r["devices"]) for r in records] == [10, 50, 40]
            # Waves went out in order: a later wave only after the earlier one succeeded.
            rollout_files = sorted((fleet.store / "rollouts").glob("*.json"))
            (state,) = [json.loads(p.read_text()) for p in rollout_files]
            waves = state["waves"]
            assert state["status"] == "completed"
            for before, after in itertools.pairwise(waves):
                assert after["deployed_at"] >= before["succeeded_at"] + 0.5

            # The status table shows every device on version 2. The controllers write
            # their status file at a bounded rate, so the last reports may land a
            # moment after the rollout record says completed: poll, bounded.
            deadline = time.monotonic() + 20
            while True:
                table = run_controller(["status", "--group", "all", "--config", str(fleet.config)])
                assert table.returncode == 0, table.stderr
                rows = [ln for ln in table.stdout.splitlines() if ln.startswith("sim-")]
                lagging = [r for r in rows if f"{MODEL}:2" not in r]
                if (len(rows) == DEVICES and not lagging) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert len(rows) == DEVICES and not lagging, lagging[:3]
            as_json = json.loads(
                run_controller(["status", "--json", "--config", str(fleet.config)]).stdout
            )
            assert {r["device"] for r in as_json} == set(names)
            assert all(r["online"] and r["active_versions"] == {MODEL: 2} for r in as_json)

            # A bad version: the first wave's devices succeed but report a 50% error
            # rate, so the rollout halts and rolls that wave back to version 2.
            bad = _deploy(fleet, 3, "--first", "5", "--soak", "5", "--rollback-on-halt")
            assert bad.returncode == 1, bad.stdout + bad.stderr
            assert "error rate" in bad.stderr and "halted" in bad.stderr, bad.stderr
            wave_one = names[:5]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                latest = sim.latest_jobs()
                if all(
                    (latest[d]["version"], latest[d]["status"]) == (2, "SUCCEEDED")
                    for d in wave_one
                ):
                    break
                time.sleep(0.2)
            assert all(latest[d]["version"] == 2 for d in wave_one), [latest[d] for d in wave_one]
            assert set(_per_device_deployments(sim, 3)) == set(wave_one)
            rollbacks = _records(fleet.store, 2)[3:]
            assert [r["devices"] for r in rollbacks] == [wave_one]
            assert all(r["allow_downgrade"] for r in rollbacks)
        finally:
            stopped = [c.stop() for c in controllers]
    served = [s["chunks"] for s in stopped if s is not None]
    assert len(served) == 2 and all(n > 0 for n in served), served
    print(f"100 devices, 1 MiB model: rolled out in {elapsed:.1f}s; chunks served {served}")


def _rollout(fleet: ScaleFleet, *args: str) -> Any:
    return run_controller(["rollout", *args, "--config", str(fleet.config)])


def test_serve_drives_a_detached_rollout_through_pause_and_resume(
    scale_fleet: ScaleFleet,
) -> None:
    fleet = scale_fleet
    names = device_names(20)
    options = fleet.sim_options()
    with SimFleet(names, 1, options) as sim, ControllerProcess(fleet.config) as controller:
        sim.wait_ready(60)
        controller.wait_serving()
        # A soak long enough that the pause lands inside it on a busy machine too.
        created = _deploy(fleet, 2, "--first", "5", "--soak", "4", "--detach")
        assert created.returncode == 0, created.stderr
        rollout_id = created.stdout.split()[1].rstrip(":")

        def state() -> dict[str, Any]:
            result = _rollout(fleet, "status", rollout_id, "--json")
            assert result.returncode == 0, result.stderr
            loaded: dict[str, Any] = json.loads(result.stdout)
            return loaded

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and state()["waves"][0]["status"] != "soaking":
            time.sleep(0.2)
        assert state()["waves"][0]["status"] == "soaking", controller.log_text()
        paused = _rollout(fleet, "pause", rollout_id)
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
        time.sleep(5.0)  # longer than the soak: a running rollout would deploy wave 2 now
        assert state()["waves"][1]["status"] == "pending"
        assert set(_per_device_deployments(sim, 2)) == set(names[:5])
        assert _rollout(fleet, "pause", rollout_id).returncode == 1  # already paused
        resumed = _rollout(fleet, "resume", rollout_id, "--detach")
        assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and state()["status"] != "completed":
            time.sleep(0.2)
        final = state()
        assert final["status"] == "completed", final
        assert set(_per_device_deployments(sim, 2)) == set(names)
        listing = _rollout(fleet, "list")
        assert rollout_id in listing.stdout and "completed" in listing.stdout
        shown = _rollout(fleet, "status", rollout_id)
        assert "wave 2/2 [########################]" in shown.stdout, shown.stdout
        assert _rollout(fleet, "abort", rollout_id).returncode == 1  # finished already
        assert _rollout(fleet, "status", "r-none").returncode == 3

        watch = run_controller(
            ["watch", "--count", "2", "--interval", "0.1", "--json", "--config", str(fleet.config)]
        )
        assert watch.returncode == 0, watch.stderr
        frames = [json.loads(line) for line in watch.stdout.splitlines()]
        assert len(frames) == 2 and {r["device"] for r in frames[-1]} == set(names)
        table = run_controller(["watch", "--count", "1", "--config", str(fleet.config)])
        assert "20 devices: 20 online" in table.stdout, table.stdout


def _add_section(config: Path, text: str) -> None:
    with config.open("a") as handle:
        handle.write("\n" + text + "\n")


def test_a_second_controller_takes_over_when_the_lease_holder_is_killed(
    scale_fleet: ScaleFleet,
) -> None:
    """Two ``serve`` processes share one store; the one driving a detached rollout is
    SIGKILLed while a wave soaks. The other may only act once the dead one's lease
    has expired, then finishes the rollout; no wave goes out twice."""
    from agent.controller.rollout_driver import RolloutBook

    fleet = scale_fleet
    ttl = 4.0
    names = device_names(12)
    options = fleet.sim_options()
    second = fleet.another_controller("controller-2")
    for config in (fleet.config, second):
        _add_section(config, f"[rollout]\nlease_ttl_s = {ttl}")
    book = RolloutBook(fleet.store)
    with SimFleet(names, 1, options) as sim:
        sim.wait_ready(60)
        controllers = [ControllerProcess(fleet.config), ControllerProcess(second)]
        try:
            for controller in controllers:
                controller.wait_serving()
            # 12 devices in waves of 2, 4, 4, 2; each wave soaks 3 s.
            created = _deploy(
                fleet, 2, "--first", "2", "--wave-size", "4", "--soak", "3", "--detach"
            )
            assert created.returncode == 0, created.stdout + created.stderr
            rollout_id = created.stdout.split()[1].rstrip(":")
            assert "12 devices in 4 waves (2+4+4+2)" in created.stdout, created.stdout

            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if book.load(rollout_id).waves[1].status == "soaking":
                    break
                time.sleep(0.1)
            assert book.load(rollout_id).waves[1].status == "soaking", [
                c.log_text() for c in controllers
            ]
            lease = book.lease(rollout_id)
            assert lease is not None and lease.pid is not None, lease
            assert f"pid {lease.pid} " in lease.owner  # the owner names its process too
            (holder,) = [c for c in controllers if c.pid == lease.pid]
            (survivor,) = [c for c in controllers if c is not holder]
            shown = _rollout(fleet, "status", rollout_id, "--json")
            assert json.loads(shown.stdout)["lease"]["pid"] == holder.pid, shown.stdout

            holder.kill()  # SIGKILL by PID: no release, no goodbye
            dead_lease = book.lease(rollout_id)
            assert dead_lease is not None and dead_lease.pid == holder.pid
            owners: list[tuple[float, int | None]] = []  # (first seen, holder's pid)
            survivor_leases: list[float] = []  # expiry times of the survivor's leases
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                current = book.lease(rollout_id)
                if current is not None and (not owners or owners[-1][1] != current.pid):
                    owners.append((time.time(), current.pid))
                if current is not None and current.pid == survivor.pid:
                    survivor_leases.append(current.expires_at)
                if book.load(rollout_id).status == "completed":
                    break
                time.sleep(0.1)
            final = book.load(rollout_id)
            assert final.status == "completed", (final.status, final.history[-5:])
            # The dead holder's lease stood until it expired; then the survivor took it.
            assert [pid for _, pid in owners][:2] == [holder.pid, survivor.pid], owners
            # Taken (lease expiry - TTL) no earlier than the dead lease expired.
            assert min(survivor_leases) - ttl >= dead_lease.expires_at - 0.01, (
                survivor_leases[:3],
                dead_lease,
            )
            # Nothing was deployed by anyone while the dead holder's lease stood.
            for wave in final.waves[2:]:
                assert wave.deployed_at is not None
                assert wave.deployed_at >= dead_lease.expires_at, (wave, dead_lease)

            def waves_deployed(process: ControllerProcess) -> list[int]:
                events = process.events
                return [int(e["wave"]) for e in events if e.get("msg") == "rollout wave deployed"]

            assert sorted(waves_deployed(holder) + waves_deployed(survivor)) == [1, 2, 3, 4]
            assert {3, 4} <= set(waves_deployed(survivor)), survivor.log_text()
            assert any(
                e.get("msg") == "rollout" and e.get("status") == "completed"
                for e in survivor.events
            )

            # Every device runs version 2, each from exactly one deployment, and the
            # store issued exactly one deployment per wave (no wave issued twice).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                latest = sim.latest_jobs()
                if len(latest) == len(names) and all(
                    (e["version"], e["phase"], e["status"]) == (2, "Active", "SUCCEEDED")
                    for e in latest.values()
                ):
                    break
                time.sleep(0.2)
            assert sorted(latest) == names
            assert all(
                (e["version"], e["phase"], e["status"]) == (2, "Active", "SUCCEEDED")
                for e in latest.values()
            ), latest
            per_device = _per_device_deployments(sim, 2)
            assert sorted(per_device) == names
            assert all(len(ids) == 1 for ids in per_device.values()), per_device
            records = _records(fleet.store, 2)
            assert [r["devices"] for r in records] == [list(w) for w in final.plan.waves]
            sequences = [r["sequence"] for r in records]
            assert sequences == sorted(set(sequences)), sequences
            assert [r["deployment_id"] for r in records] == [
                next(iter(set(w.deployments.values()))) for w in final.waves
            ]
            deadline = time.monotonic() + 10
            while book.lease(rollout_id) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert book.lease(rollout_id) is None  # released on completion
        finally:
            for controller in controllers:
                controller.stop()
    print(f"lease takeover: owners {owners}, dead lease expired at {dead_lease.expires_at:.1f}")


def test_rollout_thresholds_from_the_config_judge_real_waves(scale_fleet: ScaleFleet) -> None:
    """``[rollout]`` decides what a soaking wave is judged by: version 3's 50% error
    rate passes under the config's 0.6 (the built-in 0.05 would halt it); a flag's
    0.2 halts version 4, and the config's rollback_on_halt rolls its wave back."""
    fleet = scale_fleet
    _publish(fleet, 4, MODEL_BYTES)
    _add_section(
        fleet.config,
        '[rollout]\nfirst = "2"\nwave_size = "50%"\nsoak_s = 1.5\nmax_error_rate = 0.6\n'
        "rollback_on_halt = true",
    )
    names = device_names(10)
    options = fleet.sim_options(initial_version=2, bad_versions=frozenset({3, 4}))
    with SimFleet(names, 1, options) as sim, ControllerProcess(fleet.config) as controller:
        sim.wait_ready(60)
        controller.wait_serving()
        lenient = _deploy(fleet, 3)
        assert lenient.returncode == 0, lenient.stdout + lenient.stderr + controller.log_text()
        assert "10 devices in 3 waves (2+5+3)" in lenient.stdout, lenient.stdout
        assert "max error rate 0.6" in lenient.stdout and "completed" in lenient.stdout
        assert set(_per_device_deployments(sim, 3)) == set(names)

        strict = _deploy(fleet, 4, "--max-error-rate", "0.2")
        assert strict.returncode == 1, strict.stdout + strict.stderr
        assert "halted" in strict.stderr and "error rate" in strict.stderr, strict.stderr
        wave_one = names[:2]
        assert set(_per_device_deployments(sim, 4)) == set(wave_one)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            latest = sim.latest_jobs()
            back = [(latest[d]["version"], latest[d]["status"]) for d in wave_one]
            if back == [(3, "SUCCEEDED")] * len(wave_one):
                break
            time.sleep(0.2)
        assert all(latest[d]["version"] == 3 for d in wave_one), [latest[d] for d in wave_one]
        rollbacks = [r for r in _records(fleet.store, 3) if r["allow_downgrade"]]
        assert [r["devices"] for r in rollbacks] == [wave_one]


def test_groups_from_reported_tags(scale_fleet: ScaleFleet) -> None:
    """Devices report tags; ``[groups]`` selects by ``tag:<tag>`` next to ids, ``status``
    shows the tags, and ``deploy --group`` reaches exactly the tagged devices."""
    fleet = scale_fleet
    names = device_names(8)
    tags = {
        names[0]: ["line-3"],
        names[1]: ["line-3"],
        names[2]: ["line-3", "night"],
        names[3]: ["line-4"],
        names[4]: ["bad/tag", "line-4"],  # the bad one is ignored
        names[5]: ["line-3:x", " line-3"],  # nothing valid
    }
    with fleet.config.open("a") as handle:  # into the fixture's [groups], the last section
        handle.write('line3 = ["tag:line-3", "sim-0007"]\n')
    options = fleet.sim_options(health_interval_s=0.5, tags=tags)
    with SimFleet(names, 1, options) as sim, ControllerProcess(fleet.config) as controller:
        sim.wait_ready(60)
        controller.wait_serving()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = run_controller(["status", "--json", "--config", str(fleet.config)])
            rows = {r["device"]: r for r in json.loads(shown.stdout or "[]")}
            if len(rows) == len(names):
                break
            time.sleep(0.5)
        assert sorted(rows) == names, shown.stdout + shown.stderr
        assert {d: r["tags"] for d, r in rows.items()} == {
            names[0]: ["line-3"],
            names[1]: ["line-3"],
            names[2]: ["line-3", "night"],
            names[3]: ["line-4"],
            names[4]: ["line-4"],
            names[5]: [],
            names[6]: [],
            names[7]: [],
        }
        assert rows[names[2]]["groups"] == ["all", "line3", "tag:line-3", "tag:night"]
        assert rows[names[7]]["groups"] == ["all", "line3"]
        table = run_controller(["status", "--group", "line3", "--config", str(fleet.config)])
        assert table.returncode == 0, table.stderr
        header, *body = table.stdout.splitlines()
        assert header.split()[-1] == "TAGS"
        listed = {line.split()[0]: line.split()[-1] for line in body if line.startswith("sim-")}
        assert listed == {
            names[0]: "line-3",
            names[1]: "line-3",
            names[2]: "line-3,night",
            names[7]: "-",
        }
        night = run_controller(
            ["status", "--group", "tag:night", "--json", "--config", str(fleet.config)]
        )
        assert [r["device"] for r in json.loads(night.stdout)] == [names[2]]

        rollout = run_controller(
            [
                *("deploy", MODEL, "2", "--group", "line3", "--first", "2", "--soak", "0.5"),
                *("--config", str(fleet.config), "--interval", "0.2", *PROBATION),
            ],
            timeout=150,
        )
        assert rollout.returncode == 0, rollout.stdout + rollout.stderr + controller.log_text()
        assert "to group line3: 4 devices in 2 waves (2+2)" in rollout.stdout, rollout.stdout
        line3 = [names[0], names[1], names[2], names[7]]
        assert sorted(_per_device_deployments(sim, 2)) == line3
        latest = sim.latest_jobs()
        assert all(latest[d]["version"] == 2 for d in line3)
        assert not set(latest) - set(line3)  # nobody else got a job

        by_tag = run_controller(
            [
                *("deploy", MODEL, "3", "--group", "tag:line-4", "--detach", *PROBATION),
                *("--config", str(fleet.config)),
            ]
        )
        assert by_tag.returncode == 0, by_tag.stderr
        assert "to group tag:line-4: 2 devices" in by_tag.stdout, by_tag.stdout


def test_an_overloaded_controller_slows_the_fleet_down_instead_of_failing_it(
    scale_fleet: ScaleFleet,
) -> None:
    """The controller sends at most 1.5 MB/s; 12 devices ask for 8 x 64 KiB each at once
    with a 2 s chunk timeout, so at first most requests could only be answered after
    the device gave up. The controller sheds those, the devices shrink their windows,
    and every device still gets the whole model (docs/fleet-protocol.md, Overload)."""
    fleet = scale_fleet
    rate = 1_500_000
    limited = fleet.another_controller("limited", max_bytes_per_s=rate)
    names = device_names(12)
    options = fleet.sim_options(chunk_bytes=64 * 1024, window=8, chunk_timeout_s=2.0)
    with SimFleet(names, 1, options) as sim, ControllerProcess(limited) as controller:
        sim.wait_ready(60)
        controller.wait_serving()
        started = time.monotonic()
        result = _deploy(fleet, 2, "--first", "100%", "--soak", "0", timeout=240)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        latest = sim.latest_jobs()
        assert {d: (e["version"], e["status"]) for d, e in latest.items()} == dict.fromkeys(
            names, (2, "SUCCEEDED")
        )
        stopped = controller.stop()
    assert stopped is not None
    assert stopped["shed"] > 0, stopped  # it was overloaded: late requests were dropped
    assert stopped["bytes"] >= len(names) * MODEL_BYTES
    # Never faster than the limit allows (the limit held under overload).
    assert elapsed >= (len(names) * MODEL_BYTES - 64 * 1024) / rate * 0.9, elapsed
    print(f"overload: {elapsed:.1f}s, controller {stopped}")
