"""Start and stop a real ``edge-agent serve`` process for tests and benchmarks.

The agent runs in its own process: that is how users run it, and it keeps the
agent's protobuf modules apart from tritonclient's (both register Triton's
``model_config.proto`` under the same name, which one process cannot hold).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class AgentProcess:
    """``edge-agent serve`` as a child process; ``address`` is known once it is serving."""

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
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._serving = threading.Event()
        self._exited = threading.Event()
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.addresses: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("msg") == "serving":
                self.addresses = list(event["addresses"])
                self._serving.set()
        self._exited.set()

    @property
    def address(self) -> str:
        return self.addresses[0]

    def wait_serving(self, timeout: float = 30.0) -> AgentProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._serving.wait(0.05):
                return self
            if self.proc.poll() is not None:
                self._exited.wait(2)
                raise RuntimeError(
                    f"agent exited with {self.proc.returncode} before serving:\n"
                    + "\n".join(self.lines[-30:])
                )
        raise TimeoutError("agent not serving in time:\n" + "\n".join(self.lines[-30:]))

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._exited.wait(5)
        return code

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; by PID, always."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.wait_exit(timeout)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
