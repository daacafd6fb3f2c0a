"""Every update path of the real Updater, in-process on in-memory ports (tests/fleet_memory)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.deployment import sign_deployment
from tests.fleet_harness import Keys, deployment_doc, version_files, write_version
from tests.fleet_memory import MODEL, MemoryRig


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys.create(tmp_path / "keys")


def _version(rig: MemoryRig, version: int, **kw: Any) -> dict[str, bytes]:
    directory = write_version(rig.root / "build" / str(version), float(version), rig.keys.model,
                              **kw)
    files = version_files(directory)
    rig.controller.add_files(files)
    return files


def _deploy(rig: MemoryRig, doc: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None
            ) -> None:
    rig.desired(sign_deployment(doc, key or rig.keys.deploy))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_accepted_and_activated(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        doc = deployment_doc(_version(rig, 1), 1, 1, probation_s=2.0)
        _deploy(rig, doc)
        done = await rig.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"})
        assert (done["phase"], done["status"]) == ("Active", "SUCCEEDED")
        assert rig.host.versions(MODEL) == ["1"]
        assert (rig.settings.repository / MODEL / "1" / "model.onnx").is_file()
        state = json.loads((rig.settings.state_dir / "state.json").read_text())
        assert state["models"][MODEL]["active"] == 1
        await rig.stop()
    run(main())


@pytest.mark.parametrize("case", ["signature", "device", "expired", "replay", "rollback",
                                  "oversized"])
def test_rejected(tmp_path: Path, keys: Keys, case: str) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys, max_model_bytes=1 << 20)
        await rig.start()
        files = _version(rig, 5)
        if case in ("replay", "rollback"):
            first = deployment_doc(files, 5, 10, probation_s=0.5)
            _deploy(rig, first)
            await rig.wait_job(first["deployment_id"], {"SUCCEEDED"})
        key = None
        doc = deployment_doc(files, 5, 11, probation_s=0.5)
        if case == "signature":
            key = ec.generate_private_key(ec.SECP256R1())
        elif case == "device":
            doc = deployment_doc(files, 5, 11, device="someone-else")
        elif case == "expired":
            doc = deployment_doc(files, 5, 11, now=rig.clock.time() - 7200)
        elif case == "replay":
            doc = deployment_doc(files, 5, 10)
        elif case == "rollback":
            doc = deployment_doc(_version(rig, 4), 4, 11)
        elif case == "oversized":
            doc["model"]["files"][0]["size"] = 2 << 20
        _deploy(rig, doc, key)
        done = await rig.wait_job(doc["deployment_id"], {"REJECTED", "FAILED"})
        assert done["status"] == "REJECTED", done
        assert rig.transport.reports("errors")
        await rig.stop()
    run(main())


def test_mix_and_match_fails_after_download(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        files = dict(_version(rig, 1))
        files["model.onnx"] = version_files(rig.root / "build" / "1")["model.onnx"]
        other = _version(rig, 2)
        files["validation.npz"] = other["validation.npz"]  # signed for another version
        _deploy(rig, deployment_doc(files, 1, 1))
        done = await rig.wait_job(None, {"FAILED", "REJECTED"})
        assert done["status"] == "FAILED" and rig.host.versions(MODEL) == []
        await rig.stop()
    run(main())


def test_validation_failure_never_serves(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        files = _version(rig, 1)
        rig.validator.bad.add(files["model.onnx"])
        doc = deployment_doc(files, 1, 1)
        _deploy(rig, doc)
        done = await rig.wait_job(doc["deployment_id"], {"FAILED", "SUCCEEDED"})
        assert done["reason_code"] == "validation_failed"
        assert rig.host.versions(MODEL) == []
        assert not (rig.settings.repository / MODEL / "1").exists()
        await rig.stop()
    run(main())


def test_probation_faults_roll_back(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        first = deployment_doc(_version(rig, 1), 1, 1, probation_s=0.5)
        _deploy(rig, first)
        await rig.wait_job(first["deployment_id"], {"SUCCEEDED"})
        doc = deployment_doc(_version(rig, 2), 2, 2, probation_s=3600.0)
        rig.clock.running.clear()
        _deploy(rig, doc)
        for _ in range(5000):  # bounded: until probation watches version 2
            if rig.clock.sleeping:
                break
            await asyncio.sleep(0.002)
        assert rig.host.versions(MODEL) == ["2"]
        rig.host.serving[MODEL]["2"].stats.faults += 10
        rig.clock.running.set()
        done = await rig.wait_job(doc["deployment_id"], {"FAILED", "SUCCEEDED"})
        assert (done["phase"], done["reason_code"]) == ("RolledBack", "probation_failed")
        assert rig.host.versions(MODEL) == ["1"]
        await rig.stop()
    run(main())


def test_newer_deployment_cancels_a_download(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        rig.controller.open.clear()  # the first download hangs
        old = deployment_doc(_version(rig, 1), 1, 1)
        _deploy(rig, old)
        await rig.wait_job(old["deployment_id"], {"IN_PROGRESS"})
        new = deployment_doc(_version(rig, 2), 2, 2, probation_s=0.5)
        _deploy(rig, new)
        canceled = await rig.wait_job(old["deployment_id"], {"CANCELED"})
        assert canceled["reason_code"] == "superseded"
        rig.controller.open.set()
        done = await rig.wait_job(new["deployment_id"], {"SUCCEEDED", "FAILED"})
        assert done["status"] == "SUCCEEDED" and rig.host.versions(MODEL) == ["2"]
        await rig.stop()
    run(main())


def test_restart_mid_download_resumes(tmp_path: Path, keys: Keys) -> None:
    async def main() -> None:
        rig = MemoryRig(tmp_path, keys)
        await rig.start()
        files = _version(rig, 1, padding=200_000)
        total = sum(len(d) for d in files.values())
        doc = deployment_doc(files, 1, 1, probation_s=0.5)
        _deploy(rig, doc)
        for _ in range(5000):  # bounded: part of it arrived
            if rig.controller.served > total // 3:
                break
            await asyncio.sleep(0.001)
        rig.controller.open.clear()
        await rig.stop()  # the job stays in progress on disk
        rig.controller.open.set()
        served_before = rig.controller.served
        await rig.start()  # a new updater on the same state
        done = await rig.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"})
        assert done["status"] == "SUCCEEDED", done
        assert rig.controller.served - served_before < total  # resumed, not restarted
        assert rig.host.versions(MODEL) == ["1"]
        await rig.stop()
    run(main())
