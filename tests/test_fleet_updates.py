"""Fleet updates end to end: a real mosquitto, a real agent process, tritonclient.

The test process plays the controller (tests/fleet_harness.py): it signs
deployments with the deployment key, answers chunk requests, and reads what the
device reports. The agent runs as ``edge-agent serve`` in a subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives.asymmetric import ec
from tritonclient.utils import InferenceServerException

from agent.protocol.deployment import sign_deployment
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version
from tests.agent_process import AgentProcess
from tests.fleet_harness import (
    BATCHING_CONFIG_PBTXT,
    CONFIG_PBTXT,
    DEVICE,
    MODEL,
    Keys,
    TestController,
    agent_config,
    deployment_doc,
    phases,
    repository_problems,
    version_files,
    write_version,
)
from tests.mqtt_broker import MosquittoBroker, free_port

pytestmark = pytest.mark.timeout(120)


@dataclass
class Fleet:
    tmp: Path
    broker: MosquittoBroker
    keys: Keys
    repository: Path
    state: Path
    controller: TestController
    agent: AgentProcess
    config: Path
    sequence: int = 10
    next_version: int = 2

    def seq(self) -> int:
        self.sequence += 1
        return self.sequence

    def version(self, k: float | None = None, **kwargs: Any) -> tuple[int, dict[str, bytes]]:
        """A new signed version (scale factor = version number unless k is given)."""
        number = self.next_version
        self.next_version += 1
        directory = write_version(
            self.tmp / "published" / str(number), float(k if k is not None else number),
            self.keys.model, **kwargs,
        )
        files = version_files(directory)
        self.controller.add_files(files)
        return number, files

    def triton(self) -> Any:
        return grpcclient.InferenceServerClient(self.agent.address)

    def restart_agent(self) -> None:
        self.agent.stop()
        print("agent log:\n" + self.agent.log_text()[-20000:])
        self.agent = AgentProcess(self.config).wait_serving()


def infer(client: Any, batch: int = 1) -> np.ndarray[Any, Any]:
    x = np.ones((batch, 4), np.float32)
    inp = grpcclient.InferInput("x", [batch, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(MODEL, [inp])
    return np.asarray(result.as_numpy("y"))


def served_k(fleet: Fleet) -> float:
    client = fleet.triton()
    try:
        return float(infer(client)[0, 0])
    finally:
        client.close()


@contextlib.contextmanager
def running_fleet(tmp: Path, **fleet_settings: Any) -> Iterator[Fleet]:
    """A broker, the in-test controller and an agent serving version 1 of the model."""
    broker = MosquittoBroker(tmp / "broker").start()
    fleet = None
    try:
        keys = Keys.create(tmp / "keys")
        repository = tmp / "repo"
        write_version(repository / MODEL / "1", 1.0, keys.model)
        controller = TestController(broker.port)
        config = agent_config(tmp, broker.port, keys, repository, tmp / "state",
                              **fleet_settings)
        fleet = Fleet(tmp, broker, keys, repository, tmp / "state", controller,
                      AgentProcess(config), config)
        fleet.agent.wait_serving()
        yield fleet
    finally:
        if fleet is not None:
            fleet.agent.stop()
            print("agent log:\n" + fleet.agent.log_text()[-20000:])
            fleet.controller.stop()
        broker.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet")) as fleet:
        yield fleet


def wait_online(fleet: Fleet) -> None:
    fleet.controller.wait_for(
        lambda: any(m.get("online") for m in fleet.controller.messages("reported")),
        20, "the agent's birth message",
    )


# --------------------------------------------------------------------------- happy path


def test_update_goes_through_every_phase_without_failing_a_request(fleet: Fleet) -> None:
    wait_online(fleet)
    assert served_k(fleet) == 1.0
    version, files = fleet.version()
    config = CONFIG_PBTXT.encode()
    fleet.controller.add_files({"config.pbtxt": config})
    doc = deployment_doc(files, version, fleet.seq(), config=config, probation_s=1.0)

    failures: list[str] = []
    answers: set[float] = set()
    stop = threading.Event()
    loading = threading.Event()

    def load() -> None:
        client = fleet.triton()
        try:
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    answers.add(float(infer(client)[0, 0]))
                    loading.set()
                except Exception as exc:
                    failures.append(repr(exc))
        finally:
            client.close()

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert loading.wait(20)  # the load runs before the update starts
        fleet.controller.deploy(doc, fleet.keys.deploy)
        done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 30)
    finally:
        stop.set()
        loader.join(30)
    assert done["status"] == "SUCCEEDED", done
    seen = phases(fleet.controller.jobs_for(doc["deployment_id"]))
    steps = [p for p in dict.fromkeys(seen)]
    assert steps == [
        ("Offered", "QUEUED"),
        ("Downloading", "IN_PROGRESS"),
        ("Verified", "IN_PROGRESS"),
        ("Validating", "IN_PROGRESS"),
        ("Activating", "IN_PROGRESS"),
        ("Active", "IN_PROGRESS"),
        ("Active", "SUCCEEDED"),
    ]
    assert failures == []
    assert answers == {1.0, 2.0}  # the swap happened under load
    assert served_k(fleet) == 2.0
    client = fleet.triton()
    try:
        assert client.is_model_ready(MODEL, str(version))
        assert not client.is_model_ready(MODEL, "1")
    finally:
        client.close()
    # The retained reported state says so, and the state file agrees.
    reported = fleet.controller.wait_for(
        lambda: [m for m in fleet.controller.messages("reported")
                 if (m.get("job") or {}).get("status") == "SUCCEEDED"],
        10, "reported state after the update",
    )[-1]
    assert reported["models"][MODEL]["active_version"] == version
    assert reported["highest_sequence"] == doc["sequence"]
    state = json.loads((fleet.state / "state.json").read_text())
    assert state["models"][MODEL] == {
        "active": version, "highest_activated": version, "last_known_good": version
    }
    # The session validation made from the verified bytes went live: no second load.
    ready = [
        json.loads(line) for line in fleet.agent.log_text().splitlines()
        if '"model version ready"' in line and f'"version": "{version}"' in line
    ]
    assert [r.get("loaded_from") for r in ready] == ["validation session"], ready
    assert (fleet.repository / MODEL / "config.pbtxt").read_bytes() == config
    trust = TrustStore.from_directory(fleet.keys.model_trust_dir)
    assert repository_problems(fleet.repository, lambda p: verify_version(p, trust)) == []
    fleet.controller.wait_for(
        lambda: not list((fleet.state / "staging").iterdir())
        and not list((fleet.state / "downloads").iterdir()),
        5, "staging and downloads emptied",
    )


# --------------------------------------------------------------------------- threats


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Undisturbed:
    """Asserts that serving and the repository are exactly as before."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def __enter__(self) -> Undisturbed:
        wait_idle(self.fleet)
        self.k = served_k(self.fleet)
        self.files = snapshot(self.fleet.repository)
        self.state = json.loads((self.fleet.state / "state.json").read_text())["models"]
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        assert served_k(self.fleet) == self.k
        assert snapshot(self.fleet.repository) == self.files
        assert json.loads((self.fleet.state / "state.json").read_text())["models"] == self.state


