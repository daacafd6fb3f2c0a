"""``edge-controller deploy --group`` and ``edge-controller rollout ...``.

``deploy MODEL VERSION --group G`` plans a staged rollout (waves from ``--first``
and ``--wave-size``; each option a flag leaves out comes from the config's
``[rollout]``), saves it in the store, and drives it in the foreground
with a progress bar per wave until it completes, halts, is paused or aborted
(``--detach``: leave it to the ``serve`` processes, which resume every
unfinished rollout). ``rollout status|pause|resume|abort|list``; ``rollout
resume ID`` also drives it in the foreground again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from agent.controller import rollout as ro
from agent.controller.progress import bar
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.controller.config import ControllerConfig
    from agent.controller.follower import FleetFollower

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2
EXIT_NOT_FOUND: Final = 3


def _fail(exc: Exception) -> int:
    code = getattr(exc, "code", "")
    print(f"edge-controller: FAILED{' ' + code if code else ''}: {exc}", file=sys.stderr)
    if getattr(exc, "code", "") == "not_found":
        return EXIT_NOT_FOUND
    return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE


# --------------------------------------------------------------------------- progress


def wave_position(state: ro.RolloutState) -> str:
    """Where a rollout is, as ``rollout list`` and ``rollout status`` both say it:
    the first wave that has not passed and its state, or that all passed."""
    total = len(state.waves)
    current = state.current_wave
    if current is None:
        return f"all {total} waves passed"
    return f"wave {current + 1}/{total} {state.waves[current].status}"


def progress_lines(
    state: ro.RolloutState, seen: dict[str, ro.DeviceObservation], now: float
) -> list[str]:
    """One line per wave: a bar of devices Active/SUCCEEDED, failures, the soak clock."""
    plan = state.plan
    lines = [
        f"rollout {plan.rollout_id}: {plan.model} v{plan.version} -> group {plan.group} "
        f"({len(plan.devices)} devices): {state.status.upper()}, {wave_position(state)}"
    ]
    for index, (devices, wave) in enumerate(zip(plan.waves, state.waves, strict=True)):
        done = 0
        for device in devices:
            ident = wave.deployments.get(device)
            obs = seen.get(device)
            if ident is not None and obs is not None and obs.job_deployment_id == ident:
                done += obs.job_phase == "Active" and obs.job_status == "SUCCEEDED"
        if wave.status == "passed":
            done = len(devices)
        detail: str = wave.status
        if wave.status == "soaking" and wave.succeeded_at is not None:
            detail = f"soaking {min(now - wave.succeeded_at, plan.soak_s):.0f}/{plan.soak_s:g}s"
        lines.append(
            f"  wave {index + 1}/{len(plan.waves)} {bar(done, len(devices), len(wave.failures))}"
            f" {done:>4}/{len(devices):<4} succeeded  {len(wave.failures)} failed  {detail}"
        )
    if state.halt_reason:
        lines.append(f"  halted: {state.halt_reason}")
    if state.rollback != "none":
        lines.append(
            f"  roll back: {state.rollback} ({len(state.rollback_deployments)} devices)"
        )
    return lines


def plan_summary(plan: ro.RolloutPlan) -> str:
    """The plan's soak, timeout, thresholds and roll back policy, on one line."""
    t = plan.thresholds

    def off(value: float | None, unit: str = "") -> str:
        return "off" if value is None else f"{value:g}{unit}"

    return (
        f"soak {plan.soak_s:g}s, wave timeout {plan.wave_timeout_s:g}s, "
        f"max error rate {off(t.max_error_rate)}, max p99 {off(t.max_p99_ms, ' ms')}, "
        f"{'halt' if t.halt_on_drift else 'ignore'} on drift, "
        f"{t.max_failed_devices} failed per wave tolerated, "
        f"roll back on halt: {'yes' if plan.rollback_on_halt else 'no'}"
    )


# --------------------------------------------------------------------------- driving


