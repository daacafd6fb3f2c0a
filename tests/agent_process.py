"""Start and stop a real ``edge-agent serve`` process for tests and benchmarks.

The agent runs in its own process: that is how users run it, and it keeps the
agent's protobuf modules apart from tritonclient's (both register Triton's
``model_config.proto`` under the same name, which one process cannot hold).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.processes import LoggedProcess

REPO_ROOT = Path(__file__).resolve().parents[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_toml(path: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class AgentProcess(LoggedProcess):
    """``edge-agent serve`` as a child process; ``address`` is known once it is serving."""

    name = "agent"

    def __init__(
        self,
        config_path: Path | None,
        extra_args: list[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        args = [sys.executable, "-m", "agent.cli", "serve"]
        if config_path is not None:
            args += ["--config", str(config_path)]
        args += extra_args or []
        super().__init__(args, cwd, env)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; by PID, always."""
        return self.terminate(timeout)


def start_serving(
    config_path: Path, extra_args: list[str] | None = None, env: Mapping[str, str] | None = None,
) -> AgentProcess:
    """Start the agent and wait until it serves; if it never does, it is stopped again."""
    agent = AgentProcess(config_path, extra_args, env)
    try:
        agent.wait_serving()
    except BaseException:
        agent.stop()
        raise
    return agent


def metrics_address(agent: AgentProcess, timeout: float = 15.0) -> str:
    """The address the agent's Prometheus endpoint listens on, from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in list(agent.events):
            if event.get("msg") == "prometheus endpoint listening":
                return str(event["address"])
        time.sleep(0.05)
    raise AssertionError("no prometheus endpoint in the log:\n" + agent.log_text()[-3000:])