def wait_idle(fleet: Fleet) -> None:
    def idle() -> bool:
        state = json.loads((fleet.state / "state.json").read_text())
        job = state.get("job")
        return job is None or job["status"] in TERMINAL
    fleet.controller.wait_for(idle, 30, "no job in progress")


TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED"}


def publish_and_wait(
    fleet: Fleet, payload: bytes, status: set[str], deployment_id: str | None = None
) -> dict[str, Any]:
    before = len(fleet.controller.messages("jobs"))
    fleet.controller.publish_desired(payload)

    def reported() -> dict[str, Any] | None:
        for message in fleet.controller.messages("jobs")[before:]:
            if message.get("status") in status and deployment_id in (
                None, message.get("deployment_id")
            ):
                return message
        return None

    result: dict[str, Any] = fleet.controller.wait_for(reported, 30, f"a job status in {status}")
    return result


def rejected(fleet: Fleet, payload: bytes, code: str) -> dict[str, Any]:
    errors_before = len(fleet.controller.messages("errors"))
    message = publish_and_wait(fleet, payload, {"REJECTED"})
    assert (message["phase"], message["status"], message["reason_code"]) == (
        "Failed", "REJECTED", code
    ), message
    error = fleet.controller.wait_for(
        lambda: fleet.controller.messages("errors")[errors_before:], 10, "an error report"
    )[0]
    assert error["schema"] == "edge.error_report"
    assert error["reason_code"] == code
    assert error["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    return message


def good_doc(fleet: Fleet, **changes: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    version, files = fleet.version()
    return deployment_doc(files, version, fleet.seq(), **changes), files


def test_tampered_deployment_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet)
    envelope = json.loads(sign_deployment(doc, fleet.keys.deploy))
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["model"]["files"][0]["size"] += 1
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with Undisturbed(fleet):
        rejected(fleet, json.dumps(envelope).encode(), "signature_invalid")


def test_unsigned_deployment_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet)
    envelope = json.loads(sign_deployment(doc, fleet.keys.deploy))
    envelope["signatures"] = []
    with Undisturbed(fleet):
        message = rejected(fleet, json.dumps(envelope).encode(), "signature_missing")
    assert message["deployment_id"] == doc["deployment_id"]  # best effort, unverified


