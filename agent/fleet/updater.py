"""The update orchestrator: desired state in, life cycle driven, progress reported.

It receives signed deployments on ``{p}/devices/{d}/desired``, verifies them
(``deployment``), and runs one job at a time through the life cycle
(``lifecycle``): download (``downloader``) into the state directory, verify the
model signature and the deployment's digests, validate in a fresh session
(``validation``), activate, watch a probation window, roll back automatically
if the new version misbehaves. Every step is persisted (``state_store``)
before it is reported on ``{p}/devices/{d}/jobs``; the retained
``{p}/devices/{d}/reported`` carries the device's state (birth on connect, a
last will that marks it offline).

Layout under the state directory::

    state.json                      anti-replay / anti-rollback counters, pins, the job
    downloads/<sha256>.part|.ranges partial files (resumable)
    staging/<sequence>/<version>/   the complete, verified version directory
    staging/<sequence>/config.pbtxt the deployment's model config, if any
    staging/<sequence>/previous-config.pbtxt|.absent  what it replaced (for a roll back)
    trash/                          removed version directories on their way out

Activation renames the staged version directory into ``<repo>/<model>/<version>``
(one atomic rename on one file system: the repository never holds a partial
file), then the model manager loads and warms it while the old version serves,
switches, and lets the old one drain. A crash at any point is recovered at
start-up (``prepare`` before the repository is first loaded, ``start`` after):
the version the state pins is the one that serves, and the job resumes where
its persisted phase says, or fails with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from agent import __version__
from agent.common.background import run_in_background
from agent.common.buffers import FileBytes, release
from agent.config import AgentConfig
from agent.errors import AgentError, VerificationError
from agent.fleet import lifecycle
from agent.fleet.downloader import (
    ChunkFetcher,
    Downloader,
    DownloadError,
    DownloadSettings,
    MqttChunkFetcher,
)
from agent.fleet.lifecycle import Event, JobState, Phase, Reason, Recovery
from agent.fleet.state_store import (
    AgentState,
    JobRecord,
    StateStore,
    fsync_dir,
    remove_temporaries,
    write_atomically,
)
from agent.fleet.validation import SPEC_FILE, VECTORS_FILE, validate_model
from agent.mqtt.client import Message, MqttClient, MqttSettings, Will
from agent.protocol.deployment import (
    CONFIG_PATH,
    MAX_MESSAGE_BYTES,
    Deployment,
    DeploymentRejectedError,
    DeviceContext,
    check_signed_manifest,
    from_record,
    peek_deployment_id,
    to_record,
    verify_deployment,
)
from agent.serving.model_config import complete_config, parse_config_pbtxt
from agent.serving.model_manager import ModelManager
from agent.serving.onnx_runtime import OnnxSession, SessionOptions
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version
from agent.wire import model_config_pb2 as mc

log = logging.getLogger("agent.fleet")

JOB_SCHEMA: Final = "edge.job_progress"
REPORTED_SCHEMA: Final = "edge.reported_state"
ERROR_SCHEMA: Final = "edge.error_report"
PROGRESS_EVERY_S: Final = 1.0
PROBATION_TICK_S: Final = 0.25
REMEMBER_REJECTED: Final = 64


# Crash-safety tests make the agent SIGKILL itself at a named step of the life
# cycle: EDGE_AGENT_FAILPOINT=<name> or <name>:<deployment sequence>. Unset, as
# in production, this does nothing.
_FAILPOINT: Final = os.environ.get("EDGE_AGENT_FAILPOINT", "")


def failpoint(name: str, sequence: int) -> None:
    if _FAILPOINT and _FAILPOINT in (name, f"{name}:{sequence}"):
        log.warning("failpoint reached: killing the agent", extra={"failpoint": _FAILPOINT})
        os.kill(os.getpid(), signal.SIGKILL)


def default_device_id() -> str:
    """The host name, cut to what a device id may hold."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name or "edge-agent")[:64]


@dataclass(frozen=True, slots=True)
class UpdaterSettings:
    device_id: str
    prefix: str
    state_dir: Path
    repository: Path
    deployment_trust_dir: Path
    model_trust_dir: Path
    session: SessionOptions
    download: DownloadSettings
    chunk_timeout_s: float
    download_timeout_s: float
    max_model_bytes: int
    max_clock_skew_s: float
    probation_s: float
    probation_max_error_rate: float
    probation_min_requests: int
    max_start_attempts: int
    keep_versions: int
    tags: tuple[str, ...] = ()  # reported for the controllers' tag:<tag> groups

    @classmethod
    def from_config(cls, config: AgentConfig) -> UpdaterSettings:
        fleet = config.fleet
        runtime = config.runtime
        return cls(
            device_id=config.mqtt.device_id or default_device_id(),
            prefix=config.mqtt.topic_prefix,
            state_dir=Path(config.state.dir),
            repository=Path(config.repository.path),
            deployment_trust_dir=Path(fleet.deployment_trust_dir),
            model_trust_dir=Path(config.signing.trust_dir),
            session=SessionOptions(
                intra_op_threads=runtime.intra_op_threads,
                inter_op_threads=runtime.inter_op_threads,
                graph_optimization=runtime.graph_optimization,
                execution_providers=runtime.execution_providers,
            ),
            download=DownloadSettings(
                chunk_bytes=fleet.chunk_bytes,
                window=fleet.window,
                retries=fleet.chunk_retries,
                max_bytes_per_s=fleet.max_download_bytes_per_s,
            ),
            chunk_timeout_s=fleet.chunk_timeout_s,
            download_timeout_s=fleet.download_timeout_s,
            max_model_bytes=fleet.max_model_bytes,
            max_clock_skew_s=fleet.max_clock_skew_s,
            probation_s=fleet.probation_s,
            probation_max_error_rate=fleet.probation_max_error_rate,
            probation_min_requests=fleet.probation_min_requests,
            max_start_attempts=fleet.max_start_attempts,
            keep_versions=fleet.keep_versions,
            tags=fleet.tags,
        )


