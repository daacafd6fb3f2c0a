"""The standard ``grpc.health.v1.Health`` service and server reflection, as
generic tools (grpcurl, Kubernetes and systemd probes) use them, against a
real agent process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.agent_process import AgentProcess
from tests.conftest import EXAMPLE_MODELS, agent_config

TIMEOUT_S = 10.0
INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
MODELS = ("tabular_classifier", "text_features", "all_dtypes")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def channel(example_agent: AgentProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(example_agent.address) as ch:
        yield ch


def _check(channel: grpc.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)


def _reflect(channel: grpc.Channel, *requests: Any) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter(requests), timeout=TIMEOUT_S))


# -- health ---------------------------------------------------------------------


def test_overall_health_serving(channel: grpc.Channel) -> None:
    assert _check(channel, "").status == SERVING
    assert _check(channel, INFERENCE_SERVICE).status == SERVING


@pytest.mark.parametrize("model", MODELS)
def test_per_model_health_serving(channel: grpc.Channel, model: str) -> None:
    assert _check(channel, model).status == SERVING


def test_unknown_name_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _check(channel, "no_such_model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_reports_current_status(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(
        health_pb2.HealthCheckRequest(service="tabular_classifier"), timeout=TIMEOUT_S
    )
    try:
        first = next(iter(call))
    finally:
        call.cancel()
    assert first.status == SERVING

    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=TIMEOUT_S)
    try:
        first = next(iter(unknown))
    finally:
        unknown.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_per_model_health_follows_unload_and_load(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("health_explicit")
    config = agent_config(
        tmp,
        repository={"path": str(EXAMPLE_MODELS), "model_control": "explicit",
                    "startup_models": ["text_features", "tabular_classifier"]},
        control={"enabled": True},  # the load/unload RPCs (unauthenticated here)
        state={"dir": str(tmp / "state")},
        telemetry={"prometheus_address": ""},  # no fixed port shared between agents
    )
    with AgentProcess(config) as agent:
        agent.wait_serving()
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            with grpc.insecure_channel(agent.address) as ch:
                assert _check(ch, "text_features").status == SERVING
                client.unload_model("text_features")
                assert _check(ch, "text_features").status == NOT_SERVING
                assert _check(ch, "tabular_classifier").status == SERVING
                assert _check(ch, "").status == SERVING  # the server itself still serves
                client.load_model("text_features")
                assert _check(ch, "text_features").status == SERVING
        finally:
            client.close()


# -- reflection -------------------------------------------------------------------


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    (reply,) = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert reply.WhichOneof("message_response") == "list_services_response"
    names = {s.name for s in reply.list_services_response.service}
    assert INFERENCE_SERVICE in names
    assert HEALTH_SERVICE in names
    assert REFLECTION_SERVICE in names


def _file_descriptors(reply: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    files = {}
    for blob in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto()
        proto.ParseFromString(blob)
        files[proto.name] = proto
    return files


def test_reflection_describes_inference_service(channel: grpc.Channel) -> None:
    (reply,) = _reflect(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE_SERVICE)
    )
    files = _file_descriptors(reply)
    services = {f"{f.package}.{s.name}": s for f in files.values() for s in f.service}
    assert INFERENCE_SERVICE in services
    methods = {m.name: m for m in services[INFERENCE_SERVICE].method}
    for name in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ):
        assert name in methods, name
    stream = methods["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert methods["ModelInfer"].input_type == ".inference.ModelInferRequest"
    # The service's file and the file it imports (model_config.proto) both come back,
    # so a reflection client can build every message type.
    messages = {f"{f.package}.{m.name}" for f in files.values() for m in f.message_type}
    assert "inference.ModelInferRequest" in messages
    assert "inference.ModelConfig" in messages


def test_reflection_describes_message_and_health(channel: grpc.Channel) -> None:
    replies = _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.ModelInferResponse"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH_SERVICE),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
    )
    assert len(replies) == 3
    infer_files = _file_descriptors(replies[0])
    response = next(
        m
        for f in infer_files.values()
        for m in f.message_type
        if f.package == "inference" and m.name == "ModelInferResponse"
    )
    fields = {f.name: f.number for f in response.field}
    assert fields["raw_output_contents"] == 6
    health_files = _file_descriptors(replies[1])
    assert any(f.package == "grpc.health.v1" for f in health_files.values())
    assert replies[2].WhichOneof("message_response") == "error_response"
    assert replies[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