def test_deployment_signed_with_a_wrong_key_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet)
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, ec.generate_private_key(ec.SECP256R1())),
                 "signature_untrusted_key")
        # The model-signing key is not a deployment key either.
        rejected(fleet, sign_deployment(doc, fleet.keys.model), "signature_untrusted_key")


def test_replayed_deployment_is_rejected(fleet: Fleet) -> None:
    version, files = fleet.version()
    highest = json.loads((fleet.state / "state.json").read_text())["highest_sequence"]
    assert highest > 0
    with Undisturbed(fleet):
        for sequence in (highest, highest - 1):  # not above the highest accepted
            doc = deployment_doc(files, version, sequence)
            rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "sequence_replayed")


def test_expired_deployment_is_rejected(fleet: Fleet) -> None:
    past = time.time() - 7200
    doc, _ = good_doc(fleet, now=past)
    doc["expires_at"] = int(past) + 60
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "expired")


def test_deployment_for_another_device_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet, devices=["dev-2", "dev-3"])
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "wrong_device")


def test_rollback_to_an_older_version_is_rejected(fleet: Fleet) -> None:
    files = version_files(fleet.tmp / "published" / "2")
    doc = deployment_doc(files, 1, fleet.seq())
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "version_rollback")


def test_path_traversal_in_a_signed_deployment_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet)
    doc["model"]["files"][0]["path"] = "../../../../escape.onnx"
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "unsafe_path")
    assert not list(fleet.tmp.rglob("escape.onnx"))


def test_a_declared_size_above_the_limit_is_rejected(fleet: Fleet) -> None:
    doc, _ = good_doc(fleet)
    doc["model"]["files"][0]["size"] = 5 * 1024**3  # the default limit is 4 GiB
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(doc, fleet.keys.deploy), "size_exceeded")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{" + b" " * 70_000 + b"}", "message_too_large"),
        (b"\x00\x01 not json", "message_malformed"),
        (b'{"schema": "edge.deployment_envelope", "version": 1}', "message_malformed"),
        (json.dumps({"schema": "edge.deployment_envelope", "version": 2, "payloadType": "x",
                     "payload": "", "signatures": []}).encode(), "schema_unsupported"),
        (json.dumps({"schema": "edge.something_else", "version": 1}).encode(),
         "schema_unsupported"),
    ],
)
def test_oversized_malformed_and_unknown_messages_are_rejected(
    fleet: Fleet, payload: bytes, code: str
) -> None:
    with Undisturbed(fleet):
        rejected(fleet, payload, code)


