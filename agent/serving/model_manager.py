"""Which model versions are loaded, and loading, swapping and unloading them.

Loading (disk reads, signature checks, onnxruntime session creation) runs on
a worker thread. A new version is fully loaded before it replaces the old one;
the old one then drains: requests already running finish on it, and only
then are its workers released.

A model can be *pinned* to one version (the fleet updater does this: the
version its state says must serve). A pin replaces the config's version policy
for that model; a pinned version that fails to load leaves the versions that
were serving in place. The updater may also hand over the session it validated
the version's verified bytes with, so that a large model is not read, hashed
and loaded a second time to go live (``activate``'s ``prepared``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.background import call_in_background
from agent.common.buffers import FileBytes, release
from agent.errors import AgentError, ModelConfigError, ModelNotFoundError, ModelNotReadyError
from agent.serving.classification import read_labels
from agent.serving.model_config import (
    ModelSpec,
    complete_config,
    model_spec,
    parse_config_pbtxt,
    warmup_samples,
)
from agent.serving.onnx_runtime import (
    OnnxSession,
    SessionOptions,
    shares_thread_pools,
    starts_no_threads,
    zero_inputs,
)
from agent.serving.repository import (
    EntryProblem,
    RepositoryModel,
    check_model_name,
    read_model,
    scan_repository_entries,
    select_versions,
)
from agent.serving.scheduler import (
    AUTO,
    EXECUTION_MODES,
    INLINE,
    Execution,
    Scheduler,
    handoff_ns,
    make_scheduler,
)
from agent.serving.stats import ModelStats
from agent.wire import model_config_pb2 as mc

log = logging.getLogger("agent.models")

# (version directory, file name inside it) -> the file's verified bytes.
ModelReader = Callable[[Path, str], FileBytes]

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"


def serving_threads(
    intra_op_threads: int, default_instance_count: int, cores: int
) -> tuple[int, int]:
    """(threads per run, instances per model) for the config's values, 0 deciding.

    Several instances of one thread each use the cores with least overhead under
    concurrency (no pool threads to wake or spin); at most 4 instances, the cores
    shared out among them beyond that.
    """
    instances = default_instance_count or max(1, min(cores, 4))
    intra = intra_op_threads or max(1, cores // instances)
    return intra, instances


@dataclass(frozen=True, slots=True)
class LoadSettings:
    session: SessionOptions
    default_instance_count: int
    default_max_queue_size: int
    max_instance_count: int = 0  # 0: model_config.default_max_instances()
    execution: str = AUTO  # auto | inline | worker (config.pbtxt parameter "execution" wins)
    inline_threshold_us: int = 0  # auto: runs shorter than this are inline; 0: handoff_ns()

# config.pbtxt: parameters { key: "execution" value { string_value: "inline" } }
EXECUTION_PARAMETER = "execution"
WARM_UP_TIMED_RUNS = 7
WARM_UP_TIMED_BUDGET_NS = 50_000_000  # a slow model: fewer timed runs
# How long a load waits for the first warm-up run before calling the model slow (far
# above any thread hop); the run itself goes on in the background, so a model that
# takes seconds per run does not hold up the load.
FIRST_RUN_WAIT_S = 0.05


@dataclass(slots=True)
class ServingModel:
    spec: ModelSpec
    config: mc.ModelConfig
    scheduler: Scheduler
    stats: ModelStats
    fingerprint: tuple[tuple[str, int, int], ...]
    loaded_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class VersionState:
    state: str
    reason: str = ""


def _fingerprint(version_dir: Path, config_text: str | None) -> tuple[tuple[str, int, int], ...]:
    # Cheap change detection for reloads; verification happens on every load anyway.
    # Never raises: a file that cannot be stat'ed (a dangling symlink) is a change
    # like any other, and the load that follows reports it.
    entries = [("config.pbtxt", hash(config_text), 0)]
    for root, _dirs, files in os.walk(version_dir):
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(root, name))
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, 0
            entries.append((os.path.relpath(os.path.join(root, name), version_dir), size, mtime))
    return tuple(sorted(entries))


def _load_failure(exc: Exception, model: str, version: str) -> str:
    """The reason a version did not load, for its state; unexpected errors logged in full."""
    if isinstance(exc, (AgentError, OSError)):
        return str(exc)
    log.exception("unexpected error loading a model version",
                  extra={"model": model, "version": version})
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _log_problem(problem: EntryProblem) -> None:
    log.warning(
        "repository entry skipped",
        extra={"entry": problem.entry, "model": problem.model, "reason": problem.reason},
    )


@dataclass(slots=True)
class _Loaded:
    spec: ModelSpec
    config: mc.ModelConfig
    session: OnnxSession
    fingerprint: tuple[tuple[str, int, int], ...]
    execution: Execution


def _first_run(session: OnnxSession, names: list[str], feeds: dict[str, Any]) -> bool:
    """Run once, waiting at most ``FIRST_RUN_WAIT_S``; False if it is still running
    (it finishes on its own thread). Its failure is raised here."""
    failed: list[BaseException] = []
    done = threading.Event()

    def body() -> None:
        try:
            session.run(names, feeds)
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, name="warm-up", daemon=True).start()
    if not done.wait(FIRST_RUN_WAIT_S):
        return False
    if failed:
        raise failed[0]
    return True


def _warm_up(session: OnnxSession, name: str, version: int, timed_runs: int = 0) -> int | None:
    """Run once on zeros (the first run allocates: not on the first request's latency),
    then up to ``timed_runs`` more; their median in ns (None: not measured).

    When timing, a first run that outlasts ``FIRST_RUN_WAIT_S`` is not waited for:
    the model is that slow at least.
    """
    names = [t.name for t in session.outputs]
    try:
        feeds = zero_inputs(session.inputs)
        if not timed_runs:
            session.run(names, feeds)
        elif not _first_run(session, names, feeds):
            return int(FIRST_RUN_WAIT_S * 1e9)
        took: list[int] = []
        spent = 0
        while len(took) < timed_runs and spent < WARM_UP_TIMED_BUDGET_NS:
            start = time.perf_counter_ns()
            session.run(names, feeds)
            took.append(time.perf_counter_ns() - start)
            spent += took[-1]
        return sorted(took)[len(took) // 2] if took else None
    except Exception as exc:  # a model may refuse zeros; that is not a load failure
        log.info(
            "warm-up run failed (not an error)",
            extra={"model": name, "version": version, "reason": str(exc)[:200]},
        )
        return None


def _execution_mode(declared: mc.ModelConfig, settings: LoadSettings, where: str) -> str:
    unknown = sorted(k for k in declared.parameters if k != EXECUTION_PARAMETER)
    if unknown:
        raise ModelConfigError(
            f"{where}: parameter(s) {', '.join(unknown)} not supported by edge-agent "
            f"(the one model parameter it reads is '{EXECUTION_PARAMETER}')"
        )
    param = declared.parameters.get(EXECUTION_PARAMETER)
    if param is None:
        return settings.execution
    mode = param.string_value.strip().lower()
    if mode not in EXECUTION_MODES:
        raise ModelConfigError(
            f"{where}: parameter '{EXECUTION_PARAMETER}' must be one of "
            f"{', '.join(EXECUTION_MODES)}, not '{param.string_value}'"
        )
    return mode


def _load_blocking(
    model: RepositoryModel,
    version: int,
    reader: ModelReader,
    settings: LoadSettings,
    warm_up: bool = False,
    prepared: OnnxSession | None = None,
    threshold_ns: int = 0,
) -> _Loaded:
    version_dir = model.path / str(version)
    declared = (
        parse_config_pbtxt(model.config_text, f"{model.path / 'config.pbtxt'}")
        if model.config_text is not None
        else mc.ModelConfig()
    )
    filename = declared.default_model_filename or "model.onnx"
    fingerprint = _fingerprint(version_dir, model.config_text)
    # Reading and verifying (hashing every file) at a low priority, on a thread of
    # its own. The session too, unless creating it starts onnxruntime pool threads:
    # those inherit their creator's priority and serve requests.
    if prepared is not None:
        session = prepared
    else:
        model_bytes = call_in_background(reader, version_dir, filename, name="model-verify")
        try:
            if starts_no_threads(settings.session):
                session = call_in_background(
                    OnnxSession, model_bytes, settings.session, name="model-load"
                )
            else:
                session = OnnxSession(model_bytes, settings.session)
        finally:
            release(model_bytes)  # a large model's: in pieces, here off the loop
    mode = _execution_mode(declared, settings, f"{model.path / 'config.pbtxt'}")
    measured: int | None = None
    if mode == AUTO:
        # Where it runs follows its run time: measured now, on zeros.
        measured = _warm_up(session, model.name, version, WARM_UP_TIMED_RUNS)
    elif warm_up or mode == INLINE:  # an inline model's first run is on the loop otherwise
        _warm_up(session, model.name, version)
    config = complete_config(
        declared, model.name, session.inputs, session.outputs, settings.default_instance_count,
        settings.max_instance_count,
    )
    spec = model_spec(
        config, str(version), settings.default_max_queue_size, read_labels(model.path, config)
    )
    for warm_name, count, feeds in warmup_samples(spec, config):  # config.pbtxt model_warmup
        for _ in range(count):
            try:
                session.run([t.name for t in session.outputs], feeds)
            except Exception as exc:  # as Triton: a failing warm-up fails the load
                raise ModelConfigError(f"model_warmup '{warm_name}' failed: {exc}") from exc
    return _Loaded(spec, config, session, fingerprint, Execution(mode, threshold_ns, measured))


class ModelManager:
    def __init__(
        self,
        root: Path,
        reader: ModelReader,
        settings: LoadSettings,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = root
        self._reader = reader
        self._settings = settings
        self._on_change = on_change
        self._serving: dict[str, dict[str, ServingModel]] = {}
        self._latest: dict[str, ServingModel] = {}
        self._states: dict[str, dict[str, VersionState]] = {}
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[Any]] = set()  # retiring versions, freeing sessions
        self._pins: dict[str, int] = {}
        # Entries that look like models or versions but cannot be (per model name; ""
        # for names that are no model names): RepositoryIndex and telemetry show them.
        self._problems: dict[str, tuple[EntryProblem, ...]] = {}

    # -- lookups (loop thread, cheap) ------------------------------------

    def resolve(self, name: str, version: str = "") -> ServingModel:
        if version:
            found = self._serving.get(name, {}).get(version)
        else:
            found = self._latest.get(name)
        if found is not None:
            return found
        states = self._states.get(name)
        if states is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        if version and version not in states:
            raise ModelNotFoundError(self._unknown_version(name, version, states))
        reasons = [f"version {v}: {s.state}{' (' + s.reason + ')' if s.reason else ''}"
                   for v, s in sorted(states.items()) if not version or v == version]
        raise ModelNotReadyError(f"model '{name}' is not ready: {'; '.join(reasons)}")

    def _unknown_version(self, name: str, version: str, states: dict[str, VersionState]) -> str:
        # On disk but not chosen: say why, not just "unknown" (only on this error path).
        if version.isdigit() and (self.root / name / version).is_dir():
            chosen = sorted((v for v in states if v != "0"), key=int)
            why = (
                f"the fleet pins version {self._pins[name]}" if name in self._pins
                else "the model's version_policy (config.pbtxt) excludes it"
            )
            return (
                f"version '{version}' of model '{name}' is in the repository but not served: "
                f"{why}; served: {', '.join(chosen) or 'none'}"
            )
        return f"unknown version '{version}' of model '{name}'"

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except AgentError:
            return False
        return True

    def versions(self, name: str) -> list[str]:
        return sorted(self._serving.get(name, {}), key=int)

    def states(self) -> dict[str, dict[str, VersionState]]:
        return self._states

    def problems(self) -> dict[str, tuple[EntryProblem, ...]]:
        """Unusable repository entries found by the last scan, per model name."""
        return self._problems

    def unavailable(self, limit: int = 64) -> list[dict[str, str]]:
        """Model versions and repository entries that are not serving, and why (for
        reports upstream): at most ``limit``, reasons cut to 300 characters."""
        out = [
            {"model": name, "version": "" if v == "0" else v, "reason": s.reason}
            for name, states in sorted(self._states.items())
            for v, s in sorted(states.items())
            if s.state == UNAVAILABLE
        ]
        out.extend(
            {"model": p.model, "version": p.version, "entry": p.entry, "reason": p.reason}
            for _name, found in sorted(self._problems.items())
            for p in found
        )
        return [{k: v[:300] for k, v in entry.items()} for entry in out[:limit]]

    def serving(self) -> list[ServingModel]:
        return [m for versions in self._serving.values() for m in versions.values()]

    def serving_versions(self, name: str) -> dict[str, ServingModel]:
        return self._serving.get(name, {})

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    # -- changes (serialised by one lock) ----------------------------------

    def set_pins(self, pins: Mapping[str, int]) -> None:
        """Pin models to versions before the first ``sync_repository`` (start-up)."""
        self._pins = dict(pins)

    async def activate(
        self, name: str, version: int | None, prepared: OnnxSession | None = None
    ) -> ServingModel | None:
        """Pin ``name`` to ``version`` (None: back to the policy) and make that serve.

        The new version is loaded and warmed up while the old one serves; then it
        takes new requests and the old one drains. If it fails to load, the pin
        goes back to what it was, what served keeps serving, and the error is raised.

        ``prepared``: a session the caller made from this version's model file,
        verified, as it now is on disk (the updater's validation session). It
        serves instead of a new load if it could have been made here (same
        thread pools, graph optimisation and providers); either way it is this
        manager's from now on, to serve or to free.
        """
        handed: dict[str, OnnxSession] = {}  # version -> prepared, until _sync_model takes it
        # A reader that may hand out an on-device variant (optimizer.OptimizingReader)
        # must read the version itself: the validation session runs the original.
        own_read = getattr(self._reader, "opted_in", None)
        if (
            prepared is not None
            and version is not None
            and own_read is not None
            and own_read(self.root / name / str(version))
        ):
            self.free(prepared)
            prepared = None
        if prepared is not None and version is not None and self._can_serve(prepared):
            handed[str(version)] = prepared
        elif prepared is not None:
            self.free(prepared)
        try:
            return await self._activate(name, version, handed)
        finally:
            for unused in handed.values():  # not taken: serving already, or an error
                self.free(unused)

    async def _activate(
        self, name: str, version: int | None, handed: dict[str, OnnxSession]
    ) -> ServingModel | None:
        check_model_name(name)
        async with self._lock:
            model = await self._read_model(name)
            if version is not None and version not in model.versions:
                raise ModelNotFoundError(f"model '{name}' has no version {version} on disk")
            previous = self._pins.get(name)
            if version is None:
                self._pins.pop(name, None)
            else:
                self._pins[name] = version
            await self._sync_model(model, warm_up=True, prepared=handed)
            self._on_change()
            if version is None:
                return None
            found = self._serving.get(name, {}).get(str(version))
            if found is None:
                if previous is None:
                    self._pins.pop(name, None)
                else:
                    self._pins[name] = previous
                state = self._states.get(name, {}).get(str(version))
                reason = state.reason if state is not None else "not loaded"
                raise ModelNotReadyError(
                    f"model '{name}' version {version} did not load: {reason}"
                )
            return found

    async def sync_repository(self, only: list[str] | None = None) -> None:
        """Bring what is served in line with the repository (start-up and reload)."""
        async with self._lock:
            scan = await asyncio.to_thread(scan_repository_entries, self.root)
            found = scan.models
            for problem in scan.ignored:
                _log_problem(problem)
            if only is None:
                self._problems = {"": scan.ignored} if scan.ignored else {}
            for name, problem in scan.broken.items():
                if only is None or name in only:
                    self._mark_broken(name, problem)
            names = list(found) if only is None else [n for n in only if n in found]
            for name in names:
                await self._sync_model(found[name])
            if only is None:
                gone = [n for n in self._states if n not in found and n not in scan.broken]
                for name in gone:
                    await self._unload(name, "removed from the repository")
            self._on_change()

    async def _read_model(self, name: str) -> RepositoryModel:
        """``read_model`` off the loop; an entry that cannot be a model is marked so."""
        try:
            return await asyncio.to_thread(read_model, self.root, name)
        except ModelConfigError as exc:
            self._mark_broken(name, EntryProblem(name, "", name, str(exc)))
            self._on_change()
            raise

    def _mark_broken(self, name: str, problem: EntryProblem) -> None:
        # What served under this name stops: its directory is no longer what was checked.
        _log_problem(problem)
        for model in self._serving.pop(name, {}).values():
            self._retire(model)
        self._refresh_latest(name)
        self._states[name] = {"0": VersionState(UNAVAILABLE, problem.reason)}
        self._problems.pop(name, None)

    async def load_model(self, name: str) -> None:
        check_model_name(name)
        async with self._lock:
            model = await self._read_model(name)
            await self._sync_model(model)
            self._on_change()
        self.resolve(name)  # raises with the reason if nothing came up

    async def unload_model(self, name: str) -> None:
        async with self._lock:
            if name not in self._states:
                raise ModelNotFoundError(f"unknown model '{name}'")
            await self._unload(name, "unloaded by request")
            self._on_change()

    def _can_serve(self, session: OnnxSession) -> bool:
        # A session of its own threads was made single-threaded (and maybe at a low
        # priority) for validation; only the shared pools make it a serving session.
        wanted = self._settings.session
        return (
            shares_thread_pools()
            and session.options.graph_optimization == wanted.graph_optimization
            and session.options.execution_providers == wanted.execution_providers
        )

    def free(self, session: OnnxSession | None) -> None:
        """Release a session that will not serve (hundreds of MB for a large model)
        on a worker thread, not on the loop; ``close`` waits for it."""
        if session is None:
            return
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(session.close))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _sync_model(
        self,
        model: RepositoryModel,
        warm_up: bool = False,
        prepared: dict[str, OnnxSession] | None = None,
    ) -> None:
        states = self._states.setdefault(model.name, {})
        serving = self._serving.setdefault(model.name, {})
        for problem in model.problems:
            _log_problem(problem)
        if model.problems:
            self._problems[model.name] = model.problems
        else:
            self._problems.pop(model.name, None)
        try:
            policy = (
                parse_config_pbtxt(model.config_text, str(model.path / "config.pbtxt"))
                if model.config_text is not None
                else mc.ModelConfig()
            ).version_policy
        except AgentError as exc:
            log.error("model config rejected", extra={"model": model.name, "reason": str(exc)})
            for v in model.versions or (0,):
                states[str(v)] = VersionState(UNAVAILABLE, str(exc))
            return
        pin = self._pins.get(model.name)
        if pin is not None and pin in model.versions:
            wanted = [str(pin)]
        else:
            if pin is not None:
                log.warning(
                    "pinned version missing on disk; using the version policy",
                    extra={"model": model.name, "version": pin},
                )
            wanted = [str(v) for v in select_versions(policy, model.versions)]
        if not wanted:
            states.clear()
            reason = "no version directories match the policy"
            if model.problems:
                reason = "no usable version directory: " + "; ".join(
                    f"{p.entry}: {p.reason}" for p in model.problems
                )
            states["0"] = VersionState(UNAVAILABLE, reason)
        for version in wanted:
            current = serving.get(version)
            version_dir = model.path / version
            if current is not None:
                fp = await asyncio.to_thread(_fingerprint, version_dir, model.config_text)
                if fp == current.fingerprint:
                    continue
            states[version] = VersionState(LOADING)
            session = prepared.pop(version, None) if prepared else None
            threshold_ns = self._settings.inline_threshold_us * 1000 or await handoff_ns()
            try:
                loaded = await asyncio.to_thread(
                    _load_blocking,
                    model,
                    int(version),
                    self._reader,
                    self._settings,
                    warm_up,
                    session,
                    threshold_ns,
                )
            except Exception as exc:  # one version's failure, whatever it is, is its own
                if session is not None:
                    self.free(session)
                reason = _load_failure(exc, model.name, version)
                log.error(
                    "model version not loaded",
                    extra={"model": model.name, "version": version, "reason": reason},
                )
                states[version] = VersionState(UNAVAILABLE, reason)
                if current is not None:
                    # The files changed under a serving version and the new ones fail:
                    # stop serving them rather than keep unverifiable content alive.
                    self._retire(serving.pop(version))
                continue
            stats = ModelStats()
            serving[version] = ServingModel(
                loaded.spec,
                loaded.config,
                make_scheduler(loaded.spec, loaded.session, stats, loaded.execution),
                stats,
                loaded.fingerprint,
            )
            states[version] = VersionState(READY)
            log.info(
                "model version ready",
                extra={
                    "model": model.name,
                    "version": version,
                    "loaded_from": "validation session" if session is not None else "repository",
                    "execution": "inline" if serving[version].scheduler.inline else "worker",
                    "execution_mode": loaded.execution.mode,
                    "run_us": None if loaded.execution.initial_ns is None
                    else round(loaded.execution.initial_ns / 1000, 1),
                    "threshold_us": round(loaded.execution.threshold_ns / 1000, 1),
                },
            )
            if current is not None:
                self._retire(current)
        # A version that did not come up (a pin, or the policy's choice that failed its
        # checks) does not take down what serves: a refused version disturbs nothing.
        keep = not any(v in serving for v in wanted)
        for version in [v for v in serving if v not in wanted and not keep]:
            self._retire(serving.pop(version))
            states.pop(version, None)
        for version in [v for v in states if v not in wanted and v != "0" and v not in serving]:
            states.pop(version, None)
        if wanted:
            states.pop("0", None)
        self._refresh_latest(model.name)

    async def _unload(self, name: str, reason: str) -> None:
        for model in self._serving.pop(name, {}).values():
            self._retire(model)
        self._states[name] = {
            v: VersionState(UNAVAILABLE, reason) for v in self._states.get(name, {})
        }
        self._refresh_latest(name)

    def _refresh_latest(self, name: str) -> None:
        serving = self._serving.get(name)
        if serving:
            self._latest[name] = serving[max(serving, key=int)]
        else:
            self._latest.pop(name, None)

    def _retire(self, model: ServingModel) -> None:
        task = asyncio.get_running_loop().create_task(self._drain_and_free(model))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        log.info(
            "model version retired",
            extra={"model": model.spec.name, "version": model.spec.version},
        )

    @staticmethod
    async def _drain_and_free(model: ServingModel) -> bool:
        drained = await model.scheduler.drain(timeout=None)
        await asyncio.to_thread(model.scheduler.session.close)  # its memory, off the loop
        return drained

    async def close(self, timeout: float) -> None:
        """Drain every version (used on shutdown)."""
        for name in list(self._serving):
            for model in self._serving.pop(name).values():
                await model.scheduler.drain(timeout)
        self._latest.clear()
        if self._draining:
            await asyncio.wait(self._draining, timeout=timeout)
