"""A fleet of simulated devices: the agent's real updater, without onnxruntime.

Each simulated device runs ``agent.fleet.updater.Updater`` on the same ports as
the agent (``agent.app``): its own MQTT v5 connection (``agent.mqtt.client``,
with the updater's last will), the real chunk fetcher (``MqttChunkFetcher``)
and downloader, and the real ``StateStore`` in a state directory of its own
(``<state-dir>/<device>/state``, repository beside it). So deployment
verification, downloads, the model signature and mix-and-match checks,
installation, persistence and every job report (``envelope_sha256`` included)
are the agent's own code. Only the serving side is light: ``LightHost``
records which version serves (activations and roll backs) and
``LightValidator`` accepts without running the model (the signature check has
verified the bytes already); ``--fail-version V`` makes it refuse version V.
Health messages report an error rate per active version (``--bad-version V``:
version V fails 50% of its requests); they are the simulator's own, the
updater does not send health.

The probation window is the deployment's (``edge-controller deploy --probation``).

Many devices run in one process (one asyncio loop, one paho thread each);
``SimFleet`` spreads a device list over a few processes and stops them by PID.

    python tests/bench/fleet_sim.py --port 1883 --devices sim-0000,sim-0001 \\
        --state-dir /tmp/sim --deploy-trust KEY.pem --model-trust DIR

Prints JSON lines on stdout: ``{"event": "ready", ...}`` once every device is
connected, then one ``{"event": "job", ...}`` per job report the updater
publishes. ``--tag DEVICE=TAG`` (repeatable) makes DEVICE report TAG in its
``tags``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.adapters.chunk_fetcher import MqttChunkFetcher
from agent.common.buffers import FileBytes
from agent.config import build_config
from agent.errors import AgentError
from agent.fleet.settings import UpdaterSettings
from agent.fleet.state_store import StateStore
from agent.fleet.updater import Updater
from agent.mqtt.client import FileRegion, Message, MqttClient, MqttSettings, Will
from tests.light_host import LightHostBase, LightValidatorBase, Served

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SimOptions:
    host: str
    port: int
    prefix: str
    state_dir: Path
    deploy_trust: Path  # the deployment signer's public key (PEM)
    model_trust: Path  # directory of model signers' public keys
    initial_version: int = 1
    model: str = "m"
    bad_versions: frozenset[int] = frozenset()
    fail_versions: frozenset[int] = frozenset()
    health_interval_s: float = 1.0
    chunk_bytes: int = 256 * 1024
    window: int = 4
    chunk_timeout_s: float = 10.0
    # Device -> the tags it reports (the agent's fleet.tags); sent as given, so a
    # test can also make a device report tags the controller must ignore.
    tags: Mapping[str, Sequence[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- light serving side


class LightHost(LightHostBase):
    """The updater's ``ModelHost`` without onnxruntime: which version serves, no
    requests (probation sees no faults), and every activation it was asked for."""

    def __init__(self, model: str, initial_version: int) -> None:
        super().__init__()
        # The version the device shipped with: serving, though not in its repository.
        self.serving[model] = {str(initial_version): Served()}
        self.activations: list[tuple[str, int | None]] = []  # roll backs included

    def active(self, name: str) -> int | None:
        versions = self.versions(name)
        return int(versions[-1]) if versions else None

    async def activate(self, name: str, version: int | None, prepared: Any = None) -> object:
        self.activations.append((name, version))
        del self.activations[:-16]
        return await super().activate(name, version, prepared)


class LightValidator(LightValidatorBase):
    """The updater's ``VersionValidator`` without a model run: the updater verified
    the signature and digests before it asks, so this accepts, unless ``refuse()``."""

    mode = "simulated"

    def __init__(self, refuse: Callable[[], bool]) -> None:
        self._refuse = refuse

    def check(self, model: FileBytes) -> object:
        if self._refuse():
            raise AgentError("simulated validation failure")
        return None


# --------------------------------------------------------------------------- one device


class SimClient(MqttClient):
    """The agent's MQTT client, also telling the simulator what the updater reports."""

    def __init__(
        self, settings: MqttSettings, will: Will, jobs_topic: str, request_topic: str,
        on_job: Callable[[bytes], None],
    ) -> None:
        super().__init__(settings, will)
        self._jobs_topic = jobs_topic
        self._request_topic = request_topic
        self._on_job = on_job
        self.chunk_requests = 0

    async def publish(
        self, topic: str, payload: bytes | FileRegion, *args: Any, **kwargs: Any,
    ) -> None:
        if topic == self._request_topic:
            self.chunk_requests += 1
        elif topic == self._jobs_topic and isinstance(payload, bytes):
            self._on_job(payload)
        await super().publish(topic, payload, *args, **kwargs)