def failed_after_download(fleet: Fleet, doc: dict[str, Any], code: str) -> None:
    with Undisturbed(fleet):
        message = publish_and_wait(
            fleet, sign_deployment(doc, fleet.keys.deploy), {"FAILED", "SUCCEEDED"},
            doc["deployment_id"],
        )
        assert (message["phase"], message["status"], message["reason_code"]) == (
            "Failed", "FAILED", code
        ), message
        assert message["deployment_id"] == doc["deployment_id"]
        wait_idle(fleet)
    # What the job downloaded is cleaned up (right after the report).
    fleet.controller.wait_for(
        lambda: not list((fleet.state / "staging").iterdir())
        and not list((fleet.state / "downloads").iterdir()),
        5, "staging and downloads emptied",
    )


def test_mix_and_match_of_separately_signed_files_is_rejected(fleet: Fleet) -> None:
    _, files_a = fleet.version()
    version_b, files_b = fleet.version()
    mixed = {**files_b, "model.onnx": files_a["model.onnx"]}  # a's model, b's signature
    doc = deployment_doc(mixed, version_b, fleet.seq())
    failed_after_download(fleet, doc, "file_digest_mismatch")


def test_a_version_signed_as_another_version_or_model_is_rejected(fleet: Fleet) -> None:
    """Issue 17 item 4: the signed identity.json must be the deployment's model/version."""
    signed_as, files = fleet.version()
    failed_after_download(
        fleet, deployment_doc(files, signed_as + 100, fleet.seq()), "identity_mismatch"
    )
    doc = deployment_doc(files, signed_as, fleet.seq())
    doc["model"]["name"] = "another_model"
    failed_after_download(fleet, doc, "identity_mismatch")


def test_a_file_the_model_signature_does_not_cover_is_rejected(fleet: Fleet) -> None:
    version, files = fleet.version()
    extra = {**files, "smuggled.py": b"import os\n"}
    fleet.controller.add_files(extra)
    failed_after_download(fleet, deployment_doc(extra, version, fleet.seq()), "file_unexpected")


def test_tampered_file_from_the_controller_is_rejected(fleet: Fleet) -> None:
    version, files = fleet.version()
    sha = hashlib.sha256(files["model.onnx"]).hexdigest()
    evil = bytearray(files["model.onnx"])
    evil[-1] ^= 0xFF
    fleet.controller.policy.replace[sha] = bytes(evil)
    try:
        failed_after_download(fleet, deployment_doc(files, version, fleet.seq()),
                              "digest_mismatch")
    finally:
        fleet.controller.policy.replace.clear()


def test_endless_data_more_bytes_than_requested_is_refused(fleet: Fleet) -> None:
    version, files = fleet.version(padding=20_000)  # several chunks
    fleet.controller.policy.extra_bytes = 100
    try:
        failed_after_download(fleet, deployment_doc(files, version, fleet.seq()),
                              "chunk_invalid")
    finally:
        fleet.controller.policy.extra_bytes = 0


def test_a_version_failing_its_validation_vectors_never_serves(fleet: Fleet) -> None:
    version, files = fleet.version(wrong_vectors=True)
    failed_after_download(fleet, deployment_doc(files, version, fleet.seq()),
                          "validation_failed")


# --------------------------------------------------------------------------- probation


