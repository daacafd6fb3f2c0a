"""The agent's durable state: one JSON file in the state directory, replaced atomically.

What it holds (docs/fleet-protocol.md, "Reported state"): the highest deployment
sequence accepted (anti-replay), per model the highest version ever activated
(anti-rollback), the active (pinned) version and the last known good one, and
the current or last update job with its life-cycle phase.

Every save writes a temporary file in the same directory, fsyncs it, renames it
over ``state.json`` and fsyncs the directory, so after a crash or a power cut
the file holds either the old or the new state, never a mixture.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.common.durable import remove_temporaries, write_atomically
from agent.errors import AgentError

STATE_FILENAME: Final = "state.json"
STATE_SCHEMA: Final = "edge.agent_state"
STATE_VERSION: Final = 1


class StateError(AgentError):
    """The state directory cannot be read or written, or its file is not a valid state."""

    code = "state_invalid"


@dataclass(slots=True)
class ModelRecord:
    highest_activated: int = 0  # anti-rollback: the highest version ever activated
    active: int | None = None  # the version the agent serves (pinned); None: repository policy
    last_known_good: int | None = None  # the version to roll back to


@dataclass(slots=True)
class JobRecord:
    """One update job (the current one, or the last one once finished)."""

    deployment: dict[str, Any]  # the verified deployment (agent.protocol.deployment.to_record)
    phase: str
    status: str | None
    reason_code: str = ""
    message: str = ""
    previous_active: int | None = None  # what served before the activation
    previous_last_known_good: int | None = None
    probation_until: float | None = None  # unix seconds
    attempts: int = 0  # start-ups that found the job in its current phase
    installed: bool = False  # the version may have been moved into the repository
    started_at: float = 0.0
    updated_at: float = 0.0

    @property
    def deployment_id(self) -> str:
        return str(self.deployment.get("deployment_id", ""))

    @property
    def sequence(self) -> int:
        return int(self.deployment.get("sequence", 0))

    @property
    def model(self) -> str:
        return str(self.deployment.get("model_name", ""))

    @property
    def model_version(self) -> int:
        return int(self.deployment.get("model_version", 0))


@dataclass(slots=True)
class AgentState:
    highest_sequence: int = 0
    models: dict[str, ModelRecord] = field(default_factory=dict)
    job: JobRecord | None = None

    def model(self, name: str) -> ModelRecord:
        return self.models.setdefault(name, ModelRecord())

    def pins(self) -> dict[str, int]:
        """model -> the version the state says must serve."""
        return {name: m.active for name, m in self.models.items() if m.active is not None}

    def highest_versions(self) -> dict[str, int]:
        return {name: m.highest_activated for name, m in self.models.items()}

    def to_json(self) -> bytes:
        doc = {
            "schema": STATE_SCHEMA,
            "version": STATE_VERSION,
            "highest_sequence": self.highest_sequence,
            "models": {name: asdict(m) for name, m in sorted(self.models.items())},
            "job": asdict(self.job) if self.job is not None else None,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: str = STATE_FILENAME) -> AgentState:
        try:
            doc = json.loads(data)
            if doc.get("schema") != STATE_SCHEMA or doc.get("version") != STATE_VERSION:
                raise ValueError(f"not an {STATE_SCHEMA} version {STATE_VERSION} document")
            models = {str(k): ModelRecord(**v) for k, v in doc["models"].items()}
            job = JobRecord(**doc["job"]) if doc.get("job") is not None else None
            state = cls(int(doc["highest_sequence"]), models, job)
            for name, m in models.items():
                for value in (m.highest_activated, m.active, m.last_known_good):
                    if value is not None and type(value) is not int:
                        raise ValueError(f"model {name}: versions must be integers")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"{source}: not a valid agent state ({exc})") from None
        return state


class StateStore:
    """``state.json`` in ``directory``; ``load`` once at start-up, ``save`` after every change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILENAME

    def ensure(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.directory}: {exc}") from exc
        remove_temporaries(self.directory)

    def load(self) -> AgentState:
        """The saved state, or a fresh one if there is none yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from exc
        return AgentState.from_json(data, str(self.path))

    def save(self, state: AgentState) -> None:
        try:
            write_atomically(self.path, state.to_json())
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
