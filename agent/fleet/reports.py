"""What the updater says upstream: job progress, rejections, errors, the reported state.

Messages are JSON (sorted keys, no spaces); every one carries the schema, the
device, a time stamp and a message id. They are published without waiting for
the broker's acknowledgement: a job must not stall while the broker is away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Final

from agent import __version__
from agent.errors import AgentError
from agent.fleet import lifecycle
from agent.fleet.lifecycle import Phase
from agent.fleet.ports import InboundMessage, ModelHost, Transport
from agent.fleet.settings import Topics
from agent.fleet.state_store import AgentState, JobRecord
from agent.protocol.deployment import peek_deployment_id

log = logging.getLogger("agent.fleet")

JOB_SCHEMA: Final = "edge.job_progress"
REPORTED_SCHEMA: Final = "edge.reported_state"
ERROR_SCHEMA: Final = "edge.error_report"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8")


def job_log(job: JobRecord) -> dict[str, Any]:
    """The job's fields for a log record."""
    return {
        "deployment_id": job.deployment_id,
        "sequence": job.sequence,
        "model": job.model,
        "model_version": job.model_version,
        "phase": job.phase,
        "status": job.status,
    }


class Reporter:
    def __init__(
        self, device_id: str, tags: tuple[str, ...], topics: Topics, models: ModelHost,
        clock: Callable[[], float],
    ) -> None:
        self.device_id = device_id
        self.tags = tags
        self.topics = topics
        self.models = models
        self.clock = clock
        self.since = clock()
        self.transport: Transport[InboundMessage] | None = None  # set by Updater.start

    def head(self, schema: str) -> dict[str, Any]:
        return {
            "schema": schema,
            "version": 1,
            "device": self.device_id,
            "ts": round(self.clock(), 3),
            "message_id": str(uuid.uuid4()),
        }

    def job_message(self, job: JobRecord, progress: tuple[int, int] | None) -> dict[str, Any]:
        message = {
            **self.head(JOB_SCHEMA),
            "deployment_id": job.deployment_id,
            "envelope_sha256": job.deployment.get("envelope_sha256"),
            "sequence": job.sequence,
            "model": job.model,
            "model_version": job.model_version,
            "phase": job.phase,
            "status": job.status,
            "reason_code": job.reason_code,
            "message": job.message,
        }
        if job.phase == str(Phase.DOWNLOADING) and progress is not None:
            message["progress"] = {"bytes": progress[0], "total": progress[1]}
        return message

    def rejected_message(self, payload: bytes, code: str, text: str) -> dict[str, Any]:
        report = lifecycle.rejected(code)
        return {
            **self.head(JOB_SCHEMA),
            "deployment_id": peek_deployment_id(payload),
            # The bytes judged: the controller counts a report only for an envelope it published.
            "envelope_sha256": hashlib.sha256(payload).hexdigest(),
            "sequence": None,
            "model": None,
            "model_version": None,
            "phase": str(report.phase),
            "status": str(report.status),
            "reason_code": code,
            "message": text[:1000],
        }

    def error_message(self, code: str, text: str, topic: str, payload: bytes) -> dict[str, Any]:
        return {
            **self.head(ERROR_SCHEMA),
            "reason_code": code,
            "message": text[:1000],
            "topic": topic[:256],
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }

    def reported(self, state: AgentState, online: bool) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self.models.states()) | set(state.models)):
            serving = self.models.versions(name)
            record = state.models.get(name)
            models[name] = {
                "active_version": (
                    record.active if record is not None and record.active is not None
                    else (int(serving[-1]) if serving else None)
                ),
                "serving_versions": [int(v) for v in serving],
                "last_known_good": record.last_known_good if record is not None else None,
                "highest_activated": record.highest_activated if record is not None else 0,
            }
        job = state.job
        return {
            "schema": REPORTED_SCHEMA,
            "version": 1,
            "device": self.device_id,
            "online": online,
            "since": self.since,
            "ts": round(self.clock(), 3),
            "agent_version": __version__,
            "models": models,
            "job": None if job is None else {
                "deployment_id": job.deployment_id,
                "envelope_sha256": job.deployment.get("envelope_sha256"),
                "sequence": job.sequence,
                "model": job.model,
                "model_version": job.model_version,
                "phase": job.phase,
                "status": job.status,
                "reason_code": job.reason_code,
            },
            "highest_sequence": state.highest_sequence,
            "tags": list(self.tags),
        }

    async def publish(self, topic: str, message: dict[str, Any], retain: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            # Not waiting for the PUBACK: the job must not stall while the broker is
            # away; paho sends queued QoS 1 messages once it is back.
            await transport.publish(topic, encode(message), qos=1, retain=retain, wait_ack=False)
        except AgentError as exc:
            log.warning("report not published", extra={"topic": topic, "reason": str(exc)})
        except Exception as exc:  # MqttError is not an AgentError
            log.warning("report not published", extra={"topic": topic, "reason": str(exc)})

    async def report_error(self, code: str, text: str, topic: str, payload: bytes) -> None:
        await self.publish(self.topics.errors, self.error_message(code, text, topic, payload))