def test_a_version_that_fails_in_probation_is_rolled_back(fleet: Fleet) -> None:
    wait_idle(fleet)
    good = served_k(fleet)
    state = json.loads((fleet.state / "state.json").read_text())["models"][MODEL]
    config_before = (fleet.repository / MODEL / "config.pbtxt").read_bytes()
    # Passes its vectors (batch 1) but fails every request with a batch of 2.
    version, files = fleet.version(batch_one_only=True)
    new_config = BATCHING_CONFIG_PBTXT.encode() + b"# the bad version's config\n"
    fleet.controller.add_files({"config.pbtxt": new_config})
    doc = deployment_doc(files, version, fleet.seq(), probation_s=20.0, config=new_config)
    fleet.controller.deploy(doc, fleet.keys.deploy)
    fleet.controller.wait_for(
        lambda: [m for m in fleet.controller.jobs_for(doc["deployment_id"])
                 if m["phase"] == "Active"], 20, "activation",
    )
    client = fleet.triton()
    failures = 0
    try:
        assert float(infer(client)[0, 0]) == float(version)  # the new version serves
        for _ in range(10):
            try:
                infer(client, batch=2)
            except Exception:
                failures += 1
    finally:
        client.close()
    assert failures >= 4
    done = fleet.controller.wait_job(doc["deployment_id"], {"FAILED", "SUCCEEDED"}, 20)
    assert (done["phase"], done["status"], done["reason_code"]) == (
        "RolledBack", "FAILED", "probation_failed"
    )
    assert "failed during probation" in done["message"]
    assert served_k(fleet) == good
    assert not (fleet.repository / MODEL / str(version)).exists()
    assert (fleet.repository / MODEL / "config.pbtxt").read_bytes() == config_before
    after = json.loads((fleet.state / "state.json").read_text())["models"][MODEL]
    assert after == {
        "active": state["active"],
        "last_known_good": state["last_known_good"],
        "highest_activated": version,  # never again, unless a downgrade is signed
    }
    # The rolled back version number is spent.
    again = deployment_doc(files, version, fleet.seq())
    with Undisturbed(fleet):
        rejected(fleet, sign_deployment(again, fleet.keys.deploy), "version_rollback")


def malformed_inputs(kind: int) -> list[Any]:
    """Requests the agent must refuse with INVALID_ARGUMENT, whatever the model."""
    if kind == 0:  # wrong shape
        inp = grpcclient.InferInput("x", [1, 7], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 7), np.float32))
    elif kind == 1:  # wrong datatype
        inp = grpcclient.InferInput("x", [1, 4], "INT32")
        inp.set_data_from_numpy(np.zeros((1, 4), np.int32))
    else:  # an input the model does not have
        inp = grpcclient.InferInput("not_x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
    return [inp]


def test_malformed_requests_in_probation_do_not_roll_a_good_version_back(fleet: Fleet) -> None:
    # The fleet's probation: at least 4 requests, at most 25 % failed. Counted as
    # before, 60 refused requests against 10 good ones would roll the version back.
    wait_idle(fleet)
    version, files = fleet.version()
    doc = deployment_doc(files, version, fleet.seq(), probation_s=15.0)
    fleet.controller.deploy(doc, fleet.keys.deploy)
    fleet.controller.wait_for(
        lambda: [m for m in fleet.controller.jobs_for(doc["deployment_id"])
                 if (m["phase"], m["status"]) == ("Active", "IN_PROGRESS")],
        30, "probation",
    )
    client = fleet.triton()
    try:
        before = client.get_inference_statistics(MODEL, str(version)).model_stats[0]
        refused = 0
        for i in range(60):
            with pytest.raises(InferenceServerException) as info:
                client.infer(MODEL, malformed_inputs(i % 3), model_version=str(version))
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
            refused += 1
        for _ in range(10):
            assert float(infer(client)[0, 0]) == float(version)
        after = client.get_inference_statistics(MODEL, str(version)).model_stats[0]
    finally:
        client.close()
    # Triton's statistics still count every refused request as failed...
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == refused
    assert after.inference_stats.success.count - before.inference_stats.success.count == 10
    # ...and they all came in during probation (else this test proves nothing).
    assert not [m for m in fleet.controller.jobs_for(doc["deployment_id"])
                if m["status"] == "SUCCEEDED"], "probation ended before the requests were sent"
    done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 40)
    assert (done["phase"], done["status"]) == ("Active", "SUCCEEDED"), done
    assert served_k(fleet) == float(version)


# --------------------------------------------------------------------------- supersede and resume


def slow_chunks(fleet: Fleet, delay_s: float) -> None:
    fleet.controller.policy.delay_s = delay_s


def wait_downloading(fleet: Fleet, deployment_id: str, min_bytes: int = 1) -> None:
    fleet.controller.wait_for(
        lambda: [m for m in fleet.controller.jobs_for(deployment_id)
                 if m["phase"] == "Downloading"
                 and (m.get("progress") or {}).get("bytes", 0) >= min_bytes],
        20, "download progress",
    )


