"""Model manager pins: the version the update state names serves, whatever the policy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelNotFoundError, ModelNotReadyError
from agent.serving.model_manager import LoadSettings, ModelManager
from agent.serving.onnx_runtime import OnnxSession, SessionOptions
from tests.fleet_harness import scale_model

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def test_a_prepared_session_without_shared_pools_is_freed_and_the_version_loads_from_disk(
    tmp_path: Path,
) -> None:
    """Without the process-wide pools a validation session is single-threaded (and was
    made at a low priority): it must not serve."""
    root = repository(tmp_path, {1: scale_model(1), 2: scale_model(2)})
    prepared = OnnxSession(scale_model(7), SessionOptions(intra_op_threads=1))

    async def go() -> None:
        manager = ModelManager(root, unsigned, SETTINGS)
        await manager.sync_repository()
        await manager.activate("m", 1, prepared=prepared)
        assert answer(manager) == 1.0  # read from the repository
        await manager.close(1)

    asyncio.run(go())
    with pytest.raises(RuntimeError, match="closed"):
        prepared.run(["y"], {"x": np.ones((1, 4), np.float32)})


# With shared pools (made once per process: a fresh interpreter).
PREPARED_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from agent.errors import ModelNotFoundError
    from agent.serving.model_manager import LoadSettings, ModelManager
    from agent.serving.onnx_runtime import OnnxSession, SessionOptions, share_thread_pools
    from tests.fleet_harness import scale_model

    assert share_thread_pools(1, 0)
    root = Path(sys.argv[2])
    for version in (1, 2):
        (root / "m" / str(version)).mkdir(parents=True)
        (root / "m" / str(version) / "model.onnx").write_bytes(scale_model(version))
    reads = []

    def reader(version_dir, filename):
        reads.append(version_dir.name)
        return (version_dir / filename).read_bytes()

    def answer(manager):
        out = manager.resolve("m").scheduler.session.run(
            ["y"], {"x": np.ones((1, 4), np.float32)})
        return float(out[0][0, 0])

    settings = LoadSettings(SessionOptions(), 1, 16)
    # Made "elsewhere" from other bytes than the disk holds, to see which one serves.
    prepared = OnnxSession(scale_model(7), SessionOptions(intra_op_threads=1))
    again = OnnxSession(scale_model(8), SessionOptions())
    other_opt = OnnxSession(scale_model(9), SessionOptions(graph_optimization="basic"))
    missing = OnnxSession(scale_model(5), SessionOptions())

    async def go():
        manager = ModelManager(root, reader, settings)
        await manager.sync_repository()
        assert reads == ["2"], reads
        await manager.activate("m", 1, prepared=prepared)
        assert answer(manager) == 7.0 and reads == ["2"], reads  # served, not read
        await manager.activate("m", 1, prepared=again)  # already serving: freed
        assert answer(manager) == 7.0
        await manager.activate("m", 2, prepared=other_opt)  # other options: freed
        assert answer(manager) == 2.0 and reads == ["2", "2"], reads
        try:  # no such version on disk: refused, and the session freed all the same
            await manager.activate("m", 5, prepared=missing)
        except ModelNotFoundError:
            pass
        else:
            raise AssertionError("activated a version that is not on disk")
        await manager.close(1)

    asyncio.run(go())
    for unused in (again, other_opt, missing):
        try:
            unused.run(["y"], {"x": np.ones((1, 4), np.float32)})
        except RuntimeError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("an unused prepared session was not freed")
    print("OK")
    """
)


def test_a_prepared_session_serves_instead_of_a_second_load_with_shared_pools(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PREPARED_SCRIPT, str(REPO_ROOT), str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]