async def _start_follower(config: ControllerConfig, timeout: float) -> FleetFollower:
    from dataclasses import replace

    from agent.controller.envelopes import known_envelopes
    from agent.controller.follower import FleetFollower
    from agent.controller.service import _load_key
    from agent.controller.store import ArtifactStore

    settings = replace(
        config.broker, client_id=f"{config.broker.client_id}-rollout"[:128]
    )
    key = _load_key(config) if config.deploy_key is not None else None
    envelopes = await asyncio.to_thread(known_envelopes, ArtifactStore(config.store_dir), key)
    follower = FleetFollower(settings, config.prefix, envelopes)
    await follower.start(timeout)
    await follower.settle()
    return follower


async def _drive(
    config: ControllerConfig,
    rollout_id: str,
    follower: FleetFollower,
    *,
    interval: float,
    max_wait: float,
    quiet: bool,
) -> ro.RolloutState:
    from agent.controller.rollout_driver import RolloutBook, RolloutDriver, owner_id
    from agent.controller.service import _load_key
    from agent.controller.store import ArtifactStore

    if config.deploy_key is None:
        raise ConfigError("no deployment key: pass --key or set 'deploy.key'")
    book = RolloutBook(config.store_dir)
    owner = owner_id("cli")
    driver = RolloutDriver(
        ArtifactStore(config.store_dir),
        book,
        follower.client,
        config.prefix,
        _load_key(config),
        owner,
        lease_ttl_s=config.rollout.lease_ttl_s,
        envelopes=follower.envelopes,
    )
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + max_wait
    last_text = ""
    other_noted = False
    try:
        while True:
            state = await driver.step(rollout_id, follower.observe)
            if state is None:
                state = book.load(rollout_id)
                if not other_noted and not quiet:
                    lease = book.lease(rollout_id)
                    print(f"(driven by {lease.owner if lease else 'another controller'})")
                    other_noted = True
            lines = progress_lines(state, dict(follower.observe(state.plan)), time.time())
            text = "\n".join(lines)
            if not quiet and text != last_text:
                if tty and last_text:
                    sys.stdout.write(f"\x1b[{last_text.count(chr(10)) + 1}F\x1b[J")
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
                last_text = text
            if state.finished or state.status == "paused" or time.monotonic() > deadline:
                return state
            await asyncio.sleep(interval)
    finally:
        book.release(rollout_id, owner)


def _outcome(state: ro.RolloutState) -> int:
    if state.status == "completed":
        print(f"rollout {state.plan.rollout_id} completed")
        return EXIT_OK
    if state.status == "paused":
        print(f"rollout {state.plan.rollout_id} paused; `edge-controller rollout resume` continues")
        return EXIT_OK
    if state.status in ("halted", "aborted"):
        print(
            f"rollout {state.plan.rollout_id} {state.status}"
            f"{': ' + state.halt_reason if state.halt_reason else ''}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(
        f"rollout {state.plan.rollout_id} still {state.status}; `edge-controller serve` "
        "continues it (or `edge-controller rollout resume`)"
    )
    return EXIT_OK


def _float_or_none(text: str) -> float | None:
    if text.lower() in ("", "none", "off"):
        return None
    return float(text)