def test_a_newer_deployment_supersedes_a_download(fleet: Fleet) -> None:
    wait_idle(fleet)
    version_a, files_a = fleet.version(padding=400_000)
    version_b, files_b = fleet.version()
    doc_a = deployment_doc(files_a, version_a, fleet.seq())
    doc_b = deployment_doc(files_b, version_b, fleet.seq())
    slow_chunks(fleet, 0.1)
    try:
        fleet.controller.deploy(doc_a, fleet.keys.deploy)
        wait_downloading(fleet, doc_a["deployment_id"])
        fleet.controller.deploy(doc_b, fleet.keys.deploy)
        first = fleet.controller.wait_job(doc_a["deployment_id"], {"CANCELED", "FAILED"}, 20)
    finally:
        slow_chunks(fleet, 0.0)
    assert (first["phase"], first["reason_code"]) == ("Failed", "superseded")
    second = fleet.controller.wait_job(doc_b["deployment_id"], {"SUCCEEDED", "FAILED"}, 20)
    assert second["status"] == "SUCCEEDED"
    assert served_k(fleet) == float(version_b)
    assert not (fleet.repository / MODEL / str(version_a)).exists()


def chunks_of(files: dict[str, bytes], chunk: int = 4096) -> int:
    return sum(max(1, -(-len(data) // chunk)) for data in files.values() if data)


def test_download_resumes_after_a_broker_restart(fleet: Fleet) -> None:
    wait_idle(fleet)
    version, files = fleet.version(padding=400_000)
    doc = deployment_doc(files, version, fleet.seq())
    requests_before = fleet.controller.requests
    slow_chunks(fleet, 0.1)
    try:
        fleet.controller.deploy(doc, fleet.keys.deploy)
        wait_downloading(fleet, doc["deployment_id"], 30_000)
        fleet.broker.restart(down_s=0.5)
        done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 40)
    finally:
        slow_chunks(fleet, 0.0)
    assert done["status"] == "SUCCEEDED", done
    assert served_k(fleet) == float(version)
    # Resumed, not started over: about one request per chunk plus the few lost in flight.
    assert fleet.controller.requests - requests_before < chunks_of(files) + 16


def test_download_resumes_after_a_controller_restart(fleet: Fleet) -> None:
    wait_idle(fleet)
    version, files = fleet.version(padding=400_000)
    doc = deployment_doc(files, version, fleet.seq())
    answered_before = fleet.controller.answered
    slow_chunks(fleet, 0.1)
    fleet.controller.deploy(doc, fleet.keys.deploy)
    wait_downloading(fleet, doc["deployment_id"], 30_000)
    old = fleet.controller
    old.stop()
    served_before = old.answered - answered_before
    time.sleep(0.5)
    fleet.controller = TestController(fleet.broker.port)
    fleet.controller.blobs = old.blobs
    done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 40)
    assert done["status"] == "SUCCEEDED", done
    assert served_k(fleet) == float(version)
    assert served_before + fleet.controller.answered < chunks_of(files) + 16


def test_download_resumes_after_an_agent_restart(fleet: Fleet) -> None:
    wait_idle(fleet)
    version, files = fleet.version(padding=400_000)
    doc = deployment_doc(files, version, fleet.seq())
    requests_before = fleet.controller.requests
    slow_chunks(fleet, 0.1)
    try:
        fleet.controller.deploy(doc, fleet.keys.deploy)
        wait_downloading(fleet, doc["deployment_id"], 30_000)
        fleet.agent.stop()
        partials = sorted(p.name for p in (fleet.state / "downloads").iterdir())
        assert any(p.endswith(".ranges") for p in partials), partials
        offline = fleet.controller.wait_for(
            lambda: [m for m in fleet.controller.messages("reported") if m["online"] is False],
            10, "the offline state",
        )[-1]
        assert offline["job"]["phase"] == "Downloading"
        fleet.agent = AgentProcess(fleet.config).wait_serving()
        done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 40)
    finally:
        slow_chunks(fleet, 0.0)
    assert done["status"] == "SUCCEEDED", done
    assert served_k(fleet) == float(version)
    assert fleet.controller.requests - requests_before < chunks_of(files) + 16


