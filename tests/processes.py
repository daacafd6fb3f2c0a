"""A child process whose stderr JSON log lines are read by a thread; stopped by PID.

The base of ``AgentProcess`` (tests/agent_process.py), ``ControllerProcess``
(tests/controller_process.py) and the benchmark's ``EchoProcess``: each starts a
program that logs JSON lines to stderr and announces itself with a ``serving``
event. Every stderr line is kept in ``lines``, every JSON object in ``events``;
``addresses`` comes from the ``serving`` event when it lists any.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self


class LoggedProcess:
    """``args`` as a child process; ``name`` and ``tail_lines`` shape its error messages."""

    name = "process"
    tail_lines = 30

    def __init__(
        self, args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.addresses: list[str] = []
        self._serving = threading.Event()
        self._exited = threading.Event()
        self.proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            self._on_event(event)
            if event.get("msg") == "serving":
                self.addresses = list(event.get("addresses", []))
                self._serving.set()
        self._exited.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        """Called on the reader thread for every JSON object logged, in order."""

    @property
    def address(self) -> str:
        return self.addresses[0]

    def _tail(self) -> str:
        return "\n".join(self.lines[-self.tail_lines :])

    def wait_serving(self, timeout: float = 30.0) -> Self:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._serving.wait(0.05):
                return self
            if self.proc.poll() is not None:
                self._exited.wait(2)
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before serving:\n"
                    + self._tail()
                )
        raise TimeoutError(f"{self.name} not serving in time:\n" + self._tail())

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._exited.wait(5)
        return code

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; by PID, always."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL by PID: a crash."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._exited.wait(5)

    def stop(self, timeout: float = 20.0) -> object:
        """Subclasses narrow what ``stop`` returns; this one returns the exit code."""
        return self.terminate(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
