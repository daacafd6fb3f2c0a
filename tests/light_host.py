"""Light stand-ins for the updater's ``ModelHost`` and ``VersionValidator``
(agent.fleet.ports): no onnxruntime, no model run.

Shared by the in-process rig (tests/fleet_memory.py) and the device simulator
(tests/bench/fleet_sim.py); each subclass says what activation and validation
check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.buffers import FileBytes
from agent.fleet.ports import Validated


@dataclass
class _Success:
    count: int = 0


@dataclass
class _Stats:
    faults: int = 0
    success: _Success = field(default_factory=_Success)


@dataclass
class Served:
    """One serving version's statistics, the fields probation reads."""

    stats: _Stats = field(default_factory=_Stats)


class LightHostBase:
    """Which version of each model serves; one version at a time, nothing loaded."""

    def __init__(self) -> None:
        self.serving: dict[str, dict[str, Served]] = {}

    def versions(self, name: str) -> list[str]:
        return sorted(self.serving.get(name, {}), key=int)

    def states(self) -> dict[str, object]:
        return dict(self.serving)

    def serving_versions(self, name: str) -> dict[str, Served]:
        return self.serving.get(name, {})

    def check_activation(self, name: str, version: int) -> None:
        """Raise to refuse activating ``name``/``version``; the base accepts."""

    async def activate(self, name: str, version: int | None, prepared: Any = None) -> object:
        if version is None:
            self.serving.pop(name, None)
            return None
        self.check_activation(name, version)
        served = Served()
        self.serving[name] = {str(version): served}
        return served

    def free(self, session: Any) -> None:
        pass


class LightValidatorBase:
    """A validator for a plain ``model.onnx`` without external data; ``check`` decides."""

    mode = "light"

    @property
    def extra_files(self) -> tuple[str, ...]:
        return ()  # nothing more to read from disk

    def model_file(self, model_name: str, config_text: str | None) -> str:
        return "model.onnx"

    def referenced_files(self, model_path: Path) -> tuple[str, ...]:
        return ()  # no external data

    def check(self, model: FileBytes) -> object:
        """Raise to fail validation; return what ``Validated.prepared`` carries."""
        return None

    async def validate(
        self, model_name: str, config_text: str | None, model: FileBytes,
        contents: Mapping[str, FileBytes],
    ) -> Validated:
        return Validated(prepared=self.check(model), mode=self.mode)
