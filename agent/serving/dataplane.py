"""The protocol-neutral data plane: what the gRPC servicer (or any other front
end) asks of the agent. It knows models and tensors, not wire formats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import __version__
from agent.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NotPermittedError,
    QueueFullError,
    ServerUnavailableError,
)
from agent.serving.classification import classify
from agent.serving.control_auth import ControlCaller, ControlPolicy
from agent.serving.inference import (
    DecodedRequest,
    InferenceRequest,
    InferenceResponse,
    OutputTensor,
    decode_request,
    wire_output_shape,
)
from agent.serving.model_manager import UNAVAILABLE, ModelManager, ServingModel
from agent.serving.repository import check_model_name, scan_repository_entries
from agent.serving.scheduler import Completed
from agent.serving.shared_memory import RegionStatus, SharedMemoryRegistry
from agent.wire import model_config_pb2 as mc

SERVER_NAME = "edge-agent"
EXTENSIONS = (
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "classification",
    "system_shared_memory",
)


# Failures a client can cause at will with a good model (bad input, its own
# deadline, a flood, going away). Triton's fail statistics count them; a fleet
# probation must not (ModelStats.faults), or one client could roll a good
# version back.
_CLIENT_CAUSED = (InvalidInputError, DeadlineExceededError, QueueFullError,
                  asyncio.CancelledError)


# Called after each successful request, on the event-loop thread; must be cheap
# and never block (drift monitoring samples and queues references, nothing more).
RequestObserver = Callable[[ServingModel, DecodedRequest, Completed], None]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isascii() and version.isdigit() else (-1, version)


class DataPlane:
    def __init__(self, models: ModelManager, explicit_model_control: bool) -> None:
        self.models = models
        self.explicit_model_control = explicit_model_control
        self.accepting = False  # set once start-up loading is done; cleared on drain
        self.observe: RequestObserver | None = None
        self.control = ControlPolicy()  # who may load and unload (default: nobody)
        self.shared_memory = SharedMemoryRegistry(enabled=False)  # server.shared_memory

    # -- health and metadata ----------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.accepting

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.models.is_ready(name, version)

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return SERVER_NAME, __version__, EXTENSIONS

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        model = self.models.resolve(name, version)
        batch = [-1] if model.spec.max_batch_size > 0 else []
        return ModelMetadata(
            name=name,
            versions=self.models.versions(name),
            platform=model.config.platform,
            inputs=[
                TensorMetadata(t.name, t.datatype, (*batch, *t.dims)) for t in model.spec.inputs
            ],
            outputs=[
                TensorMetadata(t.name, t.datatype, (*batch, *t.dims)) for t in model.spec.outputs
            ],
        )

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self.models.resolve(name, version).config

    def statistics(self, name: str = "", version: str = "") -> list[ServingModel]:
        if name:
            if version:
                return [self.models.resolve(name, version)]
            self.models.resolve(name)  # NOT_FOUND / not ready with reasons
            return list(self.models.serving_versions(name).values())
        return self.models.serving()

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        for name, versions in sorted(self.models.states().items()):
            for version, state in sorted(versions.items(), key=lambda kv: int(kv[0])):
                if ready_only and state.state != "READY":
                    continue
                entries.append(
                    IndexEntry(name, "" if version == "0" else version, state.state, state.reason)
                )
        if not ready_only:
            # Version entries that cannot be versions ("²", "01", a dangling symlink).
            for name, problems in sorted(self.models.problems().items()):
                entries.extend(
                    IndexEntry(name, p.version, UNAVAILABLE, p.reason)
                    for p in problems
                    if name and p.version
                )
            entries.sort(key=lambda e: (e.name, _version_order(e.version)))
        return entries

    async def repository_index_with_unloaded(self, ready_only: bool = False) -> list[IndexEntry]:
        """``repository_index``; in explicit mode also the repository's models that are
        not loaded (name only, as Triton lists them), so a client can find what to load."""
        entries = self.repository_index(ready_only)
        if ready_only or not self.explicit_model_control:
            return entries
        try:
            scan = await asyncio.to_thread(scan_repository_entries, self.models.root)
        except OSError:
            return entries
        known = set(self.models.states()) | {e.name for e in entries}
        entries.extend(IndexEntry(name, "", "", "") for name in scan.models if name not in known)
        entries.sort(key=lambda e: (e.name, _version_order(e.version)))
        return entries

    async def load_model(self, name: str, caller: ControlCaller | None = None) -> None:
        self._require_explicit("load")
        self.control.authorize(caller, "load models")
        await self.models.load_model(check_model_name(name))

    async def unload_model(self, name: str, caller: ControlCaller | None = None) -> None:
        self._require_explicit("unload")
        self.control.authorize(caller, "unload models")
        await self.models.unload_model(check_model_name(name))

    def _require_explicit(self, what: str) -> None:
        if not self.explicit_model_control:
            raise NotPermittedError(
                f"cannot {what} models: model control is 'none' "
                "(set repository.model_control = \"explicit\" in the agent config)"
            )

    # -- system shared memory ----------------------------------------------

    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shared_memory.register(name, key, offset, byte_size)

    def shm_unregister(self, name: str) -> None:
        self.shared_memory.unregister(name)

    def shm_status(self, name: str) -> list[RegionStatus]:
        return self.shared_memory.status(name)

    def _read_shared_inputs(self, request: InferenceRequest) -> None:
        for tensor in request.inputs:
            ref = tensor.shm
            if ref is None:
                continue
            if tensor.raw is not None or tensor.typed:
                raise InvalidInputError(
                    f"input '{tensor.name}': data given both in shared memory and in the request"
                )
            tensor.raw = self.shared_memory.read(
                f"input '{tensor.name}'", ref.region, ref.offset, ref.byte_size
            )

    def _finish_outputs(
        self, model: ServingModel, request: InferenceRequest, batch_size: int,
        outputs: list[OutputTensor],
    ) -> list[OutputTensor]:
        """Reshaped outputs to their config dims, classification, shared memory."""
        spec = model.spec
        options = request.output_options or {}
        by_name = {o.name: o for o in spec.outputs}
        done = []
        for out in outputs:
            out.shape = wire_output_shape(spec, out.name, out.shape)
            option = options.get(out.name)
            if option is not None and option.class_count:
                out = classify(
                    out, by_name[out.name], option.class_count, batch_size,
                    spec.max_batch_size > 0,
                )
            if option is not None and option.shm is not None:
                ref = option.shm
                self.shared_memory.write(
                    f"output '{out.name}'", ref.region, ref.offset, ref.byte_size, out.raw
                )
                out = OutputTensor(out.name, out.datatype, out.shape, b"", True)
            done.append(out)
        return done

    # -- inference ---------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if not self.accepting:
            raise ServerUnavailableError(
                "the server is not accepting requests (starting or draining)"
            )
        started = time.perf_counter_ns()
        model = self.models.resolve(request.model_name, request.model_version)
        stats = model.stats
        try:
            if request.shared_memory_inputs:
                self._read_shared_inputs(request)
            decoded = decode_request(model.spec, request)
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise DeadlineExceededError("the request's deadline passed before it was queued")
            done = await model.scheduler.submit(decoded, request.deadline)
            outputs = done.outputs
            if request.output_options or model.spec.reshaped_outputs:
                outputs = self._finish_outputs(model, request, decoded.batch_size, outputs)
        except BaseException as exc:
            stats.record_failure(
                time.perf_counter_ns() - started, not isinstance(exc, _CLIENT_CAUSED)
            )
            raise
        stats.record_success(
            time.perf_counter_ns() - started, done.queue_ns, decoded.batch_size, done.timings
        )
        if self.observe is not None:
            if request.shared_memory_inputs:
                # Drift sampling may keep the feeds: not views of memory the client
                # rewrites and may unregister.
                decoded.feeds = {k: v.copy() for k, v in decoded.feeds.items()}
            self.observe(model, decoded, done)
        return InferenceResponse(
            model.spec.name, model.spec.version, request.request_id, outputs
        )
