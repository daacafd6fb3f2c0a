"""``instance_group`` counts are bounded: config.pbtxt cannot make the agent start
thousands of threads. A model over the bound is refused (UNAVAILABLE, with a
reason naming the field and the bound) while the others serve; the bound is
sized for the machine and set by ``runtime.max_instance_count``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.agent_process import AgentProcess, start_serving, write_toml
from tests.serving_models import make_repository, scale_and_echo_model, serving_config

CALL_TIMEOUT_S = 30.0


def group(name: str, count: int) -> str:
    return f'name: "{name}"\nmax_batch_size: 4\ninstance_group [ {{ count: {count} }} ]\n'


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for process {pid}")


def start(tmp: Path, models: dict[str, int], **runtime: Any) -> AgentProcess:
    repo = make_repository(
        tmp / "models",
        {name: (scale_and_echo_model(), group(name, n)) for name, n in models.items()},
    )
    config = serving_config(tmp, repo, runtime={"intra_op_threads": 1, **runtime})
    return start_serving(write_toml(tmp / "agent.toml", config))


def index(agent: AgentProcess) -> dict[str, tuple[str, str]]:
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        entries = client.get_model_repository_index(as_json=True).get("models", [])
    finally:
        client.close()
    return {e["name"]: (e.get("state", ""), e.get("reason", "")) for e in entries}


def infer(agent: AgentProcess, model: str) -> Any:
    x = np.ones((1, 4), np.float32)
    tag = np.array([[b"t"]], np.object_)
    inputs = [
        grpcclient.InferInput("x", [1, 4], "FP32"),
        grpcclient.InferInput("tag", [1, 1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(tag)
    client = grpcclient.InferenceServerClient(agent.address)
    try:
        return client.infer(model, inputs, client_timeout=CALL_TIMEOUT_S)
    finally:
        client.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = start(tmp_path_factory.mktemp("instances"), {"huge": 3000, "fine": 2})
    yield agent
    agent.stop()


def test_an_instance_count_of_3000_is_refused_and_starts_no_threads(agent: AgentProcess) -> None:
    before = threads(agent.pid)
    with pytest.raises(Exception):  # noqa: B017 - UNAVAILABLE, or it ran on 3000 threads
        infer(agent, "huge")
    assert threads(agent.pid) - before < 100
    state, reason = index(agent)["huge"]
    assert state == "UNAVAILABLE"
    assert "instance_group" in reason and "3000" in reason
    assert "runtime.max_instance_count" in reason
    bound = max(8, 4 * (os.cpu_count() or 1))
    assert str(bound) in reason


def test_other_models_serve_beside_it(agent: AgentProcess) -> None:
    np.testing.assert_array_equal(infer(agent, "fine").as_numpy("y"), np.full((1, 4), 2.0))
    assert index(agent)["fine"][0] == "READY"


def test_the_bound_is_set_in_the_agent_config(tmp_path: Path) -> None:
    agent = start(tmp_path, {"three": 3, "two": 2}, max_instance_count=2)
    try:
        states = index(agent)
        assert states["two"][0] == "READY"
        assert states["three"][0] == "UNAVAILABLE"
        assert "3" in states["three"][1] and "max_instance_count" in states["three"][1]
    finally:
        agent.stop()