def mqtt_settings(config: AgentConfig, device_id: str) -> MqttSettings:
    m = config.mqtt
    return MqttSettings(
        host=m.host,
        port=m.port,
        client_id=device_id,
        tls_ca=m.tls_ca,
        tls_cert=m.tls_cert,
        tls_key=m.tls_key,
        tls_server_name=m.tls_server_name,
        username=m.username,
        password=m.password,
        keepalive_s=m.keepalive_s,
        session_expiry_s=m.session_expiry_s,
        reconnect_max_s=m.reconnect_max_s,
    )


@dataclass(frozen=True, slots=True)
class Topics:
    desired: str
    reported: str
    jobs: str
    errors: str
    artifacts: str

    @classmethod
    def of(cls, prefix: str, device: str) -> Topics:
        base = f"{prefix}/devices/{device}"
        return cls(f"{base}/desired", f"{base}/reported", f"{base}/jobs", f"{base}/errors",
                   f"{base}/artifacts")


class JobFailure(Exception):
    """Ends the current job: FAIL / TIME_OUT before activation, ROLL_BACK in probation."""

    def __init__(self, reason: str, message: str, event: Event = Event.FAIL) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.event = event


class _DeadlineExceededError(DownloadError):
    code = Reason.DOWNLOAD_DEADLINE_EXCEEDED


class _DeadlineFetcher:
    """The job's chunk fetcher bounded by the download's overall deadline.

    Per-chunk timeouts and retries cannot end a download whose controller answers
    just in time, or that waits for a broker that never comes back. No request
    or wait for the connection outlasts the deadline, and the downloader does
    not retry the error, so the transfer stops the way it does for other
    failures (partial files checkpointed and closed) instead of being cancelled
    mid-write or mid-hash.
    """

    def __init__(self, fetcher: ChunkFetcher, deadline: float) -> None:
        self._fetcher = fetcher
        self._deadline = deadline  # time.monotonic()

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceededError("the download deadline has passed")
        return left

    async def wait_online(self) -> None:
        try:
            await asyncio.wait_for(self._fetcher.wait_online(), self._left())
        except TimeoutError:
            raise _DeadlineExceededError("the download deadline passed while offline") from None

    def online(self) -> bool:
        return self._fetcher.online()

    async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
        try:
            return await asyncio.wait_for(
                self._fetcher.fetch(sha256, offset, length), self._left()
            )
        except TimeoutError:
            raise _DeadlineExceededError("the download deadline has passed") from None


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8")


