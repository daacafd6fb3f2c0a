"""The composition root: reads the config, wires the parts, runs the service."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common.logs import configure_logging
from agent.config import (
    DEFAULT_CONFIG_PATH,
    STOP_HOOKS_TIMEOUT_S,
    AgentConfig,
    ServerConfig,
    build_config,
)
from agent.errors import AgentError, ConfigError
from agent.fleet.state_store import StateStore
from agent.serving.control_auth import control_policy
from agent.serving.dataplane import DataPlane
from agent.serving.grpc_server import HealthReporter, TlsFiles, build_server
from agent.serving.model_manager import (
    UNAVAILABLE,
    LoadSettings,
    ModelManager,
    ModelReader,
    serving_threads,
)
from agent.serving.onnx_runtime import SessionOptions, share_thread_pools
from agent.serving.optimizer import OptimizingReader
from agent.system.notify import Notifier
from agent.system.watchdog import Run, Watchdog, start_watchdog
from agent.telemetry.publisher import TelemetryService

if TYPE_CHECKING:
    # Imported where used, so that a feature that is off costs no memory or start-up
    # time: fleet updates and MQTT (paho, cryptography) and signature checks.
    from agent.fleet.updater import Updater
    from agent.mqtt.client import Message, MqttClient

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
    from agent.serving.signed_reader import signed_reader

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


# On SIGTERM, once inference has drained: time for the last responses to be sent.
_RESPONSE_GRACE_S = 1.0


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# Config sections a reload applies (server only in part); the others need a restart.
_RELOADABLE = ("repository", "logging", "server", "control", "source")


def _restart_only(server: ServerConfig) -> ServerConfig:
    # The server keys a reload cannot apply (listening sockets, TLS, limits).
    return replace(server, drain_timeout_s=0.0, stall_timeout_s=0.0)


# A shutdown step after the drain: (name, coroutine function).
StopHook = tuple[str, Callable[[], Awaitable[None]]]


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._config_path = config_path
        self._overrides = overrides  # CLI flags: they win over the file on reload too
        self._notifier = Notifier()
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._watchdog: Watchdog | None = None
        # Run on SIGTERM after the drain, in order (add_stop_hook).
        self.stop_hooks: list[StopHook] = []
        self.bound: list[str] = []
        # Before anything else touches onnxruntime: its thread pools, made once at
        # normal priority, so that sessions can be created at a low one.
        intra, instances = serving_threads(
            config.runtime.intra_op_threads,
            config.runtime.default_instance_count,
            os.cpu_count() or 1,
        )
        share_thread_pools(intra, config.runtime.inter_op_threads)
        settings = LoadSettings(
            session=SessionOptions(
                intra_op_threads=intra,
                inter_op_threads=config.runtime.inter_op_threads,
                graph_optimization=config.runtime.graph_optimization,
                execution_providers=config.runtime.execution_providers,
            ),
            default_instance_count=instances,
            default_max_queue_size=config.runtime.default_max_queue_size,
            max_instance_count=config.runtime.max_instance_count,
            execution=config.runtime.execution,
            inline_threshold_us=config.runtime.inline_threshold_us,
        )
        # Versions with a signed optimize.json may serve a faster verified variant.
        reader = OptimizingReader(make_reader(config), Path(config.state.dir), settings.session)
        self.models = ModelManager(
            Path(config.repository.path), reader, settings, self._models_changed
        )
        self.plane = DataPlane(self.models, config.repository.model_control == "explicit")
        self.plane.control = control_policy(config)  # reads control.token_file
        self.plane.shared_memory.enabled = config.server.shared_memory == "system"
        # Health and drift telemetry (Prometheus, and MQTT when the fleet plane is on).
        # Its stop hook is registered first: the flush runs before MQTT says offline.
        self.telemetry = TelemetryService(
            config.telemetry,
            self.models,
            reader,
            Path(config.state.dir),
            lambda name, version: self.models.root / name / version,
        )
        self.plane.observe = self.telemetry.tap
        self.add_stop_hook("telemetry: final report and flush", self.telemetry.stop)
        # Fleet updates: the state (pins) applies even with MQTT off; the MQTT side
        # starts after serving does, and never holds serving up. Created by start()
        # only if MQTT is on or a fleet state exists (else the fleet code is not loaded).
        self.updater: Updater[Message] | None = None
        self._fleet_client: MqttClient | None = None  # the one MQTT connection
        self.health = HealthReporter(self.plane)
        self._server: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    def _models_changed(self) -> None:
        self._spawn(self.health.refresh())
        if self._started.is_set() and not self._reload_lock.locked():  # reload says READY
            self._notifier.status(self._status_text())

    def _spawn(self, coro: Any) -> None:
        self._keep(asyncio.get_running_loop().create_task(coro))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _status_text(self) -> str:
        ready = len(self.models.serving())
        failed = sum(
            1 for v in self.models.states().values() for s in v.values() if s.state == UNAVAILABLE
        )
        text = f"serving {ready} model version(s) on {', '.join(self.bound)}"
        return text + (f"; {failed} unavailable (see RepositoryIndex)" if failed else "")

    def _runs(self) -> Iterator[Run]:
        for model in self.models.serving():
            started = model.scheduler.oldest_run_started()
            if started is not None:
                yield Run(model.spec.name, model.spec.version, started)

    async def start(self) -> list[str]:
        started = time.monotonic()
        cfg = self.config
        # systemd holds us to the watchdog only from READY=1 to STOPPING=1; pinging
        # from here on is harmless (model loading runs on threads, not the loop).
        watchdog = start_watchdog(
            self._notifier, self._runs, cfg.server.stall_timeout_s, self._status_text
        )
        if watchdog is not None:
            self._watchdog, task = watchdog
            self._keep(task)
        self._notifier.status(f"loading models from {cfg.repository.path}")
        explicit = cfg.repository.model_control == "explicit"
        startup = list(cfg.repository.startup_models) if explicit else None
        self.models.set_pins(await asyncio.to_thread(self._prepare_fleet))
        # Explicit model control with no startup models loads none (as Triton).
        await self.models.sync_repository(startup)
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
        self._notifier.notify("READY=1", "STATUS=" + self._status_text())
        self._started.set()
        if cfg.mqtt.enabled:
            await self._start_fleet()
        await self._start_telemetry()
        return self.bound

    def _prepare_fleet(self) -> dict[str, int]:
        """Blocking (a worker thread): the fleet state's pins; creates the updater.

        With MQTT off and no fleet state on disk there is nothing to recover or pin
        (``Updater.prepare`` would return {} too): the fleet modules stay unloaded.
        """
        cfg = self.config
        store = StateStore(Path(cfg.state.dir))
        if not cfg.mqtt.enabled and not store.path.exists():
            return {}
        from agent.adapters.fleet import OnnxVersionValidator, session_options
        from agent.fleet.settings import UpdaterSettings
        from agent.fleet.updater import Updater

        validator = OnnxVersionValidator(session_options(cfg), self.models.free)
        self.updater = Updater(UpdaterSettings.from_config(cfg), self.models, validator, store)
        return self.updater.prepare(cfg.mqtt.enabled)

    async def _start_fleet(self) -> None:
        """Connect to the broker in the background; a broker that is away is retried."""
        from agent.adapters.chunk_fetcher import MqttChunkFetcher
        from agent.adapters.fleet import mqtt_settings, mqtt_will
        from agent.mqtt.client import MqttClient

        assert self.updater is not None  # MQTT on: start() created it
        s = self.updater.settings
        device = s.device_id
        try:
            client = MqttClient(mqtt_settings(self.config, device), mqtt_will(self.updater.will()))
        except (OSError, ValueError) as exc:  # TLS files unreadable or unusable
            log.error("fleet updates off: cannot set up MQTT (check the mqtt.tls_* keys)",
                      extra={"reason": str(exc)})
            return
        fetcher = MqttChunkFetcher(client, s.prefix, device, s.chunk_timeout_s)
        self._fleet_client = client
        await self.updater.start(client, fetcher)
        self.add_stop_hook("fleet: offline state", self.updater.stop)
        log.info("fleet updates on",
                 extra={"device": device, "broker": f"{self.config.mqtt.host}:"
                                                    f"{self.config.mqtt.port}"})

    async def _start_telemetry(self) -> None:
        updater = self.updater
        client = self._fleet_client
        if updater is not None and client is not None:
            s = updater.settings
            self.telemetry.attach_mqtt(client, s.prefix, s.device_id)
        try:
            await self.telemetry.start()
        except Exception:  # telemetry must never stop predictions from being served
            log.exception("telemetry not started")

    def request_reload(self) -> None:
        self._spawn(self.reload())

    async def reload(self) -> None:
        """SIGHUP: re-read the config and rescan the repository; a bad config changes nothing.

        Reloads run one at a time, and only after start-up has finished.
        """
        await self._started.wait()
        async with self._reload_lock:
            self._notifier.reloading("reloading config and model repository")
            problem = None
            try:
                problem = await self._reload()
            except Exception:  # keep serving what is loaded; say so
                log.exception("reload failed")
                problem = "reload failed (see the log)"
            finally:
                status = self._status_text()
                if problem:
                    status += f"; {problem}"
                self._notifier.notify("READY=1", "STATUS=" + status)

    async def _reload(self) -> str | None:
        """Returns what went wrong for the status line, or None."""
        try:
            new = read_config(self._config_path, self._overrides)
            control = control_policy(new)  # a rotated token file applies now
        except ConfigError as exc:
            log.error(
                "reload refused: config invalid, keeping the running one",
                extra={"reason": str(exc)},
            )
            return "reload refused: " + " ".join(str(exc).split())
        old = self.config
        restart_needed = [
            f.name
            for f in fields(new)
            if f.name not in _RELOADABLE and getattr(new, f.name) != getattr(old, f.name)
        ]
        if _restart_only(new.server) != _restart_only(old.server):
            restart_needed.insert(0, "server")
        if restart_needed:
            log.warning(
                "config sections changed that take effect only on restart",
                extra={"sections": restart_needed},
            )
        if new.logging != old.logging:
            configure_logging(new.logging.level, new.logging.format)
        self.config = replace(
            old,
            repository=new.repository,
            logging=new.logging,
            control=new.control,
            server=replace(
                old.server,
                drain_timeout_s=new.server.drain_timeout_s,
                stall_timeout_s=new.server.stall_timeout_s,
            ),
        )
        if self._watchdog is not None:
            self._watchdog.stall_timeout_s = new.server.stall_timeout_s
        explicit = new.repository.model_control == "explicit"
        self.plane.explicit_model_control = explicit
        self.plane.control = control
        self.plane.shared_memory.enabled = new.server.shared_memory == "system"
        self.models.root = Path(new.repository.path)
        # With explicit model control, only what is loaded is rescanned; the rest
        # waits for a RepositoryModelLoad.
        only = sorted({m.spec.name for m in self.models.serving()}) if explicit else None
        try:
            await self.models.sync_repository(only)
        except AgentError as exc:
            log.error("repository rescan failed", extra={"reason": str(exc)})
        log.info(
            "reloaded",
            extra={
                "models": sorted(f"{m.spec.name}:{m.spec.version}" for m in self.models.serving())
            },
        )
        return None

    def add_stop_hook(self, name: str, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` on shutdown once requests have drained (flush telemetry,
        publish the offline state); all hooks share STOP_HOOKS_TIMEOUT_S."""
        self.stop_hooks.append((name, hook))

    async def stop(self) -> bool:
        """SIGTERM: stop taking requests, let running ones finish (bounded), run the stop
        hooks, release. Returns False if an inference run is still stuck on a worker."""
        drain_s = self.config.server.drain_timeout_s
        deadline = time.monotonic() + drain_s
        self._notifier.notify(
            "STOPPING=1", f"STATUS=stopping: draining in-flight requests (up to {drain_s:g} s)"
        )
        log.info("stopping", extra={"drain_timeout_s": drain_s})
        for task in list(self._background):  # the watchdog, a reload in progress
            task.cancel()
        # New inference requests now get UNAVAILABLE (which clients retry elsewhere)
        # and health says NOT_SERVING, while the ones running finish.
        self.plane.accepting = False
        await self.health.refresh()
        workers = [m.scheduler for m in self.models.serving()]
        await asyncio.gather(*(w.drain(_remaining(deadline)) for w in workers))
        await self.models.close(_remaining(deadline))  # versions retired by a reload
        if self._server is not None:
            # Inference is done: the last responses get a moment to go out, then
            # what is left (idle streams, a model load) is cancelled.
            await self._server.stop(grace=min(_remaining(deadline), _RESPONSE_GRACE_S))
        self.plane.shared_memory.close()  # unmap every registered region
        hooks_deadline = time.monotonic() + STOP_HOOKS_TIMEOUT_S
        for name, hook in self.stop_hooks:
            try:
                await asyncio.wait_for(hook(), _remaining(hooks_deadline))
            except Exception as exc:  # one failing hook must not block the others
                log.error("stop hook failed", extra={"hook": name, "reason": repr(exc)})
        stuck = sorted(
            f"{w.spec.name}:{w.spec.version}" for w in workers if w.oldest_run_started() is not None
        )
        if stuck:
            log.error(
                "inference runs still going after server.drain_timeout_s; abandoning them",
                extra={"models": stuck},
            )
        log.info("stopped")
        return not stuck

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> bool:
        """Serve until SIGTERM/SIGINT; True if everything stopped cleanly."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
        except AgentError as exc:
            self._notifier.status(f"start-up failed: {exc}")
            raise
        await self._stop.wait()
        return await self.stop()


async def serve(
    config: AgentConfig, config_path: Path | None, overrides: dict[str, Any] | None = None
) -> None:
    # On SIGABRT (systemd's watchdog signal) dump every thread's stack to the journal.
    faulthandler.enable()
    from agent.startup_checks import check_startup

    # The same checks as `edge-agent check-config`: a ConfigError here stops start-up.
    for warning in check_startup(config):
        log.warning(warning)
    if not await Agent(config, config_path, overrides).run():
        # A worker thread is stuck inside onnxruntime and cannot be interrupted;
        # the interpreter would wait for it forever at exit.
        os._exit(0)
