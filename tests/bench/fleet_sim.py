"""A fleet of simulated devices: the agent's real update client code without onnxruntime.

Each simulated device is one MQTT v5 connection (``agent.mqtt.client``) with the
agent's last will and retained ``reported`` state, and runs deployments the way
the agent does up to the model runtime: ``agent.protocol.deployment.verify_deployment``
(signature, device, freshness, anti-replay, anti-rollback),
``agent.fleet.downloader.Downloader`` over ``MqttChunkFetcher`` (windowed,
resumable, SHA-256 checked chunks from the controllers' shared subscription),
``agent.signing.version_dir.verify_version`` plus ``check_signed_manifest`` (the
OpenSSF model signature and mix-and-match check), and the life cycle of
``agent.fleet.lifecycle`` reported on ``jobs`` at every step. Activation is
simulated (no onnxruntime): the version becomes active, a short probation runs,
the job ends ``Active``/``SUCCEEDED``. Health messages report an error rate per
active version (``--bad-version V`` makes version V fail 50% of its requests;
``--fail-version V`` makes its validation fail).

Many devices run in one process (one asyncio loop, one paho thread each);
``SimFleet`` spreads a device list over a few processes and stops them by PID.

    python tests/bench/fleet_sim.py --port 1883 --devices sim-0000,sim-0001 \\
        --state-dir /tmp/sim --deploy-trust KEY.pem --model-trust DIR

Prints JSON lines on stdout: ``{"event": "ready", ...}`` once every device is
connected and subscribed, then one ``{"event": "job", ...}`` per job step.
``--tag DEVICE=TAG`` (repeatable) makes DEVICE report TAG in its ``tags``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.adapters.chunk_fetcher import MqttChunkFetcher
from agent.fleet.downloader import (
    Downloader,
    DownloadError,
    DownloadSettings,
)
from agent.fleet.lifecycle import IDLE, Event, IllegalTransitionError, JobState, apply, rejected
from agent.mqtt.client import MqttClient, MqttSettings, Will
from agent.protocol.deployment import (
    Deployment,
    DeploymentRejectedError,
    DeviceContext,
    check_signed_manifest,
    peek_deployment_id,
    verify_deployment,
)
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SimOptions:
    host: str
    port: int
    prefix: str
    state_dir: Path
    deploy_trust: Path
    model_trust: Path
    initial_version: int = 1
    model: str = "m"
    bad_versions: frozenset[int] = frozenset()
    fail_versions: frozenset[int] = frozenset()
    health_interval_s: float = 1.0
    max_probation_s: float = 0.5
    chunk_bytes: int = 256 * 1024
    window: int = 4
    chunk_timeout_s: float = 10.0
    keep_files: bool = False
    # Device -> the tags it reports (the agent's fleet.tags); sent as given, so a
    # test can also make a device report tags the controller must ignore.
    tags: Mapping[str, Sequence[str]] = field(default_factory=dict)


class SimDevice:
    def __init__(self, device: str, options: SimOptions, emit: Any) -> None:
        self.device = device
        self.options = options
        self.emit = emit
        p = options.prefix
        self.desired_topic = f"{p}/devices/{device}/desired"
        self.artifacts_topic = f"{p}/devices/{device}/artifacts"
        self.reported_topic = f"{p}/devices/{device}/reported"
        self.jobs_topic = f"{p}/devices/{device}/jobs"
        self.health_topic = f"{p}/devices/{device}/health"
        self.state_dir = options.state_dir / device
        self.since = time.time()
        self.active = options.initial_version
        self.last_known_good = options.initial_version
        self.highest_activated = options.initial_version
        self.highest_sequence = 0
        self.job: dict[str, Any] | None = None
        self.seen_envelopes: set[str] = set()
        self.seq = 0
        settings = MqttSettings(
            host=options.host,
            port=options.port,
            client_id=device,
            keepalive_s=30,
            session_expiry_s=3600,
            clean_start=False,
            reconnect_min_s=0.5,
            reconnect_max_s=5.0,
            max_inflight=64,
        )
        self.client = MqttClient(settings, will=Will(self.reported_topic, self._reported(False)))
        self.fetcher = MqttChunkFetcher(
            self.client, options.prefix, device, options.chunk_timeout_s
        )
        self.client.on_connected(self._on_connected)
        self.deploy_trust = TrustStore.from_public_key_files([options.deploy_trust])
        self.model_trust = TrustStore.from_directory(options.model_trust)
        self.desired: asyncio.Queue[bytes] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.chunk_requests = 0

    # -- messages -----------------------------------------------------------

    def _reported(self, online: bool) -> bytes:
        job = None
        if self.job is not None:
            job = {
                k: self.job[k]
                for k in (
                    "deployment_id",
                    "sequence",
                    "model",
                    "model_version",
                    "phase",
                    "status",
                    "reason_code",
                )
            }
        return json.dumps(
            {
                "schema": "edge.reported_state",
                "version": 1,
                "device": self.device,
                "online": online,
                "since": self.since,
                "ts": round(time.time(), 3),
                "agent_version": "sim",
                "models": {
                    self.options.model: {
                        "active_version": self.active,
                        "serving_versions": [self.active],
                        "last_known_good": self.last_known_good,
                        "highest_activated": self.highest_activated,
                    }
                },
                "job": job,
                "highest_sequence": self.highest_sequence,
                "tags": list(self.options.tags.get(self.device, ())),
            },
            separators=(",", ":"),
        ).encode()

    async def _on_connected(self) -> None:
        await self.client.publish(
            self.reported_topic, self._reported(True), retain=True, wait_ack=False
        )
        if self.job is not None:
            await self._publish_job()

    async def _publish_job(self) -> None:
        assert self.job is not None
        message = {
            "schema": "edge.job_progress",
            "version": 1,
            "device": self.device,
            **self.job,
            "ts": round(time.time(), 3),
            "message_id": str(uuid.uuid4()),
        }
        await self.client.publish(self.jobs_topic, json.dumps(message).encode(), wait_ack=False)

    async def _step(self, state: JobState, reason: str = "", message: str = "") -> None:
        assert self.job is not None
        self.job.update(
            phase=str(state.phase), status=str(state.status), reason_code=reason, message=message
        )
        await self._publish_job()
        await self.client.publish(
            self.reported_topic, self._reported(True), retain=True, wait_ack=False
        )
        self.emit(
            {
                "event": "job",
                "device": self.device,
                "deployment_id": self.job["deployment_id"],
                "version": self.job["model_version"],
                "phase": self.job["phase"],
                "status": self.job["status"],
                "reason": reason,
                "t": time.time(),
            }
        )

    # -- life -----------------------------------------------------------------

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.client.start()
        await self.client.wait_connected(60)
        await self.client.subscribe(self.artifacts_topic, qos=1)
        await self.client.subscribe(self.desired_topic, qos=1)
        self.tasks.append(asyncio.create_task(self._jobs()))
        self.tasks.append(asyncio.create_task(self._health()))

    def route(self, message: Any) -> None:
        if message.topic == self.artifacts_topic:
            self.fetcher.handle(message)
        elif message.topic == self.desired_topic and message.payload:
            self.desired.put_nowait(message.payload)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.publish(
            self.reported_topic, self._reported(False), retain=True, wait_ack=False
        )
        await self.client.stop()

    async def _health(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            self.seq += 1
            bad = self.active in self.options.bad_versions
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
                        "version": str(self.active),
                        "active": True,
                        "interval": {
                            "seconds": self.options.health_interval_s,
                            "success": success,
                            "failure": failure,
                            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 40.0 if bad else 3.0},
                        },
                    }
                ],
            }
            await self.client.publish(
                self.health_topic, json.dumps(message).encode(), wait_ack=False
            )

    async def _jobs(self) -> None:
        while True:
            payload = await self.desired.get()
            sha = hashlib.sha256(payload).hexdigest()
            if sha in self.seen_envelopes:
                continue
            self.seen_envelopes.add(sha)
            context = DeviceContext(
                device_id=self.device,
                now=time.time(),
                highest_sequence=self.highest_sequence,
                highest_versions={self.options.model: self.highest_activated},
            )
            try:
                deployment = verify_deployment(payload, self.deploy_trust, context)
            except DeploymentRejectedError as exc:
                self.job = {
                    "deployment_id": peek_deployment_id(payload),
                    "sequence": None,
                    "model": None,
                    "model_version": None,
                    "reason_code": exc.code,
                }
                await self._step(rejected(exc.code), exc.code, str(exc))
                continue
            self.highest_sequence = deployment.sequence
            await self._run(deployment)

    async def _fail(self, state: JobState, code: str, text: str) -> None:
        try:
            failed = apply(state, Event.FAIL, code)
        except IllegalTransitionError:
            return
        await self._step(failed, code, text)

    async def _run(self, d: Deployment) -> None:
        self.job = {
            "deployment_id": d.deployment_id,
            "sequence": d.sequence,
            "model": d.model_name,
            "model_version": d.model_version,
        }
        state = apply(IDLE, Event.OFFER)
        await self._step(state)
        staging = self.state_dir / "staging" / str(d.sequence)
        version_dir = staging / str(d.model_version)
        try:
            state = apply(state, Event.START_DOWNLOAD)
            await self._step(state)
            downloader = Downloader(
                self.state_dir / "downloads",
                self.fetcher,
                DownloadSettings(
                    chunk_bytes=self.options.chunk_bytes, window=self.options.window, retries=8
                ),
            )
            targets = [(f, version_dir / f.path) for f in d.files]
            if d.config is not None:
                targets.append((d.config, staging / "config.pbtxt"))
            await downloader.download(targets)
            self.chunk_requests += downloader.requests
            verified = await asyncio.to_thread(verify_version, version_dir, self.model_trust)
            check_signed_manifest(d, verified.manifest)
            state = apply(state, Event.DOWNLOAD_VERIFIED)
            await self._step(state)
            state = apply(state, Event.START_VALIDATION)
            await self._step(state)
            if d.model_version in self.options.fail_versions:
                state = apply(state, Event.FAIL, "validation_failed")
                await self._step(state, "validation_failed", "simulated validation failure")
                return
            state = apply(state, Event.VALIDATION_PASSED)
            await self._step(state)
            self.active = d.model_version
            self.highest_activated = max(self.highest_activated, d.model_version)
            state = apply(state, Event.ACTIVATED)
            await self._step(state)
            await asyncio.sleep(min(d.probation_s or 0.0, self.options.max_probation_s))
            state = apply(state, Event.PROBATION_PASSED)
            self.last_known_good = d.model_version
            await self._step(state)
        except (DownloadError, DeploymentRejectedError) as exc:
            await self._fail(state, exc.code, str(exc))
        except Exception as exc:  # report like the agent's 'interrupted', keep the device up
            await self._fail(state, "interrupted", repr(exc))
        finally:
            if not self.options.keep_files:
                shutil.rmtree(staging, ignore_errors=True)


async def run_devices(devices: Sequence[str], options: SimOptions) -> None:
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    sims = {name: SimDevice(name, options, emit) for name in devices}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def pump(sim: SimDevice) -> None:
        while True:
            sim.route(await sim.client.messages.get())

    pumps = []
    for start in range(0, len(devices), 50):  # connect in batches: no thundering herd
        batch = [sims[name] for name in devices[start : start + 50]]
        await asyncio.gather(*(sim.start() for sim in batch))
        pumps += [asyncio.create_task(pump(sim)) for sim in batch]
    emit({"event": "ready", "devices": len(devices), "pid": os.getpid()})
    await stop.wait()
    for task in pumps:
        task.cancel()
    await asyncio.gather(*(sim.stop() for sim in sims.values()), return_exceptions=True)
    emit({"event": "stopped", "chunk_requests": sum(s.chunk_requests for s in sims.values())})


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
                "--max-probation",
                str(options.max_probation_s),
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
    parser.add_argument("--max-probation", type=float, default=0.5)
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
        max_probation_s=args.max_probation,
        chunk_bytes=args.chunk_bytes,
        window=args.window,
        chunk_timeout_s=args.chunk_timeout,
        tags=tags,
    )
    asyncio.run(run_devices(args.devices.split(","), options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
