"""Topic routing and desired-state intake: which message goes where, which
deployment becomes a job, which is rejected (once), deferred or supersedes one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Final, Generic, Protocol

from agent.fleet.lifecycle import JobState
from agent.fleet.ports import ArtifactFetcher, M, Transport
from agent.fleet.reports import Reporter
from agent.fleet.settings import Topics
from agent.protocol.deployment import Deployment, DeploymentRejectedError

log = logging.getLogger("agent.fleet")

REMEMBER_REJECTED: Final = 64


class JobControl(Protocol):
    """What intake needs from the job runner (``Updater``)."""

    def current_state(self) -> JobState: ...
    def current_envelope(self) -> str | None:
        """The SHA-256 of the envelope the current job came in, if any."""
        ...

    def verify(self, payload: bytes) -> Deployment: ...
    async def accept(self, deployment: Deployment) -> None: ...
    async def cancel_job(self, why: str) -> None: ...


class Router(Generic[M]):
    def __init__(
        self, topics: Topics, reporter: Reporter, jobs: JobControl,
        fetcher: ArtifactFetcher[M],
    ) -> None:
        self.topics = topics
        self.reporter = reporter
        self.jobs = jobs
        self.fetcher = fetcher
        self.pending: bytes | None = None  # deferred until the running job ends
        self._rejected: dict[str, str] = {}  # envelope sha256 -> reason (no re-reports)

    async def dispatch(self, transport: Transport[M]) -> None:
        while True:
            message = await transport.messages.get()
            try:
                await self.route(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet message handling failed", extra={"topic": message.topic})

    async def route(self, message: M) -> None:
        if message.topic == self.topics.artifacts:
            self.fetcher.handle(message)
        elif message.topic == self.topics.desired:
            await self.on_desired(message.payload)
        else:
            await self.reporter.report_error(
                "topic_unexpected", f"message on unexpected topic {message.topic[:200]!r}",
                message.topic, message.payload,
            )

    async def on_desired(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message: no desired change
        sha = hashlib.sha256(payload).hexdigest()
        if self.jobs.current_envelope() == sha:
            return  # the retained message again (reconnect, restart)
        if sha in self._rejected or (
            self.pending is not None and hashlib.sha256(self.pending).hexdigest() == sha
        ):
            return
        try:
            deployment = self.jobs.verify(payload)
        except DeploymentRejectedError as exc:
            await self.reject(payload, sha, exc.code, str(exc))
            return
        current = self.jobs.current_state()
        if current.busy and not current.cancellable:
            log.info("deployment deferred until the running job ends",
                     extra={"deployment_id": deployment.deployment_id})
            self.pending = payload
            return
        if current.busy:
            await self.jobs.cancel_job(f"superseded by deployment {deployment.deployment_id}")
            deployment = self.jobs.verify(payload)  # the counters may have moved
        await self.jobs.accept(deployment)

    async def after_job(self) -> None:
        """A job ended: take the deployment that waited for it, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            await self.on_desired(pending)

    async def reject(self, payload: bytes, sha: str, code: str, text: str) -> None:
        self._rejected[sha] = code
        while len(self._rejected) > REMEMBER_REJECTED:
            del self._rejected[next(iter(self._rejected))]
        log.warning("deployment rejected", extra={"reason_code": code, "reason": text})
        await self.reporter.publish(
            self.topics.jobs, self.reporter.rejected_message(payload, code, text)
        )
        await self.reporter.report_error(code, text, self.topics.desired, payload)
