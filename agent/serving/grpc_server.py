"""The gRPC front end: KServe v2 / Triton servicer, health and reflection.

The servicer only translates between wire messages and the data plane; every
decision lives in ``agent.serving.dataplane``. Errors map to status codes in
``agent.serving.grpc_status``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.errors import AgentError, InvalidInputError, PermissionDeniedError
from agent.serving.control_auth import ControlCaller
from agent.serving.dataplane import DataPlane
from agent.serving.grpc_status import status_for
from agent.serving.inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    OutputOptions,
    SharedMemoryRef,
)
from agent.serving.model_manager import ServingModel
from agent.wire import grpc_service_pb2 as pb
from agent.wire import grpc_service_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"

# Which InferTensorContents field carries each datatype when sent typed.
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_STREAM_WINDOW = 64  # stream requests in flight at once per stream

_monotonic = time.monotonic
_LOCAL_PEERS = ("unix:", "ipv4:127.", "ipv6:[::1]", "ipv6:[::ffff:127.")


def _int_parameter(what: str, key: str, value: Any) -> int:
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInputError(f"{what}: parameter '{key}' must be an integer")
    number = int(getattr(value, kind))
    if number < 0:
        raise InvalidInputError(f"{what}: parameter '{key}' must be >= 0")
    return number


def _shared_memory_ref(what: str, parameters: Any) -> SharedMemoryRef | None:
    """The tensor's place in shared memory, if its parameters name a region."""
    region = parameters.get("shared_memory_region")
    if region is None:
        return None
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInputError(f"{what}: parameter 'shared_memory_region' must be a string")
    size = parameters.get("shared_memory_byte_size")
    if size is None:
        raise InvalidInputError(
            f"{what}: 'shared_memory_region' needs the parameter 'shared_memory_byte_size'"
        )
    offset = parameters.get("shared_memory_offset")
    return SharedMemoryRef(
        region.string_param,
        0 if offset is None else _int_parameter(what, "shared_memory_offset", offset),
        _int_parameter(what, "shared_memory_byte_size", size),
    )


def _output_options(msg: pb.ModelInferRequest) -> dict[str, OutputOptions] | None:
    options: dict[str, OutputOptions] | None = None
    for out in msg.outputs:
        if not len(out.parameters):
            continue
        what = f"output '{out.name}'"
        count = out.parameters.get("classification")
        if options is None:
            options = {}
        options[out.name] = OutputOptions(
            shm=_shared_memory_ref(what, out.parameters),
            class_count=0 if count is None else _int_parameter(what, "classification", count),
        )
    return options


def request_from_wire(msg: pb.ModelInferRequest, time_remaining: float | None) -> InferenceRequest:
    raw = msg.raw_input_contents
    n_raw = len(raw)
    # raw_input_contents holds one entry per input, or (as tritonclient sends it)
    # one per input that is not in shared memory, in order.
    positional = n_raw == len(msg.inputs)
    next_raw = 0
    in_shm = 0
    inputs = []
    for i, tensor in enumerate(msg.inputs):
        typed = None
        if tensor.HasField("contents"):
            field = _TYPED_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInputError(
                    f"input '{tensor.name}': datatype {tensor.datatype} cannot be sent in "
                    "contents; use raw_input_contents"
                )
            typed = getattr(tensor.contents, field)
        shm = (
            _shared_memory_ref(f"input '{tensor.name}'", tensor.parameters)
            if len(tensor.parameters) else None
        )
        data = None
        if shm is not None:
            in_shm += 1
            if positional and len(raw[i]):
                raise InvalidInputError(
                    f"input '{tensor.name}': data given both in shared memory and in "
                    "raw_input_contents"
                )
        elif positional:
            data = raw[i] if n_raw else None
        elif next_raw < n_raw:
            data = raw[next_raw]
            next_raw += 1
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data,
                                  typed, shm))
        if (n_raw or shm is not None) and typed is not None and len(typed) == 0:
            inputs[-1].typed = None  # an empty contents message carries nothing
    if n_raw and not positional and next_raw + in_shm != len(msg.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {n_raw} entries for {len(msg.inputs)} inputs"
            + (f" ({in_shm} in shared memory)" if in_shm else "")
        )
    outputs = msg.outputs
    return InferenceRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        request_id=msg.id,
        inputs=inputs,
        requested_outputs=[o.name for o in outputs] or None,
        deadline=None if time_remaining is None else _monotonic() + time_remaining,
        output_options=_output_options(msg) if outputs else None,
        shared_memory_inputs=in_shm > 0,
    )


def response_to_wire(response: InferenceResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.request_id,
    )
    add = msg.outputs.add
    for out in response.outputs:
        add(name=out.name, datatype=out.datatype, shape=out.shape)
    msg.raw_output_contents.extend([out.raw for out in response.outputs])
    return msg


