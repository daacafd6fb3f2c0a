"""Start and stop a real ``edge-controller`` process (and run its one-shot commands).

``ControllerProcess`` runs ``python -m agent.controller.cli serve`` and parses
its JSON log lines from stderr: it is serving once the ``serving`` event is
logged (every subscription acknowledged), and its final counters arrive in the
``stopped`` event after SIGTERM. Stopped by PID, always.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.agent_process import REPO_ROOT, write_toml
from tests.mqtt_broker import CONTROLLER_IDENTITY, MosquittoBroker
from tests.processes import LoggedProcess


def controller_toml(
    path: Path,
    broker: MosquittoBroker,
    store: Path,
    *,
    trust_dir: Path | None = None,
    deploy_key: Path | None = None,
    share_group: str = "edge-controllers",
    max_chunk_bytes: int | None = None,
    max_bytes_per_s: int | None = None,
    client_id: str = "",
) -> Path:
    """A controller config for ``broker`` (TLS with the controller certificate if it has TLS)."""
    broker_section: dict[str, Any] = {"host": broker.host, "port": broker.port}
    if client_id:
        broker_section["client_id"] = client_id
    if broker.tls is not None:
        cert = broker.tls.client(CONTROLLER_IDENTITY)
        broker_section |= {
            "tls_ca": str(broker.tls.ca_cert),
            "tls_cert": str(cert.cert),
            "tls_key": str(cert.key),
        }
    fleet: dict[str, Any] = {"prefix": broker.prefix, "share_group": share_group}
    if max_chunk_bytes is not None:
        fleet["max_chunk_bytes"] = max_chunk_bytes
    if max_bytes_per_s is not None:
        fleet["max_bytes_per_s"] = max_bytes_per_s
    config: dict[str, dict[str, Any]] = {
        "broker": broker_section,
        "fleet": fleet,
        "store": {"dir": str(store)},
    }
    if trust_dir is not None:
        config["signing"] = {"trust_dir": str(trust_dir)}
    if deploy_key is not None:
        config["deploy"] = {"key": str(deploy_key)}
    return write_toml(path, config)


def run_controller(
    args: Sequence[str], timeout: float = 60.0, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``edge-controller`` command; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "agent.controller.cli", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def publish_version(
    config: Path, version_dir: Path, model: str, version: int
) -> subprocess.CompletedProcess[str]:
    """``edge-controller publish`` of a signed version directory into the config's store."""
    return run_controller(
        ["publish", str(version_dir), "--model", model, "--version", str(version),
         "--config", str(config)]
    )


class ControllerProcess(LoggedProcess):
    """``edge-controller serve`` as a child process."""

    name = "controller"
    tail_lines = 40

    def __init__(self, config_path: Path, extra_args: Sequence[str] = ()) -> None:
        self._stopped_event: dict[str, Any] | None = None
        super().__init__(
            [
                sys.executable,
                "-m",
                "agent.controller.cli",
                "serve",
                "--config",
                str(config_path),
                *extra_args,
            ],
            REPO_ROOT,
        )

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("msg") == "stopped":
            self._stopped_event = event

    def wait_serving(self, timeout: float = 20.0) -> Self:
        return super().wait_serving(timeout)

    def log_text(self) -> str:
        return self._tail()

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """SIGTERM by PID (SIGKILL if it lingers); returns the ``stopped`` event, if logged."""
        self.terminate(timeout)
        return self._stopped_event
