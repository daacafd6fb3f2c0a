"""Crash safety: a real agent killed with SIGKILL all over the update life cycle.

Each round deploys a new version and kills the agent, either at a random moment
(the controller slows chunk answers and the probation window is short, so the
job spends real time in every long phase) or at a named step through the
``EDGE_AGENT_FAILPOINT`` hook (the short phases a random kill rarely hits).
After each restart:

* the agent serves: ModelReady, and an inference gives the answer of the very
  version the state file pins;
* every version directory in the repository verifies completely (no partial or
  stray file ever appears there);
* the job either resumes to SUCCEEDED, or is reported failed / rolled back with
  a reason, and then the right version serves.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version
from tests.agent_process import AgentProcess
from tests.fleet_harness import (
    BATCHING_CONFIG_PBTXT,
    MODEL,
    Keys,
    TestController,
    agent_config,
    deployment_doc,
    repository_problems,
    version_files,
    write_version,
)
from tests.mqtt_broker import MosquittoBroker

pytestmark = pytest.mark.timeout(240)

RANDOM_KILLS = 14
FAILPOINTS = ["accepted", "downloaded", "validated", "installed", "loaded", "probation_passed"]
CHUNK_DELAY_S = 0.05
PROBATION_S = 0.6


def infer_k(address: str, batch: int = 1) -> float:
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_model_ready(MODEL)
        inp = grpcclient.InferInput("x", [batch, 4], "FP32")
        inp.set_data_from_numpy(np.ones((batch, 4), np.float32))
        return float(client.infer(MODEL, [inp]).as_numpy("y")[0, 0])
    finally:
        client.close()


def try_infer_batch2(address: str) -> bool:
    try:
        infer_k(address, batch=2)
    except Exception:
        return False
    return True


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = MosquittoBroker(tmp / "broker").start()
        self.keys = Keys.create(tmp / "keys")
        self.repository = tmp / "repo"
        self.state = tmp / "state"
        write_version(self.repository / MODEL / "1", 1.0, self.keys.model)
        self.trust = TrustStore.from_directory(self.keys.model_trust_dir)
        self.controller = TestController(self.broker.port)
        self.controller.policy.delay_s = CHUNK_DELAY_S
        self.config = agent_config(tmp, self.broker.port, self.keys, self.repository,
                                   self.state, window=2)
        self.agent: AgentProcess | None = None
        self.sequence = 0
        self.version = 1
        self.kills: list[str] = []
        self.outcomes: dict[str, int] = {}

    def start_agent(self, failpoint: str = "") -> AgentProcess:
        env = {"EDGE_AGENT_FAILPOINT": failpoint} if failpoint else None
        self.agent = AgentProcess(self.config, env=env).wait_serving()
        return self.agent

    def state_file(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.state / "state.json").read_text())
        return state

    def new_deployment(self, config: bytes | None = None, **kwargs: Any) -> dict[str, Any]:
        self.version += 1
        self.sequence += 1
        directory = write_version(self.tmp / "published" / str(self.version),
                                  float(self.version), self.keys.model, padding=48_000, **kwargs)
        files = version_files(directory)
        self.controller.add_files(files)
        if config is not None:
            self.controller.add_files({"config.pbtxt": config})
        return deployment_doc(files, self.version, self.sequence, probation_s=PROBATION_S,
                              config=config)

    def check_serving(self, where: str) -> float:
        """The invariants that must hold right after any restart."""
        assert self.agent is not None
        pinned = (self.state_file()["models"].get(MODEL) or {}).get("active")
        served = None
        last_error = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # serving; a resumed activation may be mid-swap
            try:
                served = infer_k(self.agent.address)
            except Exception as exc:
                last_error = repr(exc)
                time.sleep(0.05)
                continue
            last_error = ""
            # The pin read right after this answer: the pair the assertion below
            # compares. Not re-read after the loop: a resumed activation may switch
            # and persist the new pin in between (served 2, then pins 3).
            pinned = (self.state_file()["models"].get(MODEL) or {}).get("active")
            if pinned is None or served == float(pinned):
                break
            time.sleep(0.05)
        # On failure: what the last request got, and the agent's own account.
        context = f"last request: {last_error or 'answered'}\n{self.agent.log_text()[-6000:]}"
        assert served is not None, f"{where}: nothing serves {MODEL}\n{context}"
        if pinned is not None:
            assert served == float(pinned), (
                f"{where}: serves {served}, state pins {pinned}\n{context}"
            )
        assert repository_problems(self.repository, lambda p: verify_version(p, self.trust)) \
            == [], where
        return served

    def finish(self, doc: dict[str, Any], where: str) -> dict[str, Any]:
        """The job resumes or is reported failed; then the right version serves."""
        final = self.controller.wait_job(doc["deployment_id"], {"SUCCEEDED", "FAILED"}, 30)
        assert self.agent is not None
        served = self.check_serving(where)
        if final["status"] == "SUCCEEDED":
            assert served == float(doc["model"]["version"]), where
        else:
            assert final["reason_code"], where
            assert final["phase"] in ("Failed", "RolledBack"), where
            assert served != float(doc["model"]["version"]), where
        key = f"{final['phase']}/{final['status']}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        return final

    def kill(self, why: str) -> None:
        assert self.agent is not None
        if self.agent.proc.poll() is None:
            os.kill(self.agent.pid, signal.SIGKILL)
        self.agent.wait_exit(10)
        self.kills.append(why)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.controller.stop()
        self.broker.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def test_sigkill_anywhere_in_the_life_cycle_leaves_a_verified_version_serving(rig: Rig) -> None:
    seed = int(os.environ.get("CRASH_TEST_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    plan = [""] * RANDOM_KILLS + FAILPOINTS  # "": a kill at a random moment
    rng.shuffle(plan)

    def armed(round_no: int) -> str:
        # Each start arms the failpoint of the next round's deployment only, so the
        # job resumed after a kill is not killed again at the same step.
        if round_no >= len(plan) or not plan[round_no]:
            return ""
        return f"{plan[round_no]}:{rig.sequence + 1}"

    # One undisturbed job first: how long a job takes sets the random kill window.
    doc = rig.new_deployment()
    rig.start_agent(armed(0))
    started = time.monotonic()
    rig.controller.deploy(doc, rig.keys.deploy)
    assert rig.finish(doc, "warm-up")["status"] == "SUCCEEDED"
    window = time.monotonic() - started + 0.2

    for round_no, failpoint in enumerate(plan):
        doc = rig.new_deployment()
        rig.controller.deploy(doc, rig.keys.deploy)
        where = f"round {round_no} (seed {seed}, {failpoint or 'random'})"
        if failpoint:
            assert rig.agent is not None
            rig.agent.wait_exit(30)  # it kills itself at the failpoint
            rig.kills.append(failpoint)
        else:
            delay = rng.uniform(0.0, window)
            time.sleep(delay)
            rig.kill(f"random {delay:.2f}s")
        rig.start_agent(armed(round_no + 1))
        rig.check_serving(where)
        rig.finish(doc, where)
    assert len(rig.kills) >= 20
    print("kills:", rig.kills, "outcomes:", rig.outcomes)


def test_sigkill_during_a_roll_back_still_ends_on_the_last_known_good(rig: Rig) -> None:
    agent = rig.start_agent(f"rolling_back:{rig.sequence + 2}")
    good = rig.new_deployment()
    rig.controller.deploy(good, rig.keys.deploy)
    assert rig.finish(good, "good version")["status"] == "SUCCEEDED"
    bad = rig.new_deployment(config=BATCHING_CONFIG_PBTXT.encode(), batch_one_only=True)
    bad["probation_s"] = 30
    rig.controller.deploy(bad, rig.keys.deploy)
    rig.controller.wait_for(
        lambda: [m for m in rig.controller.jobs_for(bad["deployment_id"])
                 if m["phase"] == "Active"], 20, "activation of the bad version",
    )
    deadline = time.monotonic() + 20
    while agent.proc.poll() is None and time.monotonic() < deadline:
        try_infer_batch2(agent.address)  # fails: the probation notices and rolls back
    agent.wait_exit(10)
    rig.kills.append("rolling_back")
    rig.start_agent()
    assert rig.check_serving("after the kill in roll back") == float(good["model"]["version"])
    final = rig.finish(bad, "roll back")
    assert (final["phase"], final["reason_code"]) == ("RolledBack", "probation_failed")
    assert not (rig.repository / MODEL / str(bad["model"]["version"])).exists()
    state = rig.state_file()["models"][MODEL]
    assert state["active"] == state["last_known_good"] == good["model"]["version"]
