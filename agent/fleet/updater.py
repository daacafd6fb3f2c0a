"""The update orchestrator: desired state in, life cycle driven, progress reported.

It receives signed deployments on ``{p}/devices/{d}/desired`` (``routing``),
verifies them (``trust``, ``deployment``), and runs one job at a time through
the life cycle (``lifecycle``): download (``staging``, ``downloader``) into the
state directory, verify the model signature and the deployment's digests,
validate in a fresh session (the ``VersionValidator`` port), install
(``install``), activate (the ``ModelHost`` port), watch a probation window,
roll back automatically if the new version misbehaves. Every step is persisted
(the ``StateFile`` port) before it is reported (``reports``) on
``{p}/devices/{d}/jobs``; the retained ``{p}/devices/{d}/reported`` carries the
device's state (birth on connect, a last will that marks it offline).

The outside world is reached only through ``ports``: the composition root
(``agent.app``) passes the MQTT client, the chunk fetcher, the model manager,
the validator and the clock; tests pass in-memory ones.

Activation renames the staged version directory into ``<repo>/<model>/<version>``,
then the model host loads and warms it while the old version serves, switches,
and lets the old one drain. A crash at any point is recovered at start-up
(``prepare`` before the repository is first loaded, ``start`` after): the
version the state pins is the one that serves, and the job resumes where its
persisted phase says, or fails with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final, Generic

from agent.common.buffers import release
from agent.common.durable import write_atomically
from agent.errors import AgentError
from agent.fleet import lifecycle
from agent.fleet.failures import JobFailure, failpoint
from agent.fleet.install import Installer
from agent.fleet.lifecycle import Event, JobState, Phase, Reason, Recovery
from agent.fleet.ports import (
    ArtifactFetcher,
    Clock,
    LastWill,
    M,
    ModelHost,
    Prepared,
    StateFile,
    SystemClock,
    Transport,
    VersionValidator,
)
from agent.fleet.reports import Reporter, encode, job_log
from agent.fleet.routing import Router
from agent.fleet.settings import Topics, UpdaterSettings
from agent.fleet.staging import download, same_files, verify_staged
from agent.fleet.state_store import AgentState, JobRecord
from agent.fleet.trust import Trust
from agent.protocol.deployment import (
    MAX_MESSAGE_BYTES,
    Deployment,
    DeviceContext,
    from_record,
    to_record,
)

log = logging.getLogger("agent.fleet")

PROGRESS_EVERY_S: Final = 1.0
PROBATION_TICK_S: Final = 0.25


class Updater(Generic[M]):
    """One device's side of the fleet protocol (see the module docstring).

    ``M``: the transport's message type (the artifact fetcher takes the same).
    """

    def __init__(
        self,
        settings: UpdaterSettings,
        models: ModelHost,
        validator: VersionValidator,
        store: StateFile,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.validator = validator
        self.store = store
        self._clock: Clock = clock or SystemClock()
        self.clock = self._clock.time
        self.topics = Topics.of(settings.prefix, settings.device_id)
        self.files = Installer(settings.state_dir, settings.repository, settings.keep_versions)
        self.reports = Reporter(settings.device_id, settings.tags, self.topics, models,
                                self.clock)
        self.state = AgentState()
        self.state_error = ""  # set if the state file could not be used
        self.trust = Trust()  # loaded by start()
        self.client: Transport[M] | None = None
        self.router: Router[M] | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._save_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_progress = 0.0
        self._progress: tuple[int, int] | None = None
        self._fetcher: ArtifactFetcher[M] | None = None

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
            self.files.prepare_directories()
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
        managed = set(self.state.models) | ({job.model} if job is not None else set())
        self.files.remove_leftovers(job if busy else None, managed)
        if job is not None and busy:
            state = self._job_state(job)
            if lifecycle.recovery(state) in (Recovery.ACTIVATE, Recovery.PROBATION):
                job.attempts += 1  # a start-up inside activation or probation: count it

    def will(self) -> LastWill:
        return LastWill(self.topics.reported, encode(self._reported(online=False)), retain=True)

    async def start(self, client: Transport[M], fetcher: ArtifactFetcher[M]) -> None:
        """After serving started: connect (in the background) and resume the job.

        ``fetcher`` requests chunks over ``client``; its answers arrive on the
        device's artifacts topic, which the updater hands to it."""
        self.trust = Trust.load(self.settings.deployment_trust_dir, self.settings.model_trust_dir)
        self.client = client
        self.reports.transport = client
        self._fetcher = fetcher
        router = self.router = Router(self.topics, self.reports, self, fetcher)
        client.on_connected(self._on_connected)
        await client.subscribe(self.topics.artifacts, qos=1)
        if not self.state_error:
            await client.subscribe(self.topics.desired, qos=1)
        self._dispatch_task = asyncio.create_task(router.dispatch(client), name="fleet-dispatch")
        await client.start()
        job = self.state.job
        if job is not None and self._job_state(job).busy and not self.state_error:
            log.info("resuming update job", extra=job_log(job))
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
                                       encode(self._reported(online=False)), retain=True),
                        timeout / 2,
                    )
            await client.stop()
        for task in [self._dispatch_task, *self._tasks]:
            if task is not None:
                task.cancel()

    async def _on_connected(self) -> None:
        await self.reports.publish(self.topics.reported, self._reported(online=True),
                                   retain=True)
        job = self.state.job
        if job is not None:
            await self.reports.publish(self.topics.jobs, self._job_message(job))
        if self.state_error:
            await self.reports.report_error("state_invalid", self.state_error,
                                            self.topics.desired, b"")

    # ------------------------------------------------------------------ intake (JobControl)

    def current_state(self) -> JobState:
        job = self.state.job
        return lifecycle.IDLE if job is None else self._job_state(job)

    def current_envelope(self) -> str | None:
        job = self.state.job
        envelope = job.deployment.get("envelope_sha256") if job is not None else None
        return envelope if isinstance(envelope, str) else None

    def verify(self, payload: bytes) -> Deployment:
        context = DeviceContext(
            device_id=self.settings.device_id,
            now=self.clock(),
            highest_sequence=self.state.highest_sequence,
            highest_versions=self.state.highest_versions(),
            max_model_bytes=self.settings.max_model_bytes,
            max_clock_skew_s=self.settings.max_clock_skew_s,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )
        return self.trust.verify_deployment(payload, context)

    async def accept(self, deployment: Deployment) -> None:
        now = self.clock()
        serving = self.models.versions(deployment.model_name)
        record = self.state.models.get(deployment.model_name)
        previous = record.active if record is not None and record.active is not None else (
            int(max(serving, key=int)) if serving else None
        )
        state = lifecycle.apply(self.current_state(), Event.OFFER)
        before = (self.state.highest_sequence, self.state.job)
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
        try:
            await self._save()
        except JobFailure as failure:
            await self._refuse_unsaved(state, failure)
            self.state.highest_sequence, self.state.job = before
            return
        log.info("deployment accepted", extra=job_log(self.state.job))
        failpoint("accepted", deployment.sequence)
        await self._announce()
        self._start_job()

    async def _refuse_unsaved(self, offered: JobState, failure: JobFailure) -> None:
        """The accepted job could not be saved (a full disk, say): report it failed.

        Nothing of it is on disk, so the state stays as it was and the retained
        deployment is offered again after a restart, once there is space.
        """
        job = self.state.job
        assert job is not None
        failed = lifecycle.apply(offered, Event.FAIL, failure.reason)
        job.phase, job.status = str(failed.phase), str(failed.status)
        job.reason_code, job.message = failed.reason_code, failure.message[:1000]
        log.error("deployment not started: the state cannot be saved",
                  extra={**job_log(job), "reason": failure.message})
        await self.reports.publish(self.topics.jobs, self._job_message(job))

    async def cancel_job(self, why: str) -> None:
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

    # ------------------------------------------------------------------ jobs

    def _job_state(self, job: JobRecord) -> JobState:
        return lifecycle.from_names(job.phase, job.status, job.reason_code)

    def _start_job(self) -> None:
        self._job_task = asyncio.create_task(self._run_job(), name="fleet-job")

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
            state = self.current_state()
            event = Event.ROLL_BACK if state.in_probation else Event.FAIL
            await self._end_job(JobFailure(Reason.INTERRUPTED, f"internal error: {exc}", event))
        if self.router is not None:
            await self.router.after_job()

    async def _end_job(self, failure: JobFailure) -> None:
        job = self.state.job
        assert job is not None
        state = self.current_state()
        if state.in_probation or failure.event is Event.ROLL_BACK:
            await self._roll_back(failure.reason, failure.message)
            return
        event = failure.event if failure.event in (Event.FAIL, Event.TIME_OUT) else Event.FAIL
        log.warning("update job failed",
                    extra={**job_log(job), "reason_code": failure.reason,
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
        log.info("update job", extra={**job_log(job), "event": str(event)})
        if announce:
            await self._announce()

    # -- download, verification, validation -----------------------------------

    async def _download(self, deployment: Deployment) -> None:
        if self.current_state().phase is Phase.OFFERED:
            await self._transition(Event.START_DOWNLOAD)
        assert self._fetcher is not None
        await download(
            deployment, self.files, self._fetcher, self.settings.download,
            self.settings.download_timeout_s, self._clock, self._on_progress,
            lambda: self._progress,
        )
        await self._verify_staged(deployment, load=())
        await self._transition(Event.DOWNLOAD_VERIFIED)

    def _on_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)
        now = self._clock.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S or done == total:
            self._last_progress = now
            job = self.state.job
            if job is not None:
                self._spawn(self.reports.publish(self.topics.jobs, self._job_message(job)))

    async def _verify_staged(self, deployment: Deployment, load: tuple[str, ...]) -> dict[str, Any]:
        return await verify_staged(
            deployment, self.files.staged_version(deployment), self.trust.models(), load
        )

    async def _validate(self, deployment: Deployment) -> Prepared:
        """Verify and test-run the staged version; the session that passed, for _activate."""
        if self.current_state().phase is Phase.VERIFIED:
            await self._transition(Event.START_VALIDATION)
        try:
            config_text = await asyncio.to_thread(self.files.config_text, deployment)
        except (OSError, UnicodeDecodeError) as exc:
            raise JobFailure(Reason.VALIDATION_FAILED, f"model config unusable: {exc}") from None
        try:
            model_file = self.validator.model_file(deployment.model_name, config_text)
        except AgentError as exc:
            raise JobFailure(Reason.VALIDATION_FAILED, str(exc)) from None
        names = {f.path for f in deployment.files}
        if model_file not in names:
            raise JobFailure(Reason.VALIDATION_FAILED, f"the version has no {model_file}")
        referenced = await asyncio.to_thread(
            self.validator.referenced_files, self.files.staged_version(deployment) / model_file
        )
        unlisted = sorted(set(referenced) - names)
        if unlisted:
            raise JobFailure(Reason.VALIDATION_FAILED,
                             f"{model_file} reads external data from files the deployment does "
                             f"not list: {', '.join(unlisted)[:300]}")
        load = tuple(dict.fromkeys(
            n for n in (model_file, *self.validator.extra_files, *referenced) if n in names
        ))
        contents = await self._verify_staged(deployment, load)
        model_bytes = contents.pop(model_file)
        # A fresh session of its own (the validator's), on a low-priority thread.
        try:
            result = await self.validator.validate(
                deployment.model_name, config_text, model_bytes, contents
            )
        except AgentError as exc:
            raise JobFailure(Reason.VALIDATION_FAILED, str(exc)) from None
        finally:
            # The session holds its own copy. Hundreds of MB go back to the kernel
            # here: on a thread, not on the loop at the moment of the switch.
            await asyncio.shield(asyncio.to_thread(release, model_bytes, *contents.values()))
        log.info("staged version validated",
                 extra={"model": deployment.model_name, "version": deployment.model_version,
                        "mode": result.mode, "max_abs_error": result.max_abs_error})
        try:
            await self._transition(Event.VALIDATION_PASSED)
            failpoint("validated", deployment.sequence)
        except BaseException:
            self.models.free(result.prepared)
            raise
        return result.prepared

    # -- activation -----------------------------------------------------------

    async def _activate(self, deployment: Deployment, validated: Prepared) -> None:
        """Install the staged version and make it serve; ``validated``: the session
        _validate made from its verified bytes (None after a restart), which the model
        host serves instead of loading the version again."""
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
        target = self.files.target(name, version)
        staged = self.files.staged_version(deployment)
        if staged.exists():
            if target.exists() or target.is_symlink():
                if str(version) in self.models.versions(name) or record.active == version:
                    # Re-deploying a version that is on disk and serving: same files or refuse.
                    if not await same_files(deployment, target, self.trust.models()):
                        raise JobFailure(
                            Reason.ACTIVATION_FAILED,
                            f"version {deployment.model_version} serves with other files; "
                            "deploy a new version number",
                        )
                    await asyncio.to_thread(self.files.remove_tree, staged)
                else:
                    await asyncio.to_thread(self.files.remove_version, name, version)
            if staged.exists():
                job.installed = True
                await self._save()
                try:
                    await asyncio.to_thread(self.files.install, staged, target)
                    failpoint("installed", deployment.sequence)
                except OSError as exc:
                    raise JobFailure(
                        Reason.STORAGE_FAILED, f"cannot move the version into the repository: {exc}"
                    ) from None
        elif not target.is_dir():
            raise JobFailure(Reason.INTERRUPTED, "the staged version is gone")
        if deployment.config is not None:
            await asyncio.to_thread(self.files.swap_config, deployment)

    # -- probation and roll back ------------------------------------------------

    async def _probation(self, deployment: Deployment) -> None:
        job = self.state.job
        assert job is not None
        if not self.current_state().in_probation:
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
            await self._clock.sleep(min(PROBATION_TICK_S, remaining))
        record = self.state.model(name)
        record.last_known_good = deployment.model_version
        await self._transition(Event.PROBATION_PASSED, announce=False)
        failpoint("probation_passed", deployment.sequence)
        await asyncio.to_thread(self._finish_files, job)
        await asyncio.to_thread(
            self.files.prune_versions, name, deployment.model_version, record.last_known_good
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
        log.warning("rolling back", extra={**job_log(job), "to_version": good,
                                           "reason_code": reason, "reason": message})
        # Persisted first (a crash from here on ends on the last known good at
        # start-up), reported once the last known good serves again.
        await self._transition(Event.ROLL_BACK, reason, message, announce=False)
        failpoint("rolling_back", job.sequence)
        await asyncio.to_thread(self.files.restore_config, job)
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

    def _finish_files(self, job: JobRecord) -> None:
        """Blocking, idempotent: what a finished job leaves behind is put right and removed."""
        state = self._job_state(job)
        failed = state.terminal and state.status is not lifecycle.JobStatus.SUCCEEDED
        record = self.state.models.get(job.model)
        self.files.finish(job, failed, record.active if record is not None else None)

    # ------------------------------------------------------------------ reports

    async def _save(self) -> None:
        async with self._save_lock:
            data = self.state.to_json()
            try:
                await asyncio.to_thread(write_atomically, self.store.path, data)
            except OSError as exc:
                raise JobFailure(Reason.STORAGE_FAILED, f"cannot save the state: {exc}") from exc

    def _job_message(self, job: JobRecord) -> dict[str, Any]:
        return self.reports.job_message(job, self._progress)

    def _reported(self, online: bool) -> dict[str, Any]:
        return self.reports.reported(self.state, online)

    async def _announce(self) -> None:
        job = self.state.job
        if job is not None:
            await self.reports.publish(self.topics.jobs, self._job_message(job))
        await self.reports.publish(self.topics.reported, self._reported(online=True),
                                   retain=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