def _duration(d: Any) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_wire(model: ServingModel) -> pb.ModelStatistics:
    s = model.stats
    return pb.ModelStatistics(
        name=model.spec.name,
        version=model.spec.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


def control_caller(context: Any) -> ControlCaller:
    """The credentials a control call came with: its 'authorization' metadata and the
    CNs of the client certificate TLS verified (none without mutual TLS)."""
    authorization = tuple(
        value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")
        for key, value in (context.invocation_metadata() or ())
        if key.lower() == "authorization"
    )
    auth = context.auth_context() or {}
    secure = auth.get("transport_security_type") == [b"ssl"]
    cns = tuple(
        cn.decode("utf-8", "replace") for cn in auth.get("x509_common_name", [])
    ) if secure else ()
    return ControlCaller(authorization, cns)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        name, version, extensions = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            meta = self._plane.model_metadata(request.name, request.version)
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        try:
            config = self._plane.model_config(request.name, request.version)
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        try:
            models = self._plane.statistics(request.name, request.version)
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.ModelStatisticsResponse(model_stats=[statistics_to_wire(m) for m in models])

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        Entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                Entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in await self._plane.repository_index_with_unloaded(request.ready)
            ]
        )

    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self._plane.load_model(request.model_name, control_caller(context))
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self._plane.unload_model(request.model_name, control_caller(context))
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        try:
            regions = self._plane.shm_status(request.name)
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        Status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r.name: Status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in regions
            }
        )

    async def SystemSharedMemoryRegister(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        try:
            _require_local(context)
            self._plane.shm_register(
                request.name, request.key, request.offset, request.byte_size
            )
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: Any, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        try:
            _require_local(context)
            self._plane.shm_unregister(request.name)
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return pb.SystemSharedMemoryUnregisterResponse()

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        try:
            response = await self._plane.infer(
                request_from_wire(request, context.time_remaining())
            )
        except AgentError as exc:
            await context.abort(status_for(exc), str(exc))
        return response_to_wire(response)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests on one stream run concurrently (bounded); responses carry the
        # request id so clients match them, as with Triton.
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(_STREAM_WINDOW)
        tasks: set[asyncio.Task[None]] = set()

        async def one(msg: Any) -> None:
            try:
                response = await self._plane.infer(request_from_wire(msg, None))
                await results.put(
                    pb.ModelStreamInferResponse(infer_response=response_to_wire(response))
                )
            except AgentError as exc:
                await results.put(
                    pb.ModelStreamInferResponse(
                        error_message=str(exc),
                        infer_response=pb.ModelInferResponse(
                            model_name=msg.model_name, model_version=msg.model_version, id=msg.id
                        ),
                    )
                )
            finally:
                window.release()

        async def read_all() -> None:
            async for msg in request_iterator:
                await window.acquire()
                task = asyncio.create_task(one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks))
            await results.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def _require_local(context: Any) -> None:
    # Shared memory is only meaningful on this host; a remote peer naming /dev/shm
    # objects could read or overwrite another local program's memory.
    peer = context.peer() or ""
    if not peer.startswith(_LOCAL_PEERS):
        raise PermissionDeniedError(
            f"system shared memory is only for clients on this host (peer {peer})"
        )


@dataclass(slots=True)
class TlsFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class HealthReporter:
    """Keeps grpc.health.v1 statuses in step with the data plane: the overall
    service ("" and the inference service) and one entry per model name."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self.servicer = health.aio.HealthServicer()
        self._known: set[str] = set()

    async def refresh(self) -> None:
        SERVING = health_pb2.HealthCheckResponse.SERVING
        NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = SERVING if self._plane.ready() else NOT_SERVING
        await self.servicer.set("", overall)
        await self.servicer.set(SERVICE_NAME, overall)
        names = set(self._plane.models.states())
        for name in names | self._known:
            ok = name in names and self._plane.model_ready(name)
            await self.servicer.set(name, SERVING if ok else NOT_SERVING)
        self._known = names


def build_server(
    plane: DataPlane,
    health_reporter: HealthReporter,
    addresses: list[str],
    max_message_bytes: int,
    tls: TlsFiles | None,
    max_concurrent_streams: int = 0,
) -> tuple[grpc.aio.Server, list[str]]:
    """Create the server and bind it; returns it with the addresses actually bound."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second agent on the same port must fail, not share
    ]
    if max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_reporter.servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = None
    if tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)],
            root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None,
        )
    bound = []
    for address in addresses:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None and not address.startswith("unix:")
            else server.add_insecure_port(address)
        )
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}")
        bound.append(address if address.startswith("unix:") else _with_port(address, port))
    return server, bound


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host}:{port}"

