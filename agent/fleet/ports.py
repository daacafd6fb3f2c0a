"""What the updater needs from the outside world, as small structural interfaces.

The updater reaches the broker, the controllers' chunk service, the serving
side, the disk state and the clock only through these. The composition root
(``agent.app``) passes the real adapters (``MqttClient``, ``MqttChunkFetcher``,
``ModelManager``, ``OnnxVersionValidator``, ``StateStore``, ``SystemClock``);
tests pass in-memory ones (``tests/fleet_memory.py``), so every update path runs
in-process without a broker, onnxruntime or wall-clock waits. Nothing here
imports ``agent.serving`` or ``agent.mqtt``: those satisfy the ports structurally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.common.buffers import FileBytes
from agent.fleet.downloader import ChunkFetcher
from agent.fleet.state_store import AgentState

# A session (or whatever the host serves) made by the validator from the verified
# bytes and handed to the host on activation. Opaque to the updater.
Prepared = Any


class InboundMessage(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


M = TypeVar("M", bound=InboundMessage)
M_co = TypeVar("M_co", bound=InboundMessage, covariant=True)
M_contra = TypeVar("M_contra", bound=InboundMessage, contravariant=True)


class Inbox(Protocol[M_co]):
    async def get(self) -> M_co: ...


class Transport(Protocol[M_co]):
    """The device's one broker connection (``agent.mqtt.client.MqttClient``)."""

    @property
    def connected(self) -> asyncio.Event: ...
    @property
    def messages(self) -> Inbox[M_co]: ...

    def on_connected(self, hook: Callable[[], Coroutine[Any, Any, None]]) -> None: ...
    async def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...
    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
        *, wait_ack: bool = True,
    ) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ArtifactFetcher(ChunkFetcher, Protocol[M_contra]):
    """A ``ChunkFetcher`` whose answers arrive on the device's artifacts topic
    (``agent.adapters.chunk_fetcher.MqttChunkFetcher``): the updater hands them over."""

    def handle(self, message: M_contra) -> None: ...


@dataclass(frozen=True, slots=True)
class LastWill:
    """What the broker publishes for the device when its connection dies."""

    topic: str
    payload: bytes
    retain: bool = True


# -- the serving side ----------------------------------------------------------


class SuccessCount(Protocol):
    @property
    def count(self) -> int: ...


class VersionStats(Protocol):
    @property
    def faults(self) -> int: ...
    @property
    def success(self) -> SuccessCount: ...


class ServedVersion(Protocol):
    @property
    def stats(self) -> VersionStats: ...


class ModelHost(Protocol):
    """The models the updater installs into (``agent.serving.model_manager.ModelManager``)."""

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` that serve, ascending."""
        ...

    def states(self) -> Mapping[str, object]:
        """Every model the host knows (keys: model names)."""
        ...

    def serving_versions(self, name: str) -> Mapping[str, ServedVersion]: ...

    async def activate(
        self, name: str, version: int | None, prepared: Prepared = None
    ) -> object:
        """Pin ``name`` to ``version`` (None: unpin) and make it serve, or raise AgentError."""
        ...

    def free(self, session: Prepared) -> None:
        """Release a prepared session that will not serve."""
        ...


@dataclass(frozen=True, slots=True)
class Validated:
    """A staged version that passed validation."""

    prepared: Prepared  # for ModelHost.activate
    mode: str  # how it was checked (test vectors, zero inputs...)
    max_abs_error: float = 0.0


class VersionValidator(Protocol):
    """Checks a staged version in a fresh session
    (``agent.adapters.fleet.OnnxVersionValidator``)."""

    @property
    def extra_files(self) -> tuple[str, ...]:
        """The version's other files the check reads, where the version has them."""
        ...

    def model_file(self, model_name: str, config_text: str | None) -> str:
        """The file the model config names (default ``model.onnx``); AgentError if the
        config is unusable or names another model."""
        ...

    def referenced_files(self, model_path: Path) -> tuple[str, ...]:
        """The files the staged model names for its weights (ONNX external data).

        Read before verification only to know what to load with it: the session
        checks the verified model's references against the verified files again.
        """
        ...

    async def validate(
        self, model_name: str, config_text: str | None, model: FileBytes,
        contents: Mapping[str, FileBytes],
    ) -> Validated:
        """Load ``model`` and run it (test vectors, spec, or zero inputs); AgentError if
        it fails. ``contents``: the version's other verified files the check reads."""
        ...


# -- state and time -------------------------------------------------------------


class StateFile(Protocol):
    """Where the fleet state persists (``agent.fleet.state_store.StateStore``)."""

    @property
    def path(self) -> Path: ...

    def ensure(self) -> None:
        """Create the state directory (private to the agent) if need be."""
        ...

    def load(self) -> AgentState: ...
    def save(self, state: AgentState) -> None: ...


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (deployment freshness, report time stamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds for deadlines and rates."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