# --------------------------------------------------------------------------- broker away, will


def test_the_agent_serves_without_a_broker_and_reports_online_and_offline(
    tmp_path: Path,
) -> None:
    port = free_port()
    keys = Keys.create(tmp_path / "keys")
    repository = tmp_path / "repo"
    write_version(repository / MODEL / "1", 1.0, keys.model)
    config = agent_config(tmp_path, port, keys, repository, tmp_path / "state",
                          deployment_trust_dir=str(tmp_path / "no-such-dir"))
    broker = MosquittoBroker(tmp_path / "broker", port=port)
    agent = AgentProcess(config)
    controller = None
    try:
        agent.wait_serving()  # no broker at all: serving does not wait for one
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            assert float(infer(client)[0, 0]) == 1.0
        finally:
            client.close()
        broker.start()
        controller = TestController(port)
        birth = controller.wait_for(
            lambda: [m for m in controller.messages("reported") if m.get("online")], 20,
            "the birth message once the broker is up",
        )[-1]
        assert birth["schema"] == "edge.reported_state"
        assert birth["device"] == DEVICE
        assert birth["models"][MODEL]["active_version"] == 1
        # Without its deployment trust store the agent refuses every deployment.
        files = version_files(write_version(tmp_path / "v2" / "2", 2.0, keys.model))
        doc = deployment_doc(files, 2, 1)
        controller.deploy(doc, keys.deploy)
        refused = controller.wait_job(doc["deployment_id"], {"REJECTED"}, 10)
        assert refused["reason_code"] == "trust_store_invalid"
        # A crash: the broker publishes the last will, retained.
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait_exit(10)
        will = controller.wait_for(
            lambda: [m for m in controller.messages("reported") if m.get("online") is False],
            20, "the last will",
        )[-1]
        assert will["device"] == DEVICE
    finally:
        agent.stop()
        if controller is not None:
            controller.stop()
        broker.stop()


def test_a_model_new_to_the_device_is_installed(fleet: Fleet) -> None:
    wait_idle(fleet)
    directory = write_version(
        fleet.tmp / "published-fresh" / "1", 5.0, fleet.keys.model, model="fresh"
    )
    files = version_files(directory)
    fleet.controller.add_files(files)
    doc = deployment_doc(files, 1, fleet.seq())
    doc["model"]["name"] = "fresh"
    fleet.controller.deploy(doc, fleet.keys.deploy)
    done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 20)
    assert done["status"] == "SUCCEEDED", done
    client = fleet.triton()
    try:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert float(client.infer("fresh", [inp]).as_numpy("y")[0, 0]) == 5.0
        assert client.is_model_ready(MODEL)  # the other model is untouched
    finally:
        client.close()
    state = json.loads((fleet.state / "state.json").read_text())["models"]["fresh"]
    assert state == {"active": 1, "highest_activated": 1, "last_known_good": 1}


# --------------------------------------------------------------------------- old versions


def repository_entries(fleet: Fleet) -> set[str]:
    return {p.name for p in (fleet.repository / MODEL).iterdir()}


