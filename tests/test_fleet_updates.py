"""Fleet updates end to end: a real mosquitto, a real agent process, tritonclient.

The test process plays the controller (tests/fleet_harness.py): it signs
deployments with the deployment key, answers chunk requests, and reads what the
device reports. The agent runs as ``edge-agent serve`` in a subprocess.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version
from tests.agent_process import AgentProcess
from tests.fleet_harness import (
    CONFIG_PBTXT,
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
from tests.mqtt_broker import MosquittoBroker

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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    broker = MosquittoBroker(tmp / "broker").start()
    controller = None
    agent = None
    try:
        keys = Keys.create(tmp / "keys")
        repository = tmp / "repo"
        write_version(repository / MODEL / "1", 1.0, keys.model)
        controller = TestController(broker.port)
        config = agent_config(tmp, broker.port, keys, repository, tmp / "state")
        agent = AgentProcess(config).wait_serving()
        yield Fleet(tmp, broker, keys, repository, tmp / "state", controller, agent, config)
    finally:
        if agent is not None:
            agent.stop()
            print("agent log:\n" + agent.log_text()[-20000:])
        if controller is not None:
            controller.stop()
        broker.stop()


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

    def load() -> None:
        client = fleet.triton()
        try:
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    answers.add(float(infer(client)[0, 0]))
                except Exception as exc:
                    failures.append(repr(exc))
        finally:
            client.close()

    loader = threading.Thread(target=load)
    loader.start()
    try:
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
    assert (fleet.repository / MODEL / "config.pbtxt").read_bytes() == config
    trust = TrustStore.from_directory(fleet.keys.model_trust_dir)
    assert repository_problems(fleet.repository, lambda p: verify_version(p, trust)) == []
    assert list((fleet.state / "staging").iterdir()) == []
    assert list((fleet.state / "downloads").iterdir()) == []
