from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import REPO_ROOT, AgentProcess, write_toml
from tests.mqtt_broker import (  # noqa: F401  (pytest fixtures: a real mosquitto)
    mosquitto_factory,
    mqtt_broker,
    mqtt_tls,
    mqtt_tls_broker,
)

EXAMPLE_MODELS = REPO_ROOT / "models"


@pytest.fixture(scope="session")
def example_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent on the example repository, embedded defaults except a free port."""
    state = tmp_path_factory.mktemp("state")
    config = write_toml(
        tmp_path_factory.mktemp("cfg") / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "state": {"dir": str(state)},
            "telemetry": {"prometheus_address": ""},  # no fixed port shared between agents
        },
    )
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def triton(example_agent: AgentProcess):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(example_agent.address)
    yield client
    client.close()


def agent_config(tmp: Path, **sections: dict[str, object]) -> Path:
    base: dict[str, dict[str, object]] = {"server": {"address": "127.0.0.1:0"}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_toml(tmp / "agent.toml", base)
