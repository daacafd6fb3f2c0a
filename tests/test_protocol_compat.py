"""The wire contract: the agent's generated protobuf code matches proto/, and
its messages, fields and methods match Triton's own client's, number for number.

The agent's modules and tritonclient's both register ``model_config.proto``
and cannot share a process, so each side is read in its own subprocess.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import REPO_ROOT

WIRE_DIR = REPO_ROOT / "agent" / "wire"
SUBPROCESS_TIMEOUT_S = 120

# Run in a subprocess: import the given modules and print, as JSON, every message
# (fields with number, type, label, referenced type and oneof), enum and service.
_DUMP = r"""
import importlib, json, sys

def label(f):
    repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
    return "repeated" if repeated else "optional"

def message(m, out):
    fields = {}
    for f in m.fields:
        ref = f.message_type or f.enum_type
        fields[f.name] = {
            "number": f.number,
            "type": f.type,
            "label": label(f),
            "type_name": ref.full_name if ref is not None else "",
            "oneof": f.containing_oneof.name if f.containing_oneof is not None else "",
        }
    out["messages"][m.full_name] = fields
    for nested in m.nested_types:
        message(nested, out)
    for e in m.enum_types:
        enum(e, out)

def enum(e, out):
    out["enums"][e.full_name] = {v.name: v.number for v in e.values}

out = {"files": {}, "messages": {}, "enums": {}, "services": {}}
for name in sys.argv[1:]:
    d = importlib.import_module(name).DESCRIPTOR
    out["files"][d.name] = {"package": d.package, "module": name}
    for m in d.message_types_by_name.values():
        message(m, out)
    for e in d.enum_types_by_name.values():
        enum(e, out)
    for s in d.services_by_name.values():
        out["services"][s.full_name] = {
            meth.name: {
                "path": f"/{s.full_name}/{meth.name}",
                "input": meth.input_type.full_name,
                "output": meth.output_type.full_name,
                "client_streaming": meth.client_streaming,
                "server_streaming": meth.server_streaming,
            }
            for meth in s.methods
        }
print(json.dumps(out))
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def _dump(*modules: str) -> dict[str, Any]:
    done = _python("-c", _DUMP, *modules)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def agent_wire() -> dict[str, Any]:
    return _dump("agent.wire.model_config_pb2", "agent.wire.grpc_service_pb2")


@pytest.fixture(scope="module")
def triton_wire() -> dict[str, Any]:
    return _dump("tritonclient.grpc.model_config_pb2", "tritonclient.grpc.service_pb2")


# -- (a) generated code is not stale ------------------------------------------------


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    out = tmp_path / "wire"
    out.mkdir()
    done = _python(
        "-c",
        "import sys; from pathlib import Path; from agent.wire.generate import generate; "
        "[print(p.name) for p in generate(Path(sys.argv[1]))]",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    generated = sorted(p.name for p in out.iterdir() if p.is_file())
    assert generated, "generate() wrote nothing"
    assert sorted(done.stdout.split()) == generated
    committed = sorted(p.name for p in WIRE_DIR.iterdir() if p.is_file() and "_pb2" in p.name)
    assert committed == generated, "agent/wire/ has files generate() no longer writes"
    stale = [
        name for name in generated if (out / name).read_bytes() != (WIRE_DIR / name).read_bytes()
    ]
    assert not stale, (
        f"agent/wire/ is stale for {stale}: run `python -m agent.wire.generate` and commit"
    )


# -- (b) field numbers and types are Triton's ----------------------------------------


def test_same_proto_files_and_package(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    assert set(agent_wire["files"]) == {"model_config.proto", "grpc_service.proto"}
    for name, info in agent_wire["files"].items():
        assert name in triton_wire["files"], name
        assert info["package"] == triton_wire["files"][name]["package"] == "inference"


def _field_problems(agent: dict[str, Any], triton: dict[str, Any]) -> list[str]:
    problems = []
    theirs = triton["messages"]
    for message, fields in sorted(agent["messages"].items()):
        if message not in theirs:
            problems.append(f"message {message} is not in Triton's protocol")
            continue
        for field, ours in sorted(fields.items()):
            other = theirs[message].get(field)
            if other is None:
                problems.append(f"{message}.{field} is not a field of Triton's {message}")
            elif ours != other:
                problems.append(f"{message}.{field}: agent {ours} != Triton {other}")
    return problems


def test_every_agent_field_matches_triton(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    problems = _field_problems(agent_wire, triton_wire)
    assert not problems, "\n".join(problems)


def test_field_comparison_catches_drift(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    # The comparison above is only worth something if it notices a change.
    doctored = copy.deepcopy(agent_wire)
    response = doctored["messages"]["inference.ModelInferResponse"]
    response["raw_output_contents"]["number"] = 7
    response["made_up"] = dict(response["id"], number=99)
    doctored["messages"]["inference.ModelInferRequest"]["id"]["type"] = 12  # bytes
    problems = _field_problems(doctored, triton_wire)
    assert len(problems) == 3, problems
    assert any("raw_output_contents" in p for p in problems)
    assert any("made_up" in p for p in problems)
    assert any("ModelInferRequest.id" in p for p in problems)


def test_every_agent_enum_value_matches_triton(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    problems = []
    for enum, values in sorted(agent_wire["enums"].items()):
        other = triton_wire["enums"].get(enum)
        if other is None:
            problems.append(f"enum {enum} is not in Triton's protocol")
            continue
        for name, number in values.items():
            if other.get(name) != number:
                problems.append(f"{enum}.{name} = {number}, Triton: {other.get(name)}")
    assert not problems, "\n".join(problems)


def test_messages_the_client_decodes_are_complete(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    # The fields tritonclient and perf_analyzer read from replies must exist.
    needed = {
        "inference.ModelInferRequest": {
            "model_name",
            "model_version",
            "id",
            "inputs",
            "outputs",
            "raw_input_contents",
        },
        "inference.ModelInferResponse": {
            "model_name",
            "model_version",
            "id",
            "outputs",
            "raw_output_contents",
        },
        "inference.ModelInferResponse.InferOutputTensor": {"name", "datatype", "shape"},
        "inference.ModelMetadataResponse": {"name", "versions", "platform", "inputs", "outputs"},
        "inference.ModelStreamInferResponse": {"error_message", "infer_response"},
        "inference.ModelStatistics": {
            "name",
            "version",
            "last_inference",
            "inference_count",
            "execution_count",
            "inference_stats",
            "batch_stats",
        },
        "inference.ModelConfig": {
            "name",
            "platform",
            "backend",
            "version_policy",
            "max_batch_size",
            "input",
            "output",
            "instance_group",
            "default_model_filename",
            "dynamic_batching",
        },
    }
    for message, fields in needed.items():
        assert message in triton_wire["messages"], message  # the list itself is right
        missing = fields - set(agent_wire["messages"].get(message, {}))
        assert not missing, f"{message} lacks {sorted(missing)}"


def test_service_methods_match_triton(
    agent_wire: dict[str, Any], triton_wire: dict[str, Any]
) -> None:
    service = "inference.GRPCInferenceService"
    assert set(agent_wire["services"]) == {service}
    ours = agent_wire["services"][service]
    theirs = triton_wire["services"][service]
    required = {
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
    }
    assert required <= set(ours), sorted(required - set(ours))
    for name, method in ours.items():
        assert name in theirs, f"{name} is not a Triton method"
        assert method == theirs[name], f"{name}: agent {method} != Triton {theirs[name]}"
    assert ours["ModelInfer"]["path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert ours["ModelStreamInfer"]["client_streaming"]
    assert ours["ModelStreamInfer"]["server_streaming"]