@pytest.mark.parametrize("keep", [None, 3], ids=["default", "keep_3"])
def test_old_version_directories_are_removed_after_a_success(
    tmp_path: Path, keep: int | None
) -> None:
    settings = {} if keep is None else {"keep_versions": keep}
    kept = 2 if keep is None else keep  # the documented default
    with running_fleet(tmp_path, **settings) as fleet:
        wait_online(fleet)
        model_dir = fleet.repository / MODEL
        # Not version directories: never touched.
        (model_dir / "notes").mkdir()
        (model_dir / "notes" / "readme.txt").write_text("operator notes")
        (model_dir / "README").write_text("x")
        others = {"notes", "README"}
        expected = {"1"}
        for step in range(4):
            version, files = fleet.version()
            doc = deployment_doc(files, version, fleet.seq())
            fleet.controller.deploy(doc, fleet.keys.deploy)
            done = fleet.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 40)
            assert done["status"] == "SUCCEEDED", done
            expected.add(str(version))
            below = sorted((int(v) for v in expected if int(v) < version), reverse=True)
            expected -= {str(v) for v in below[kept - 1 :]}
            if step == 1:
                # A version above the active one (put there by hand): never removed,
                # and never served while the device's state pins the model.
                shutil.copytree(model_dir / str(version), model_dir / "99")
                expected.add("99")
            assert repository_entries(fleet) == expected | others, f"after version {version}"
            assert served_k(fleet) == float(version)
        assert (model_dir / "notes" / "readme.txt").read_text() == "operator notes"
        assert not list((fleet.state / "trash").iterdir())
        state = json.loads((fleet.state / "state.json").read_text())["models"][MODEL]
        assert state["active"] == state["last_known_good"] == version
        removed = sorted(
            e["version"] for e in fleet.agent.events if e.get("msg") == "old model version removed"
        )
        assert removed == sorted(
            v for v in range(1, version) if str(v) not in expected
        )
        assert removed  # the rule did remove something


# --------------------------------------------------------------------------- download deadline


DOWNLOAD_TIMEOUT_S = 3.0


def timed_out_download(fleet: Fleet, doc: dict[str, Any], files: dict[str, bytes]) -> int:
    """Deploy ``doc``, expect the download deadline to end it; the bytes that arrived."""
    fleet.controller.deploy(doc, fleet.keys.deploy)
    done = fleet.controller.wait_job(doc["deployment_id"], TERMINAL, 60)
    assert (done["phase"], done["status"], done["reason_code"]) == (
        "Failed", "TIMED_OUT", "download_deadline_exceeded"
    ), done
    match = re.fullmatch(
        r"the download did not finish within fleet\.download_timeout_s = 3 s: "
        r"(\d+) of (\d+) bytes arrived",
        done["message"],
    )
    assert match, done["message"]
    arrived, total = int(match[1]), int(match[2])
    assert total == sum(len(data) for data in files.values())
    assert arrived < total
    reported = [(m.get("progress") or {}).get("bytes", 0)
                for m in fleet.controller.jobs_for(doc["deployment_id"])]
    assert arrived >= max(reported)
    fleet.controller.wait_for(
        lambda: not list((fleet.state / "staging").iterdir())
        and not list((fleet.state / "downloads").iterdir()),
        10, "partial files removed",
    )
    return arrived


def test_a_download_that_outlasts_its_deadline_times_out(tmp_path: Path) -> None:
    # Chunk timeouts and retries alone would end neither download below: every
    # chunk is answered in time (slowly), or its 1000 retries outlast the test.
    with running_fleet(tmp_path, download_timeout_s=DOWNLOAD_TIMEOUT_S,
                       chunk_timeout_s=2.0, chunk_retries=1000) as fleet:
        wait_online(fleet)
        # A controller that answers, slowly: about 490 chunks of 4 KiB, at most 4
        # in flight, each held back 0.2 s: at least 24 s, whatever the machine.
        version, files = fleet.version(padding=2_000_000)
        fleet.controller.policy.delay_s = 0.2
        with Undisturbed(fleet):
            timed_out_download(fleet, deployment_doc(files, version, fleet.seq()), files)
        # A controller that never answers (gone): nothing arrives.
        fleet.controller.policy.delay_s = 0.0
        fleet.controller.policy.silent = True
        version, files = fleet.version()
        requests_before = fleet.controller.requests
        with Undisturbed(fleet):
            arrived = timed_out_download(
                fleet, deployment_doc(files, version, fleet.seq()), files
            )
        assert arrived == 0
        assert fleet.controller.requests > requests_before  # it did ask
        state = json.loads((fleet.state / "state.json").read_text())["job"]
        assert (state["status"], state["reason_code"]) == (
            "TIMED_OUT", "download_deadline_exceeded"
        )
