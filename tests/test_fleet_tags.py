"""Device tags end to end: ``[fleet] tags`` in the agent config (validated), the
``tags`` field of the agent's retained reported state, and a real
``edge-controller`` grouping the real agent by them (``tag:<tag>``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import build_config
from agent.errors import ConfigError
from tests.agent_process import AgentProcess
from tests.controller_process import ControllerProcess, controller_toml, run_controller
from tests.fleet_harness import DEVICE, MODEL, Keys, agent_config, write_version
from tests.mqtt_broker import MosquittoBroker


def test_tags_default_to_none_and_are_taken_as_given() -> None:
    assert build_config({}).fleet.tags == ()
    tags = ["line-3", "night", "A_1.b", "x" * 32]
    assert build_config({"fleet": {"tags": tags}}).fleet.tags == tuple(tags)


@pytest.mark.parametrize(
    "tags",
    [
        ["a b"],
        [""],
        ["-x"],
        ["x" * 33],
        ["line-3", "line-3"],
        [f"t{i}" for i in range(17)],
        [3],
        "line-3",
        ["line-3\n"],
        ["tag:x"],
    ],
)
def test_bad_tags_are_refused_naming_the_key(tags: Any) -> None:
    with pytest.raises(ConfigError, match=r"fleet\.tags"):
        build_config({"fleet": {"tags": tags}})


def test_a_real_agent_reports_its_tags_and_the_controller_groups_it(
    tmp_path: Path, mosquitto_factory: Any
) -> None:
    broker: MosquittoBroker = mosquitto_factory()
    keys = Keys.create(tmp_path / "keys")
    repository = tmp_path / "repo"
    write_version(repository / MODEL / "1", 1.0, keys.model)
    config = agent_config(
        tmp_path, broker.port, keys, repository, tmp_path / "state", tags=["line-3", "night"]
    )
    controller_config = controller_toml(tmp_path / "controller.toml", broker, tmp_path / "store")
    with controller_config.open("a") as handle:
        handle.write('\n[groups]\nline3 = ["tag:line-3"]\nline4 = ["tag:line-4"]\n')
    with ControllerProcess(controller_config) as controller:
        controller.wait_serving()
        with AgentProcess(config) as agent:
            agent.wait_serving()
            deadline = time.monotonic() + 30
            rows: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                shown = run_controller(
                    ["status", "--group", "line3", "--json", "--config", str(controller_config)]
                )
                rows = json.loads(shown.stdout) if shown.returncode == 0 else []
                if rows and rows[0]["online"]:
                    break
                time.sleep(0.3)
            assert [r["device"] for r in rows] == [DEVICE], shown.stdout + shown.stderr
            assert rows[0]["tags"] == ["line-3", "night"]
            assert rows[0]["groups"] == ["line3", "tag:line-3", "tag:night"]
            # The retained reported state carries the field as the agent sent it.
            entry = json.loads(
                run_controller(
                    ["status", DEVICE, "--json", "--config", str(controller_config)]
                ).stdout
            )
            assert entry["reported"]["message"]["tags"] == ["line-3", "night"]
            other = run_controller(
                ["status", "--group", "line4", "--json", "--config", str(controller_config)]
            )
            assert json.loads(other.stdout) == []
            table = run_controller(["status", "--config", str(controller_config)])
            (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith(DEVICE)]
            assert line.endswith("line-3,night"), table.stdout