class Updater:
    """One device's side of the fleet protocol (see the module docstring)."""

    def __init__(
        self,
        settings: UpdaterSettings,
        models: ModelManager,
        store: StateStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.clock = clock
        self.topics = Topics.of(settings.prefix, settings.device_id)
        self.state = AgentState()
        self.state_error = ""  # set if the state file could not be used
        self.client: MqttClient | None = None
        self._fetcher: MqttChunkFetcher | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._pending: bytes | None = None
        self._rejected: dict[str, str] = {}  # envelope sha256 -> reason (no re-reports)
        self._save_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._since = clock()
        self._last_progress = 0.0
        self._progress: tuple[int, int] | None = None
        self._deployment_trust: TrustStore | None = None
        self._model_trust: TrustStore | None = None
        self._trust_error = ""
        self.staging_root = settings.state_dir / "staging"
        self.downloads = settings.state_dir / "downloads"
        self.trash = settings.state_dir / "trash"

    # ------------------------------------------------------------------ start-up

    def prepare(self, create: bool = True) -> dict[str, int]:
        """Blocking, before the repository is first loaded: recover files, return the pins.

        Never raises for a bad state directory: the agent then serves by the
        repository's own version policies and fleet updates stay off. With
        ``create`` false (MQTT off) a state directory that has no state yet is
        left alone.
        """
        if not create and not self.store.path.exists():
            return {}
        try:
            self.store.ensure()
            self.state = self.store.load()
            for directory in (self.staging_root, self.downloads, self.trash):
                directory.mkdir(parents=True, exist_ok=True)
                remove_temporaries(directory)
            self._empty(self.trash)
            self._recover_files()
            self.store.save(self.state)
        except (AgentError, OSError) as exc:
            self.state_error = str(exc)
            log.error("fleet state unusable; updates disabled", extra={"reason": str(exc)})
            return {}
        return self.state.pins()

    def _recover_files(self) -> None:
        job = self.state.job
        busy = job is not None and self._job_state(job).busy
        if job is not None and not busy:
            self._finish_files(job)  # a finished job's leftovers (crash while finishing)
        keep_staging = {str(job.sequence)} if job is not None and busy else set()
        keep_blobs = (
            {f.sha256 for f in from_record(job.deployment).artifacts}
            if job is not None and busy
            else set()
        )
        for entry in self.staging_root.iterdir():
            if entry.name not in keep_staging:
                self._remove_tree(entry)
        for entry in self.downloads.iterdir():
            if entry.name.split(".")[0] not in keep_blobs:
                self._remove_tree(entry)
        # Hidden leftovers of a cross-file-system install or removal.
        managed = set(self.state.models) | ({job.model} if job is not None else set())
        for name in managed:
            model_dir = self.settings.repository / name
            if model_dir.is_dir():
                for entry in model_dir.iterdir():
                    if entry.name.startswith((".incoming-", ".removed-")):
                        self._remove_tree(entry)
        if job is not None and busy:
            state = self._job_state(job)
            if lifecycle.recovery(state) in (Recovery.ACTIVATE, Recovery.PROBATION):
                job.attempts += 1  # a start-up inside activation or probation: count it

    def _load_trust(self) -> None:
        errors = []
        try:
            self._deployment_trust = TrustStore.from_directory(self.settings.deployment_trust_dir)
        except AgentError as exc:
            errors.append(f"deployment trust store: {exc}")
        try:
            self._model_trust = TrustStore.from_directory(self.settings.model_trust_dir)
        except AgentError as exc:
            errors.append(f"model trust store: {exc}")
        self._trust_error = "; ".join(errors)
        if errors:
            log.error("fleet updates will be rejected", extra={"reason": self._trust_error})

    def will(self) -> Will:
        return Will(self.topics.reported, _encode(self._reported(online=False)), retain=True)

    async def start(self, client: MqttClient) -> None:
        """After serving started: connect (in the background) and resume the job."""
        self._load_trust()
        self.client = client
        self._fetcher = MqttChunkFetcher(
            client, self.settings.prefix, self.settings.device_id, self.settings.chunk_timeout_s
        )
        client.on_connected(self._on_connected)
        await client.subscribe(self.topics.artifacts, qos=1)
        if not self.state_error:
            await client.subscribe(self.topics.desired, qos=1)
        self._dispatch_task = asyncio.create_task(self._dispatch(), name="fleet-dispatch")
        await client.start()
        job = self.state.job
        if job is not None and self._job_state(job).busy and not self.state_error:
            log.info("resuming update job", extra=self._job_log(job))
            self._start_job()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM: stop the job where it is (it resumes on the next start), say offline."""
        if self._job_task is not None and not self._job_task.done():
            self._job_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._job_task, timeout / 2)
            job = self.state.job
            if job is not None and job.attempts:
                job.attempts = 0  # a clean stop is not a crash
                with contextlib.suppress(AgentError, OSError):
                    await self._save()
        client = self.client
        if client is not None:
            if client.connected.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        client.publish(self.topics.reported,
                                       _encode(self._reported(online=False)), retain=True),
                        timeout / 2,
                    )
            await client.stop()
        for task in [self._dispatch_task, *self._tasks]:
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------------ messages

    async def _on_connected(self) -> None:
        await self._publish(self.topics.reported, self._reported(online=True), retain=True)
        job = self.state.job
        if job is not None:
            await self._publish(self.topics.jobs, self._job_message(job))
        if self.state_error:
            await self._report_error("state_invalid", self.state_error, self.topics.desired, b"")

    async def _dispatch(self) -> None:
        assert self.client is not None
        while True:
            message = await self.client.messages.get()
            try:
                await self._route(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet message handling failed", extra={"topic": message.topic})

    async def _route(self, message: Message) -> None:
        if message.topic == self.topics.artifacts:
            assert self._fetcher is not None
            self._fetcher.handle(message)
        elif message.topic == self.topics.desired:
            await self._on_desired(message.payload)
        else:
            await self._report_error(
                "topic_unexpected", f"message on unexpected topic {message.topic[:200]!r}",
                message.topic, message.payload,
            )

    async def _on_desired(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message: no desired change
        sha = hashlib.sha256(payload).hexdigest()
        job = self.state.job
        if job is not None and job.deployment.get("envelope_sha256") == sha:
            return  # the retained message again (reconnect, restart)
        if sha in self._rejected or (
            self._pending is not None and hashlib.sha256(self._pending).hexdigest() == sha
        ):
            return
        try:
            deployment = self._verify(payload)
        except DeploymentRejectedError as exc:
            await self._reject(payload, sha, exc.code, str(exc))
            return
        current = self._current_state()
        if current.busy and not current.cancellable:
            log.info("deployment deferred until the running job ends",
                     extra={"deployment_id": deployment.deployment_id})
            self._pending = payload
            return
        if current.busy:
            await self._cancel_job(f"superseded by deployment {deployment.deployment_id}")
            deployment = self._verify(payload)  # the counters may have moved
        await self._accept(deployment)

    def _verify(self, payload: bytes) -> Deployment:
        if self._deployment_trust is None:
            raise _TrustUnavailableError(self._trust_error or "no deployment trust store")
        context = DeviceContext(
            device_id=self.settings.device_id,
            now=self.clock(),
            highest_sequence=self.state.highest_sequence,
            highest_versions=self.state.highest_versions(),
            max_model_bytes=self.settings.max_model_bytes,
            max_clock_skew_s=self.settings.max_clock_skew_s,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )
        return verify_deployment(payload, self._deployment_trust, context)

    async def _reject(self, payload: bytes, sha: str, code: str, text: str) -> None:
        self._rejected[sha] = code
        while len(self._rejected) > REMEMBER_REJECTED:
            del self._rejected[next(iter(self._rejected))]
        log.warning("deployment rejected", extra={"reason_code": code, "reason": text})
        report = lifecycle.rejected(code)
        message = {
            **self._message_head(JOB_SCHEMA),
            "deployment_id": peek_deployment_id(payload),
            "sequence": None,
            "model": None,
            "model_version": None,
            "phase": str(report.phase),
            "status": str(report.status),
            "reason_code": code,
            "message": text[:1000],
        }
        await self._publish(self.topics.jobs, message)
        await self._report_error(code, text, self.topics.desired, payload)

    async def _report_error(self, code: str, text: str, topic: str, payload: bytes) -> None:
        await self._publish(
            self.topics.errors,
            {
                **self._message_head(ERROR_SCHEMA),
                "reason_code": code,
                "message": text[:1000],
                "topic": topic[:256],
                "payload_bytes": len(payload),
                "payload_sha256": hashlib.sha256(payload).hexdigest(),
            },
        )

    # ------------------------------------------------------------------ jobs

    def _job_state(self, job: JobRecord) -> JobState:
        return lifecycle.from_names(job.phase, job.status, job.reason_code)

    def _current_state(self) -> JobState:
        job = self.state.job
        return lifecycle.IDLE if job is None else self._job_state(job)

    async def _accept(self, deployment: Deployment) -> None:
        now = self.clock()
        serving = self.models.versions(deployment.model_name)
        record = self.state.models.get(deployment.model_name)
        previous = record.active if record is not None and record.active is not None else (
            int(max(serving, key=int)) if serving else None
        )
        state = lifecycle.apply(self._current_state(), Event.OFFER)
        self.state.highest_sequence = deployment.sequence
        self.state.job = JobRecord(
            deployment=to_record(deployment),
            phase=str(state.phase),
            status=str(state.status),
            previous_active=previous,
            started_at=now,
            updated_at=now,
        )
        self._progress = None
        await self._save()
        log.info("deployment accepted", extra=self._job_log(self.state.job))
        failpoint("accepted", deployment.sequence)
        await self._announce()
        self._start_job()

    def _start_job(self) -> None:
        self._job_task = asyncio.create_task(self._run_job(), name="fleet-job")

    async def _cancel_job(self, why: str) -> None:
        task = self._job_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        job = self.state.job
        if job is not None and self._job_state(job).cancellable:
            await self._transition(Event.CANCEL, Reason.SUPERSEDED, why, announce=False)
            await asyncio.to_thread(self._finish_files, job)
            await self._announce()

    async def _run_job(self) -> None:
        job = self.state.job
        assert job is not None
        deployment = from_record(job.deployment)
        try:
            action = lifecycle.recovery(self._job_state(job))
            if action is Recovery.DOWNLOAD:
                await self._download(deployment)
            validated = None
            if action in (Recovery.DOWNLOAD, Recovery.VALIDATE):
                validated = await self._validate(deployment)
            if action in (Recovery.DOWNLOAD, Recovery.VALIDATE, Recovery.ACTIVATE):
                await self._activate(deployment, validated)
            await self._probation(deployment)
        except asyncio.CancelledError:
            raise
        except JobFailure as failure:
            await self._end_job(failure)
        except Exception as exc:
            log.exception("update job failed unexpectedly")
            state = self._current_state()
            event = Event.ROLL_BACK if state.in_probation else Event.FAIL
            await self._end_job(JobFailure(Reason.INTERRUPTED, f"internal error: {exc}", event))
        await self._after_job()

    async def _after_job(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await self._on_desired(pending)

    async def _end_job(self, failure: JobFailure) -> None:
        job = self.state.job
        assert job is not None
        state = self._current_state()
        if state.in_probation or failure.event is Event.ROLL_BACK:
            await self._roll_back(failure.reason, failure.message)
            return
        event = failure.event if failure.event in (Event.FAIL, Event.TIME_OUT) else Event.FAIL
        log.warning("update job failed",
                    extra={**self._job_log(job), "reason_code": failure.reason,
                           "reason": failure.message})
        await self._transition(event, failure.reason, failure.message, announce=False)
        await asyncio.to_thread(self._finish_files, job)  # a moved-in version, a config
        await self._announce()

    async def _transition(
        self, event: Event, reason: str = "", message: str = "", announce: bool = True
    ) -> None:
        """Apply ``event``, persist, then report (unless the caller reports once done)."""
        job = self.state.job
        assert job is not None
        new = lifecycle.apply(self._job_state(job), event, reason)
        job.phase = str(new.phase)
        job.status = str(new.status) if new.status else None
        job.reason_code = new.reason_code
        job.message = message[:1000]
        job.updated_at = self.clock()
        if event is not Event.ACTIVATED:
            job.attempts = 0
        await self._save()
        log.info("update job", extra={**self._job_log(job), "event": str(event)})
        if announce:
            await self._announce()

    async def _announce(self) -> None:
        job = self.state.job
        if job is not None:
            await self._publish(self.topics.jobs, self._job_message(job))
        await self._publish(self.topics.reported, self._reported(online=True), retain=True)

    # -- download and verification ------------------------------------------

    def _staging(self, deployment: Deployment) -> Path:
        return self.staging_root / str(deployment.sequence)

    def _staged_version(self, deployment: Deployment) -> Path:
        return self._staging(deployment) / str(deployment.model_version)

    async def _download(self, deployment: Deployment) -> None:
        if self._current_state().phase is Phase.OFFERED:
            await self._transition(Event.START_DOWNLOAD)
        assert self._fetcher is not None
        staged = self._staged_version(deployment)
        targets = [(f, staged / f.path) for f in deployment.files]
        if deployment.config is not None:
            targets.append((deployment.config, self._staging(deployment) / CONFIG_PATH))
        # Per agent run: a restart resumes the download with a full allowance.
        timeout = self.settings.download_timeout_s
        fetcher = _DeadlineFetcher(self._fetcher, time.monotonic() + timeout)
        downloader = Downloader(self.downloads, fetcher, self.settings.download,
                                self._on_progress)
        try:
            await downloader.download(targets)
            failpoint("downloaded", deployment.sequence)
        except VerificationError as exc:  # digest mismatch of a complete file
            raise JobFailure(exc.code, str(exc)) from None
        except _DeadlineExceededError:
            total = sum({f.sha256: f.size for f, _ in targets}.values())
            done, total = self._progress or (0, total)
            raise JobFailure(
                Reason.DOWNLOAD_DEADLINE_EXCEEDED,
                f"the download did not finish within fleet.download_timeout_s = {timeout:g} s: "
                f"{done} of {total} bytes arrived",
                Event.TIME_OUT,
            ) from None
        except DownloadError as exc:
            event = Event.TIME_OUT if exc.code == Reason.DOWNLOAD_TIMED_OUT else Event.FAIL
            raise JobFailure(exc.code, str(exc), event) from None
        except OSError as exc:
            raise JobFailure(Reason.STORAGE_FAILED, f"cannot store the download: {exc}") from None
        await self._verify_staged(deployment, load=())
        await self._transition(Event.DOWNLOAD_VERIFIED)

    def _on_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S or done == total:
            self._last_progress = now
            job = self.state.job
            if job is not None:
                self._spawn(self._publish(self.topics.jobs, self._job_message(job)))

    async def _verify_staged(
        self, deployment: Deployment, load: tuple[str, ...]
    ) -> dict[str, FileBytes]:
        """Model signature + every file + no mix-and-match; the verified bytes of ``load``."""
        if self._model_trust is None:
            raise JobFailure("trust_store_invalid", self._trust_error or "no model trust store")
        staged = self._staged_version(deployment)
        try:
            # Hashing the whole version (100s of MB) at a low priority: serving first.
            verified = await run_in_background(
                verify_version, staged, self._model_trust, load, name="fleet-verify"
            )
            check_signed_manifest(deployment, verified.manifest)
        except VerificationError as exc:
            raise JobFailure(exc.code, f"staged version rejected: {exc}") from None
        return dict(verified.contents)

    # -- validation -----------------------------------------------------------

    def _config_text(self, deployment: Deployment) -> str | None:
        if deployment.config is not None:
            return (self._staging(deployment) / CONFIG_PATH).read_text(encoding="utf-8")
        existing = self.settings.repository / deployment.model_name / CONFIG_PATH
        return existing.read_text(encoding="utf-8") if existing.is_file() else None

    async def _validate(self, deployment: Deployment) -> OnnxSession | None:
        """Verify and test-run the staged version; the session that passed, for _activate."""
        if self._current_state().phase is Phase.VERIFIED:
            await self._transition(Event.START_VALIDATION)
        try:
            config_text = await asyncio.to_thread(self._config_text, deployment)
            declared = (
                parse_config_pbtxt(config_text, CONFIG_PATH)
                if config_text is not None
                else mc.ModelConfig()
            )
        except (AgentError, OSError, UnicodeDecodeError) as exc:
            raise JobFailure(Reason.VALIDATION_FAILED, f"model config unusable: {exc}") from None
        if declared.name and declared.name != deployment.model_name:
            raise JobFailure(
                Reason.VALIDATION_FAILED,
                f"config.pbtxt names model {declared.name!r}, not {deployment.model_name!r}",
            )
        model_file = declared.default_model_filename or "model.onnx"
        names = {f.path for f in deployment.files}
        if model_file not in names:
            raise JobFailure(Reason.VALIDATION_FAILED, f"the version has no {model_file}")
        load = tuple(n for n in (model_file, VECTORS_FILE, SPEC_FILE) if n in names)
        contents = await self._verify_staged(deployment, load)
        model_bytes = contents.pop(model_file)
        # A fresh session of its own, created on a low-priority thread: validating a
        # large model takes CPU the serving sessions need more. Single-threaded
        # where sessions may have pools of their own; with the agent's shared pools
        # (onnx_runtime.share_thread_pools) it runs on those, as every session must.
        # Same graph optimisation and providers.
        options = replace(self.settings.session, intra_op_threads=1, inter_op_threads=1)
        try:
            result = await run_in_background(
                validate_model, model_bytes, contents, options, name="fleet-validate"
            )
        except AgentError as exc:
            raise JobFailure(Reason.VALIDATION_FAILED, str(exc)) from None
        finally:
            # The session holds its own copy. Hundreds of MB go back to the kernel
            # here: on a thread, not on the loop at the moment of the switch.
            await asyncio.shield(asyncio.to_thread(release, model_bytes, *contents.values()))
        try:
            complete_config(declared, deployment.model_name, result.inputs, result.outputs, 1)
        except AgentError as exc:
            self.models.free(result.session)
            raise JobFailure(Reason.VALIDATION_FAILED, str(exc)) from None
        log.info("staged version validated",
                 extra={"model": deployment.model_name, "version": deployment.model_version,
                        "mode": result.mode, "max_abs_error": result.max_abs_error})
        try:
            await self._transition(Event.VALIDATION_PASSED)
            failpoint("validated", deployment.sequence)
        except BaseException:
            self.models.free(result.session)
            raise
        return result.session

    # -- activation -----------------------------------------------------------

    async def _activate(self, deployment: Deployment, validated: OnnxSession | None) -> None:
        """Install the staged version and make it serve; ``validated``: the session
        _validate made from its verified bytes (None after a restart), which the model
        manager serves instead of loading the version again."""
        try:
            await self._install_version(deployment)
        except BaseException:
            self.models.free(validated)
            raise
        name, version = deployment.model_name, deployment.model_version
        try:
            await self.models.activate(name, version, prepared=validated)
            failpoint("loaded", deployment.sequence)
        except AgentError as exc:
            raise JobFailure(Reason.ACTIVATION_FAILED, str(exc)) from None
        job = self.state.job
        assert job is not None
        record = self.state.model(name)
        record.active = version
        record.highest_activated = max(record.highest_activated, version)
        if record.last_known_good is None:
            record.last_known_good = job.previous_active
        probation = (
            deployment.probation_s if deployment.probation_s is not None
            else self.settings.probation_s
        )
        job.probation_until = self.clock() + probation
        await self._transition(Event.ACTIVATED)

    async def _install_version(self, deployment: Deployment) -> None:
        """Move the staged version (and its config) into the repository, crash-safely."""
        job = self.state.job
        assert job is not None
        if job.attempts > self.settings.max_start_attempts:
            raise JobFailure(Reason.CRASH_LOOP,
                             f"the agent restarted {job.attempts} times while activating")
        name, version = deployment.model_name, deployment.model_version
        record = self.state.model(name)
        target = self.settings.repository / name / str(version)
        staged = self._staged_version(deployment)
        if staged.exists():
            if target.exists() or target.is_symlink():
                if str(version) in self.models.versions(name) or record.active == version:
                    await self._reuse_serving_copy(deployment, staged, target)
                else:
                    await asyncio.to_thread(self._remove_version, name, version)
            if staged.exists():
                job.installed = True
                await self._save()
                try:
                    await asyncio.to_thread(self._install, staged, target)
                    failpoint("installed", deployment.sequence)
                except OSError as exc:
                    raise JobFailure(
                        Reason.STORAGE_FAILED, f"cannot move the version into the repository: {exc}"
                    ) from None
        elif not target.is_dir():
            raise JobFailure(Reason.INTERRUPTED, "the staged version is gone")
        if deployment.config is not None:
            await asyncio.to_thread(self._swap_config, deployment)

    async def _reuse_serving_copy(
        self, deployment: Deployment, staged: Path, target: Path
    ) -> None:
        """Re-deploying a version that is on disk and serving: same files or refuse."""
        assert self._model_trust is not None
        try:
            existing = await run_in_background(
                verify_version, target, self._model_trust, name="fleet-verify"
            )
            check_signed_manifest(deployment, existing.manifest)
        except VerificationError:
            raise JobFailure(
                Reason.ACTIVATION_FAILED,
                f"version {deployment.model_version} serves with other files; "
                "deploy a new version number",
            ) from None
        await asyncio.to_thread(self._remove_tree, staged)

    def _install(self, staged: Path, target: Path) -> None:
        model_dir = target.parent
        if not model_dir.is_dir():
            model_dir.mkdir(parents=True)
            fsync_dir(model_dir.parent)
        try:
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # State and repository on different file systems: copy into a hidden
            # directory the repository scan ignores, then rename that in.
            incoming = model_dir / f".incoming-{target.name}-{secrets.token_hex(4)}"
            shutil.copytree(staged, incoming)
            _fsync_tree(incoming)
            os.rename(incoming, target)
            self._remove_tree(staged)
        fsync_dir(model_dir)
        fsync_dir(staged.parent)

    def _swap_config(self, deployment: Deployment) -> None:
        staging = self._staging(deployment)
        current = self.settings.repository / deployment.model_name / CONFIG_PATH
        saved = staging / "previous-config.pbtxt"
        absent = staging / "previous-config.absent"
        if not saved.exists() and not absent.exists():
            if current.is_file():
                write_atomically(saved, current.read_bytes())
            else:
                write_atomically(absent, b"")
        write_atomically(current, (staging / CONFIG_PATH).read_bytes(), mode=0o644)

    def _restore_config(self, job: JobRecord) -> None:
        staging = self.staging_root / str(job.sequence)
        current = self.settings.repository / job.model / CONFIG_PATH
        saved = staging / "previous-config.pbtxt"
        if saved.is_file():
            write_atomically(current, saved.read_bytes(), mode=0o644)
        elif (staging / "previous-config.absent").exists():
            current.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(current.parent)

    # -- probation and roll back ------------------------------------------------

    async def _probation(self, deployment: Deployment) -> None:
        job = self.state.job
        assert job is not None
        if not self._current_state().in_probation:
            return
        if job.attempts > self.settings.max_start_attempts:
            raise JobFailure(Reason.CRASH_LOOP,
                             f"the agent restarted {job.attempts} times during probation",
                             Event.ROLL_BACK)
        name, version = deployment.model_name, str(deployment.model_version)
        until = job.probation_until or self.clock()
        watched = None
        base_fail = base_ok = 0
        s = self.settings
        while True:
            serving = self.models.serving_versions(name).get(version)
            if serving is None:
                raise JobFailure(Reason.PROBATION_FAILED,
                                 f"version {version} stopped serving", Event.ROLL_BACK)
            if serving is not watched:
                watched = serving
                base_fail, base_ok = serving.stats.faults, serving.stats.success.count
            # Only the model's (or server's) faults: requests a client got wrong say
            # nothing about the version, and must not let one client roll it back.
            failed = serving.stats.faults - base_fail
            total = failed + serving.stats.success.count - base_ok
            if total >= s.probation_min_requests and failed / total > s.probation_max_error_rate:
                raise JobFailure(
                    Reason.PROBATION_FAILED,
                    f"{failed} of {total} requests failed during probation "
                    f"(more than {s.probation_max_error_rate:.1%})",
                    Event.ROLL_BACK,
                )
            remaining = until - self.clock()
            if remaining <= 0:
                break
            await asyncio.sleep(min(PROBATION_TICK_S, remaining))
        record = self.state.model(name)
        record.last_known_good = deployment.model_version
        await self._transition(Event.PROBATION_PASSED, announce=False)
        failpoint("probation_passed", deployment.sequence)
        await asyncio.to_thread(self._finish_files, job)
        await asyncio.to_thread(
            self._prune_versions, name, deployment.model_version, record.last_known_good
        )
        await self._announce()

    async def _roll_back(self, reason: str, message: str) -> None:
        job = self.state.job
        assert job is not None
        name, version = job.model, job.model_version
        record = self.state.model(name)
        good = record.last_known_good
        if good == version:
            good = job.previous_active if job.previous_active != version else None
        record.active = good
        log.warning("rolling back", extra={**self._job_log(job), "to_version": good,
                                           "reason_code": reason, "reason": message})
        # Persisted first (a crash from here on ends on the last known good at
        # start-up), reported once the last known good serves again.
        await self._transition(Event.ROLL_BACK, reason, message, announce=False)
        failpoint("rolling_back", job.sequence)
        await asyncio.to_thread(self._restore_config, job)
        if good is not None:
            try:
                await self.models.activate(name, good)
            except AgentError as exc:
                log.error("roll back could not load the last known good version",
                          extra={"model": name, "version": good, "reason": str(exc)})
        await asyncio.to_thread(self._finish_files, job)
        if good is None:  # a new model that never had a good version: stop serving it
            try:
                await self.models.activate(name, None)
            except AgentError as exc:
                log.info("model unloaded", extra={"model": name, "reason": str(exc)})
        await self._announce()

    # -- files -------------------------------------------------------------------

    def _finish_files(self, job: JobRecord) -> None:
        """Blocking, idempotent: what a finished job leaves behind is put right and removed."""
        state = self._job_state(job)
        if state.terminal and state.status is not lifecycle.JobStatus.SUCCEEDED:
            record = self.state.models.get(job.model)
            active = record.active if record is not None else None
            if job.installed and active != job.model_version:
                self._restore_config(job)
                self._remove_version(job.model, job.model_version)
                job.installed = False
        self._remove_tree(self.staging_root / str(job.sequence))
        with contextlib.suppress(KeyError, TypeError, ValueError):
            for artifact in from_record(job.deployment).artifacts:
                for suffix in (".part", ".ranges"):
                    (self.downloads / f"{artifact.sha256}{suffix}").unlink(missing_ok=True)

    def _prune_versions(self, name: str, active: int, last_known_good: int | None) -> None:
        """Blocking, after a success: remove the model's version directories below
        ``active`` beyond the ``keep_versions - 1`` highest (the roll back targets)."""
        model_dir = self.settings.repository / name
        try:
            # Only what the repository scan takes for a version (a real directory with
            # a canonical number); anything else there is not ours to remove.
            older = sorted(
                (int(e.name) for e in model_dir.iterdir()
                 if e.name.isascii() and e.name.isdigit() and e.name == str(int(e.name))
                 and e.is_dir() and not e.is_symlink() and 0 < int(e.name) < active),
                reverse=True,
            )
        except OSError as exc:
            log.warning("old versions not removed", extra={"model": name, "reason": str(exc)})
            return
        for version in older[self.settings.keep_versions - 1 :]:
            if version == last_known_good:
                continue
            try:
                self._remove_version(name, version)
            except OSError as exc:  # the job has succeeded: a leftover is not a failure
                log.warning("old version not removed",
                            extra={"model": name, "version": version, "reason": str(exc)})
                continue
            log.info("old model version removed",
                     extra={"model": name, "version": version, "active_version": active,
                            "keep_versions": self.settings.keep_versions})

    def _remove_version(self, name: str, version: int) -> None:
        target = self.settings.repository / name / str(version)
        if not (target.exists() or target.is_symlink()):
            return
        self.trash.mkdir(parents=True, exist_ok=True)
        holding = self.trash / f"{name}-{version}-{secrets.token_hex(4)}"
        try:
            os.rename(target, holding)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            holding = target.parent / f".removed-{version}-{secrets.token_hex(4)}"
            os.rename(target, holding)
        fsync_dir(target.parent)
        self._remove_tree(holding)

    @staticmethod
    def _remove_tree(path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)

    def _empty(self, directory: Path) -> None:
        for entry in directory.iterdir():
            self._remove_tree(entry)

    # ------------------------------------------------------------------ reports

    async def _save(self) -> None:
        async with self._save_lock:
            data = self.state.to_json()
            try:
                await asyncio.to_thread(write_atomically, self.store.path, data)
            except OSError as exc:
                raise JobFailure(Reason.STORAGE_FAILED, f"cannot save the state: {exc}") from exc

    def _message_head(self, schema: str) -> dict[str, Any]:
        return {
            "schema": schema,
            "version": 1,
            "device": self.settings.device_id,
            "ts": round(self.clock(), 3),
            "message_id": str(uuid.uuid4()),
        }

    def _job_message(self, job: JobRecord) -> dict[str, Any]:
        message = {
            **self._message_head(JOB_SCHEMA),
            "deployment_id": job.deployment_id,
            "sequence": job.sequence,
            "model": job.model,
            "model_version": job.model_version,
            "phase": job.phase,
            "status": job.status,
            "reason_code": job.reason_code,
            "message": job.message,
        }
        if job.phase == str(Phase.DOWNLOADING) and self._progress is not None:
            message["progress"] = {"bytes": self._progress[0], "total": self._progress[1]}
        return message

    def _reported(self, online: bool) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self.models.states()) | set(self.state.models)):
            serving = self.models.versions(name)
            record = self.state.models.get(name)
            models[name] = {
                "active_version": (
                    record.active if record is not None and record.active is not None
                    else (int(serving[-1]) if serving else None)
                ),
                "serving_versions": [int(v) for v in serving],
                "last_known_good": record.last_known_good if record is not None else None,
                "highest_activated": record.highest_activated if record is not None else 0,
            }
        job = self.state.job
        return {
            "schema": REPORTED_SCHEMA,
            "version": 1,
            "device": self.settings.device_id,
            "online": online,
            "since": self._since,
            "ts": round(self.clock(), 3),
            "agent_version": __version__,
            "models": models,
            "job": None if job is None else {
                "deployment_id": job.deployment_id,
                "sequence": job.sequence,
                "model": job.model,
                "model_version": job.model_version,
                "phase": job.phase,
                "status": job.status,
                "reason_code": job.reason_code,
            },
            "highest_sequence": self.state.highest_sequence,
            "tags": list(self.settings.tags),
        }

    async def _publish(self, topic: str, message: dict[str, Any], retain: bool = False) -> None:
        client = self.client
        if client is None:
            return
        try:
            # Not waiting for the PUBACK: the job must not stall while the broker is
            # away; paho sends queued QoS 1 messages once it is back.
            await client.publish(topic, _encode(message), qos=1, retain=retain, wait_ack=False)
        except AgentError as exc:
            log.warning("report not published", extra={"topic": topic, "reason": str(exc)})
        except Exception as exc:  # MqttError is not an AgentError
            log.warning("report not published", extra={"topic": topic, "reason": str(exc)})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _job_log(job: JobRecord) -> dict[str, Any]:
        return {
            "deployment_id": job.deployment_id,
            "sequence": job.sequence,
            "model": job.model,
            "model_version": job.model_version,
            "phase": job.phase,
            "status": job.status,
        }


class _TrustUnavailableError(DeploymentRejectedError):
    code = "trust_store_invalid"


def _fsync_tree(root: Path) -> None:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))
