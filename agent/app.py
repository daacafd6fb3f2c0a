"""The composition root: reads the config, wires the parts, runs the service."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, build_config
from agent.dataplane import DataPlane
from agent.errors import AgentError, ConfigError
from agent.grpc_server import HealthReporter, TlsFiles, build_server
from agent.model_manager import LoadSettings, ModelManager, ModelReader
from agent.onnx_runtime import SessionOptions
from agent.systemd import Notifier

log = logging.getLogger("agent")


def read_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Load ``path`` (or the default location if it exists, else the embedded defaults)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    candidate = path if path is not None else DEFAULT_CONFIG_PATH
    if path is not None or candidate.exists():
        try:
            data = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {candidate} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{candidate}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {candidate}: {exc}") from None
        source = str(candidate)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return build_config(data, source)


def unsigned_reader(version_dir: Path, filename: str) -> bytes:
    """Reads a model file without verification (only with allow_unsigned_models)."""
    return (version_dir / filename).read_bytes()


def make_reader(config: AgentConfig) -> ModelReader:
    if config.signing.allow_unsigned_models:
        log.warning(
            "SIGNATURE CHECKS ARE OFF: signing.allow_unsigned_models = true; any model file in "
            "the repository will be served",
            extra={"key": "signing.allow_unsigned_models"},
        )
        return unsigned_reader
    from agent.signing.loader import signed_reader  # wired when signing is configured

    return signed_reader(Path(config.signing.trust_dir))


def _read_tls(config: AgentConfig) -> TlsFiles | None:
    s = config.server
    if not s.tls_cert:
        return None
    try:
        return TlsFiles(
            cert=Path(s.tls_cert).read_bytes(),
            key=Path(s.tls_key).read_bytes(),
            client_ca=Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file: {exc}") from exc


class Agent:
    def __init__(self, config: AgentConfig, config_path: Path | None = None) -> None:
        self.config = config
        self._config_path = config_path
        self._notifier = Notifier()
        self._stop = asyncio.Event()
        self.bound: list[str] = []
        settings = LoadSettings(
            session=SessionOptions(
                intra_op_threads=config.runtime.intra_op_threads,
                inter_op_threads=config.runtime.inter_op_threads,
                graph_optimization=config.runtime.graph_optimization,
                execution_providers=config.runtime.execution_providers,
            ),
            default_instance_count=config.runtime.default_instance_count,
            default_max_queue_size=config.runtime.default_max_queue_size,
        )
        self.models = ModelManager(
            Path(config.repository.path), make_reader(config), settings, self._models_changed
        )
        self.plane = DataPlane(self.models, config.repository.model_control == "explicit")
        self.health = HealthReporter(self.plane)
        self._server: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    def _models_changed(self) -> None:
        self._spawn(self.health.refresh())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _status_line(self) -> str:
        ready = sum(1 for _ in self.models.serving())
        return f"STATUS=serving {ready} model version(s) on {', '.join(self.bound)}"

    async def start(self) -> list[str]:
        started = time.monotonic()
        cfg = self.config
        self._notifier.notify("STATUS=loading models")
        explicit = cfg.repository.model_control == "explicit"
        startup = list(cfg.repository.startup_models) if explicit else None
        await self.models.sync_repository(startup or None)
        addresses = [a for a in (cfg.server.address,) if a]
        if cfg.server.unix_socket:
            addresses.append(f"unix:{cfg.server.unix_socket}")
        try:
            self._server, self.bound = build_server(
                self.plane,
                self.health,
                addresses,
                cfg.server.max_message_bytes,
                _read_tls(cfg),
                cfg.server.max_concurrent_streams,
            )
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot listen on {', '.join(addresses)}: {exc}") from exc
        await self._server.start()
        self.plane.accepting = True
        await self.health.refresh()
        log.info(
            "serving",
            extra={
                "addresses": self.bound,
                "models": sorted(
                    f"{m.spec.name}:{m.spec.version}" for m in self.models.serving()
                ),
                "startup_s": round(time.monotonic() - started, 3),
            },
        )
        self._notifier.notify("READY=1", self._status_line())
        return self.bound

    async def reload(self) -> None:
        """SIGHUP: re-read the config and rescan the repository; a bad config changes nothing."""
        self._notifier.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            new = read_config(self._config_path)
        except ConfigError as exc:
            log.error("reload refused: config invalid, keeping the running one",
                      extra={"reason": str(exc)})
            self._notifier.notify("READY=1", f"STATUS=reload refused: {exc}")
            return
        restart_needed = [
            key for key in ("server", "signing", "runtime")
            if getattr(new, key) != getattr(self.config, key)
        ]
        if restart_needed:
            log.warning(
                "config sections changed that take effect only on restart",
                extra={"sections": restart_needed},
            )
        self.config = replace(self.config, repository=new.repository, logging=new.logging)
        self.plane.explicit_model_control = new.repository.model_control == "explicit"
        try:
            await self.models.sync_repository()
        except AgentError as exc:
            log.error("repository rescan failed", extra={"reason": str(exc)})
        log.info("reloaded", extra={"models": len(self.models.serving())})
        self._notifier.notify("READY=1", self._status_line())

    async def stop(self) -> None:
        """SIGTERM: stop taking requests, let running ones finish (bounded), release."""
        self._notifier.notify("STOPPING=1", "STATUS=draining")
        timeout = self.config.server.drain_timeout_s
        self.plane.accepting = False
        await self.health.refresh()
        if self._server is not None:
            await self._server.stop(grace=timeout)
        await self.models.close(timeout)
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        await self.start()
        await self._stop.wait()
        await self.stop()


async def serve(config: AgentConfig, config_path: Path | None) -> None:
    await Agent(config, config_path).run()