def base_settings(options: SimOptions, deployment_trust_dir: Path) -> UpdaterSettings:
    """The agent's default updater settings, with the simulator's chunk knobs."""
    config = build_config({
        "mqtt": {"topic_prefix": options.prefix},
        "signing": {"trust_dir": str(options.model_trust)},
        "fleet": {
            "deployment_trust_dir": str(deployment_trust_dir),
            "chunk_bytes": options.chunk_bytes,
            "window": options.window,
            "chunk_timeout_s": options.chunk_timeout_s,
        },
    })
    return UpdaterSettings.from_config(config)


class SimDevice:
    def __init__(
        self, device: str, options: SimOptions, base: UpdaterSettings,
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        self.device = device
        self.options = options
        self.emit = emit
        root = options.state_dir / device
        self.settings = replace(
            base, device_id=device, state_dir=root / "state", repository=root / "repo",
            tags=tuple(options.tags.get(device, ())),  # as given: not checked like config
        )
        self.health_topic = f"{options.prefix}/devices/{device}/health"
        self.host = LightHost(options.model, options.initial_version)
        self.updater: Updater[Message] = Updater(
            self.settings, self.host, LightValidator(self._refuse),
            StateStore(self.settings.state_dir),
        )
        self.client: SimClient | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.seq = 0

    def _refuse(self) -> bool:
        job = self.updater.state.job
        return job is not None and job.model_version in self.options.fail_versions

    def _on_job(self, payload: bytes) -> None:
        report = json.loads(payload)
        self.emit({
            "event": "job",
            "device": self.device,
            "deployment_id": report.get("deployment_id"),
            "version": report.get("model_version"),
            "phase": report.get("phase"),
            "status": report.get("status"),
            "reason": report.get("reason_code") or "",
            "t": time.time(),
        })

    async def start(self) -> None:
        self.settings.repository.mkdir(parents=True, exist_ok=True)
        self.updater.prepare()
        will = self.updater.will()
        o = self.options
        mqtt = MqttSettings(
            host=o.host,
            port=o.port,
            client_id=self.device,
            keepalive_s=30,
            session_expiry_s=3600,
            clean_start=False,
            reconnect_min_s=0.5,
            reconnect_max_s=5.0,
            max_inflight=64,
        )
        client = self.client = SimClient(
            mqtt, Will(will.topic, will.payload, retain=will.retain),
            self.updater.topics.jobs, f"{o.prefix}/artifacts/request/{self.device}", self._on_job,
        )
        fetcher = MqttChunkFetcher(client, o.prefix, self.device, self.settings.chunk_timeout_s)
        await self.updater.start(client, fetcher)
        await client.wait_connected(60)
        self.tasks.append(asyncio.create_task(self._health()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.updater.stop()

    async def _health(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            self.seq += 1
            active = self.host.active(self.options.model)
            bad = active in self.options.bad_versions
            success, failure = (50, 50) if bad else (100, 0)
            message = {
                "schema": "edge.health",
                "version": 1,
                "device": self.device,
                "ts": round(time.time(), 3),
                "seq": self.seq,
                "message_id": str(uuid.uuid4()),
                "dropped": 0,
                "dropped_total": 0,
                "host": {"cpu_percent": 5.0 + (self.seq % 7)},
                "models": [
                    {
                        "name": self.options.model,
                        "version": str(active),
                        "active": True,
                        "interval": {
                            "seconds": self.options.health_interval_s,
                            "success": success,
                            "failure": failure,
                            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 40.0 if bad else 3.0},
                        },
                    }
                ],
            } if active is not None else None
            if message is not None:
                await self.client.publish(
                    self.health_topic, json.dumps(message).encode(), wait_ack=False
                )


def deployment_trust_dir(options: SimOptions) -> Path:
    """A directory holding just the deployment public key (the updater loads a directory)."""
    directory = options.state_dir / f"deployment-trust-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(options.deploy_trust, directory / options.deploy_trust.name)
    return directory


async def run_devices(devices: Sequence[str], options: SimOptions) -> None:
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    base = base_settings(options, deployment_trust_dir(options))
    sims = {name: SimDevice(name, options, base, emit) for name in devices}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for start in range(0, len(devices), 50):  # connect in batches: no thundering herd
        batch = [sims[name] for name in devices[start : start + 50]]
        await asyncio.gather(*(sim.start() for sim in batch))
    emit({"event": "ready", "devices": len(devices), "pid": os.getpid()})
    await stop.wait()
    await asyncio.gather(*(sim.stop() for sim in sims.values()), return_exceptions=True)
    requests = sum(s.client.chunk_requests for s in sims.values() if s.client is not None)
    emit({"event": "stopped", "chunk_requests": requests})


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- the fleet


class SimFleet:
    """Runs ``devices`` in ``processes`` child processes; collects their events."""

    def __init__(
        self, devices: Sequence[str], processes: int, options: SimOptions, extra: Sequence[str] = ()
    ) -> None:
        self.devices = list(devices)
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen[str]] = []
        per = -(-len(devices) // max(1, processes))
        for start in range(0, len(devices), per):
            part = devices[start : start + per]
            args = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--host",
                options.host,
                "--port",
                str(options.port),
                "--prefix",
                options.prefix,
                "--devices",
                ",".join(part),
                "--state-dir",
                str(options.state_dir),
                "--deploy-trust",
                str(options.deploy_trust),
                "--model-trust",
                str(options.model_trust),
                "--model",
                options.model,
                "--initial-version",
                str(options.initial_version),
                "--health-interval",
                str(options.health_interval_s),
                "--chunk-bytes",
                str(options.chunk_bytes),
                "--window",
                str(options.window),
                "--chunk-timeout",
                str(options.chunk_timeout_s),
                *[a for v in sorted(options.bad_versions) for a in ("--bad-version", str(v))],
                *[a for v in sorted(options.fail_versions) for a in ("--fail-version", str(v))],
                *[a for d in part for t in options.tags.get(d, ()) for a in ("--tag", f"{d}={t}")],
                *extra,
            ]
            proc = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
            threading.Thread(target=self._drain, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self._lock:
                    self.events.append(event)

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip())
                del self.lines[:-200]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = sum(e.get("devices", 0) for e in self.snapshot() if e["event"] == "ready")
            if ready == len(self.devices):
                return
            dead = [p.pid for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"simulator processes {dead} exited:\n" + self.log_text())
            time.sleep(0.05)
        raise TimeoutError("simulated devices not ready in time:\n" + self.log_text())

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.lines[-40:])

    def latest_jobs(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for event in self.snapshot():
            if event.get("event") == "job":
                latest[event["device"]] = event
        return latest

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM each process by PID (SIGKILL if it lingers); total chunk requests."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        time.sleep(0.1)
        return sum(e.get("chunk_requests", 0) for e in self.snapshot() if e["event"] == "stopped")

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def device_names(count: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="edge")
    parser.add_argument("--devices", required=True, help="comma-separated device ids")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--deploy-trust", type=Path, required=True)
    parser.add_argument("--model-trust", type=Path, required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--initial-version", type=int, default=1)
    parser.add_argument("--bad-version", type=int, action="append", default=[])
    parser.add_argument("--fail-version", type=int, action="append", default=[])
    parser.add_argument("--health-interval", type=float, default=1.0)
    parser.add_argument("--chunk-bytes", type=int, default=256 * 1024)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--chunk-timeout", type=float, default=10.0)
    parser.add_argument(
        "--tag", action="append", default=[], metavar="DEVICE=TAG", help="a tag DEVICE reports"
    )
    args = parser.parse_args(argv)
    tags: dict[str, list[str]] = {}
    for item in args.tag:
        device, _, tag = item.partition("=")
        tags.setdefault(device, []).append(tag)
    raise_fd_limit(65536)
    options = SimOptions(
        host=args.host,
        port=args.port,
        prefix=args.prefix,
        state_dir=args.state_dir,
        deploy_trust=args.deploy_trust,
        model_trust=args.model_trust,
        initial_version=args.initial_version,
        model=args.model,
        bad_versions=frozenset(args.bad_version),
        fail_versions=frozenset(args.fail_version),
        health_interval_s=args.health_interval,
        chunk_bytes=args.chunk_bytes,
        window=args.window,
        chunk_timeout_s=args.chunk_timeout,
        tags=tags,
    )
    asyncio.run(run_devices(args.devices.split(","), options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
