"""Model manager pins: the version the update state names serves, whatever the policy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelNotFoundError, ModelNotReadyError
from agent.model_manager import LoadSettings, ModelManager
from agent.onnx_runtime import SessionOptions
from tests.fleet_harness import scale_model

SETTINGS = LoadSettings(SessionOptions(), default_instance_count=1, default_max_queue_size=16)


def unsigned(version_dir: Path, filename: str) -> bytes:
    return (version_dir / filename).read_bytes()


def repository(root: Path, versions: dict[int, bytes]) -> Path:
    for version, data in versions.items():
        (root / "m" / str(version)).mkdir(parents=True)
        (root / "m" / str(version) / "model.onnx").write_bytes(data)
    return root


def served(manager: ModelManager) -> list[str]:
    return manager.versions("m")


def answer(manager: ModelManager) -> float:
    model = manager.resolve("m")
    out = model.scheduler.session.run(["y"], {"x": np.ones((1, 4), np.float32)})
    return float(out[0][0, 0])


def test_a_pin_overrides_the_latest_policy(tmp_path: Path) -> None:
    root = repository(tmp_path, {1: scale_model(1), 2: scale_model(2), 3: scale_model(3)})

    async def go() -> None:
        manager = ModelManager(root, unsigned, SETTINGS)
        manager.set_pins({"m": 2})
        await manager.sync_repository()
        assert served(manager) == ["2"]
        assert answer(manager) == 2.0
        await manager.sync_repository()  # a reload keeps the pin
        assert served(manager) == ["2"]
        await manager.close(1)

    asyncio.run(go())


def test_activate_swaps_and_unpinning_returns_to_the_policy(tmp_path: Path) -> None:
    root = repository(tmp_path, {1: scale_model(1), 2: scale_model(2)})

    async def go() -> None:
        manager = ModelManager(root, unsigned, SETTINGS)
        await manager.sync_repository()
        assert served(manager) == ["2"]
        old = manager.resolve("m")
        new = await manager.activate("m", 1)
        assert new is not None and new.spec.version == "1"
        assert served(manager) == ["1"] and manager.pins() == {"m": 1}
        assert manager.resolve("m") is new and old is not new
        assert await manager.activate("m", None) is None
        assert served(manager) == ["2"] and manager.pins() == {}
        await manager.close(1)

    asyncio.run(go())


def test_a_pinned_version_that_fails_to_load_leaves_the_old_one_serving(tmp_path: Path) -> None:
    root = repository(tmp_path, {1: scale_model(1), 2: b"not an onnx model"})

    async def go() -> None:
        manager = ModelManager(root, unsigned, SETTINGS)
        manager.set_pins({"m": 1})
        await manager.sync_repository()
        with pytest.raises(ModelNotReadyError, match="version 2 did not load"):
            await manager.activate("m", 2)
        assert served(manager) == ["1"]
        assert answer(manager) == 1.0
        assert manager.pins() == {"m": 1}
        assert manager.states()["m"]["2"].state == "UNAVAILABLE"
        with pytest.raises(ModelNotFoundError):
            await manager.activate("m", 7)
        assert served(manager) == ["1"]
        await manager.close(1)

    asyncio.run(go())


def test_a_pin_to_a_missing_version_falls_back_to_the_policy(tmp_path: Path) -> None:
    root = repository(tmp_path, {1: scale_model(1), 3: scale_model(3)})

    async def go() -> None:
        manager = ModelManager(root, unsigned, SETTINGS)
        manager.set_pins({"m": 2})
        await manager.sync_repository()
        assert served(manager) == ["3"]
        await manager.close(1)

    asyncio.run(go())