def _rollout_plan_options(config: ControllerConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The plan's options: each flag given, else the config's ``[rollout]`` value."""
    from agent.controller.config import wave_size_or_rest

    d = config.rollout

    def pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    return {
        "first": pick(args.first, d.first),
        "wave_size": wave_size_or_rest(args.wave_size) if args.wave_size else d.wave_size,
        "soak_s": pick(args.soak, d.soak_s),
        "wave_timeout_s": pick(args.wave_timeout, d.wave_timeout_s),
        "thresholds": ro.Thresholds(
            max_error_rate=(
                d.max_error_rate
                if args.max_error_rate is None
                else _float_or_none(args.max_error_rate)
            ),
            max_p99_ms=d.max_p99_ms if args.max_p99_ms is None else _float_or_none(args.max_p99_ms),
            halt_on_drift=pick(args.halt_on_drift, d.halt_on_drift),
            max_failed_devices=pick(args.max_failed, d.max_failed),
        ),
        "rollback_on_halt": pick(args.rollback_on_halt, d.rollback_on_halt),
    }


async def _deploy_group(config: ControllerConfig, args: argparse.Namespace) -> int:
    from agent.controller.fleetview import resolve_group
    from agent.controller.rollout_driver import RolloutBook, new_rollout_id
    from agent.controller.store import ArtifactStore

    ArtifactStore(config.store_dir).manifest(args.model, args.version)  # published?
    follower = await _start_follower(config, args.timeout)
    try:
        try:
            devices = resolve_group(args.group, config.groups, follower.book.devices)
        except KeyError:
            raise ConfigError(
                f"no group {args.group!r} (declared: "
                f"{', '.join(sorted(config.groups)) or 'none'}; or tag:<tag>)"
            ) from None
        previous: dict[str, int | None] = {}
        for device in devices:
            models = (
                (follower.book.devices.get(device, {}).get("reported") or {})
                .get("message", {})
                .get("models", {})
            )
            info = models.get(args.model) if isinstance(models, dict) else None
            value = None
            if isinstance(info, dict):
                value = info.get("last_known_good") or info.get("active_version")
            previous[device] = value if isinstance(value, int) else None
        options = _rollout_plan_options(config, args)
        plan = ro.RolloutPlan(
            rollout_id=new_rollout_id(),
            model=args.model,
            version=args.version,
            group=args.group,
            waves=ro.plan_waves(devices, options.pop("first"), options.pop("wave_size")),
            previous=previous,
            **options,
            expires_in_s=args.expires_in if args.expires_in is not None else config.expires_in_s,
            probation_s=args.probation if args.probation is not None else config.probation_s,
            created_at=time.time(),
        )
        state = ro.new_rollout(plan, time.time())
        RolloutBook(config.store_dir).create(state)
        sizes = "+".join(str(len(w)) for w in plan.waves)
        print(
            f"rollout {plan.rollout_id}: {args.model} version {args.version} to group "
            f"{args.group}: {len(devices)} devices in {len(plan.waves)} waves ({sizes})"
        )
        print(f"  {plan_summary(plan)}")
        if args.detach:
            print("detached: `edge-controller serve` drives it; `rollout status` follows it")
            return EXIT_OK
        state = await _drive(
            config,
            plan.rollout_id,
            follower,
            interval=args.interval,
            max_wait=args.max_wait,
            quiet=False,
        )
        return _outcome(state)
    finally:
        await follower.stop()


def run_deploy_group(config: ControllerConfig, args: argparse.Namespace) -> int:
    from agent.mqtt.client import MqttError

    try:
        return asyncio.run(_deploy_group(config, args))
    except (AgentError, MqttError, ValueError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("\ninterrupted: the rollout continues under `edge-controller serve`")
        return EXIT_FAILURE


# --------------------------------------------------------------------------- rollout ...


async def _resume(config: ControllerConfig, args: argparse.Namespace) -> int:
    from agent.controller.rollout_driver import RolloutBook

    book = RolloutBook(config.store_dir)
    state = book.load(args.rollout_id)
    if state.status == "paused":
        state = book.update(args.rollout_id, lambda s: ro.command(s, "resume", time.time()))
        print(f"rollout {args.rollout_id} resumed")
    if state.finished:
        return _outcome(state)
    if args.detach:
        return EXIT_OK
    follower = await _start_follower(config, args.timeout)
    try:
        state = await _drive(
            config,
            args.rollout_id,
            follower,
            interval=args.interval,
            max_wait=args.max_wait,
            quiet=False,
        )
    finally:
        await follower.stop()
    return _outcome(state)


def run_rollout(config: ControllerConfig, args: argparse.Namespace) -> int:
    from agent.controller.rollout_driver import RolloutBook
    from agent.mqtt.client import MqttError

    book = RolloutBook(config.store_dir)
    try:
        if args.action == "list":
            rows = [book.load(rid) for rid in book.ids()]
            if args.json:
                print(json.dumps([ro.state_to_json(s) for s in rows], indent=1))
                return EXIT_OK
            for s in rows:
                halted = f"  halted: {s.halt_reason}" if s.halt_reason else ""
                print(
                    f"{s.plan.rollout_id}  {s.status:<9} {s.plan.model} v{s.plan.version} "
                    f"group {s.plan.group}  {wave_position(s)}{halted}"
                )
            return EXIT_OK
        if args.rollout_id is None:
            raise ConfigError(f"rollout {args.action} needs a rollout ID")
        if args.action == "status":
            state = book.load(args.rollout_id)
            lease = book.lease(args.rollout_id)
            if args.json:
                shown = ro.state_to_json(state) | {"lease": lease.to_json() if lease else None}
                print(json.dumps(shown, indent=1))
            else:
                print("\n".join(progress_lines(state, {}, time.time())))
                if lease is not None and not state.finished:
                    left = lease.expires_at - time.time()
                    until = f"expires in {left:.0f}s" if left > 0 else "expired"
                    print(f"  driven by {lease.owner} (lease {until})")
                for stamp, text in state.history[-10:]:
                    print(f"  {time.strftime('%H:%M:%S', time.localtime(stamp))} {text}")
            return EXIT_OK
        if args.action in ("pause", "abort"):
            state = book.update(args.rollout_id, lambda s: ro.command(s, args.action, time.time()))
            print(f"rollout {args.rollout_id} {state.status}")
            return EXIT_OK
        return asyncio.run(_resume(config, args))
    except (AgentError, MqttError, ValueError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("\ninterrupted: the rollout continues under `edge-controller serve`")
        return EXIT_FAILURE


def add_rollout_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``deploy --group`` (the rollout plan) and of driving in the foreground."""
    # Every default is None: an unset flag takes the config's [rollout] value.
    group = parser.add_argument_group(
        "staged rollout (with --group; defaults from the config's [rollout])"
    )
    group.add_argument("--group", metavar="G", help="deploy to group G in waves")
    group.add_argument("--first", metavar="N|P%", help="first wave (built in: 10%%)")
    group.add_argument(
        "--wave-size", metavar="N|P%|rest", help="later waves (built in: the rest in one wave)"
    )
    group.add_argument("--soak", type=float, metavar="S", help="healthy time per wave (60)")
    group.add_argument("--wave-timeout", type=float, metavar="S", help="halt a slower wave (3600)")
    group.add_argument("--max-error-rate", metavar="R", help="halt above it (0.05; none: off)")
    group.add_argument("--max-p99-ms", metavar="MS", help="halt above it (none: off)")
    group.add_argument("--max-failed", type=int, metavar="N", help="failures per wave (0)")
    drift = group.add_mutually_exclusive_group()
    drift.add_argument(
        "--ignore-drift",
        dest="halt_on_drift",
        action="store_false",
        default=None,
        help="do not halt on drift",
    )
    drift.add_argument(
        "--halt-on-drift",
        dest="halt_on_drift",
        action="store_true",
        default=None,
        help="halt when a device reports drift (built in)",
    )
    group.add_argument(
        "--rollback-on-halt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deploy the failed wave's previous version if the rollout halts",
    )
    add_drive_options(parser)


def add_drive_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detach", action="store_true", help="leave it to `serve`")
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="status poll period (seconds)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=7 * 86400.0, metavar="S", help="stop following after S"
    )


def rollout_summary(state: ro.RolloutState) -> dict[str, Any]:
    return {"rollout_id": state.plan.rollout_id, "status": state.status}
