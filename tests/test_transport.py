"""How clients reach the agent: unix socket, TLS, mutual TLS, large messages,
and a port that is already taken. Real agent processes, real certificates
(from tests/tls_material.py), Triton's own client."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess
from tests.conftest import EXAMPLE_MODELS, agent_config
from tests.tls_material import TlsMaterial

MIB = 1024 * 1024
CLIENT_TIMEOUT_S = 20.0


def _base_sections(tmp: Path) -> dict[str, dict[str, object]]:
    return {
        "repository": {"path": str(EXAMPLE_MODELS)},
        "state": {"dir": str(tmp / "state")},
        "telemetry": {"prometheus_address": ""},  # no fixed port shared between agents
    }


def _start(tmp: Path, server: dict[str, object]) -> AgentProcess:
    sections = _base_sections(tmp)
    config = agent_config(tmp, server=server, **sections)
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
    except BaseException:
        agent.stop()
        raise
    return agent


def _features_input(rows: int = 2) -> grpcclient.InferInput:
    data = np.linspace(-1, 1, rows * 8, dtype=np.float32).reshape(rows, 8)
    tensor = grpcclient.InferInput("features", [rows, 8], "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def _infer_label(client: grpcclient.InferenceServerClient) -> Any:
    result = client.infer(
        "tabular_classifier", [_features_input()], client_timeout=CLIENT_TIMEOUT_S
    )
    return result.as_numpy("label")


# -- unix socket ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    # unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer.
    path = Path(tempfile.mkdtemp(prefix="ea-sock-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_unix_socket_only(short_tmp: Path, tmp_path: Path) -> None:
    sock = short_tmp / "only.sock"
    with _start(tmp_path, {"address": "", "unix_socket": str(sock)}) as agent:
        assert agent.addresses == [f"unix:{sock}"]
        assert sock.is_socket()
        client = grpcclient.InferenceServerClient(f"unix:{sock}")
        try:
            assert client.is_server_ready()
            assert client.is_model_ready("tabular_classifier")
            assert _infer_label(client).shape == (2, 1)
        finally:
            client.close()


def test_tcp_and_unix_socket_together(short_tmp: Path, tmp_path: Path) -> None:
    sock = short_tmp / "both.sock"
    with _start(tmp_path, {"address": "127.0.0.1:0", "unix_socket": str(sock)}) as agent:
        assert len(agent.addresses) == 2
        tcp = next(a for a in agent.addresses if not a.startswith("unix:"))
        assert tcp.startswith("127.0.0.1:") and not tcp.endswith(":0")
        assert f"unix:{sock}" in agent.addresses
        labels = []
        for address in (tcp, f"unix:{sock}"):
            client = grpcclient.InferenceServerClient(address)
            try:
                labels.append(_infer_label(client))
            finally:
                client.close()
        np.testing.assert_array_equal(labels[0], labels[1])


# -- TLS and mutual TLS -----------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA
    rogue_cert: Path  # a client certificate from the unrelated CA
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    tls = TlsMaterial(d / "ca")
    client = tls.client("client-1")
    other = TlsMaterial(d / "unrelated-ca")
    rogue = other.client("rogue")
    return Pki(
        ca=tls.ca_cert,
        server_cert=tls.server_cert,
        server_key=tls.server_key,
        client_cert=client.cert,
        client_key=client.key,
        other_ca=other.ca_cert,
        rogue_cert=rogue.cert,
        rogue_key=rogue.key,
    )


@pytest.fixture(scope="module")
def tls_agent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("tls")
    agent = _start(
        tmp,
        {
            "address": "127.0.0.1:0",
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
        },
    )
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def mtls_agent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("mtls")
    agent = _start(
        tmp,
        {
            "address": "127.0.0.1:0",
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
            "tls_client_ca": str(pki.ca),
        },
    )
    try:
        yield agent
    finally:
        agent.stop()


def _port(agent: AgentProcess) -> int:
    return int(agent.address.rpartition(":")[2])


def _tls_client(
    address: str, root: Path, key: Path | None = None, chain: Path | None = None
) -> Any:
    return grpcclient.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(root),
        private_key=None if key is None else str(key),
        certificate_chain=None if chain is None else str(chain),
    )


def _refused(client: grpcclient.InferenceServerClient) -> InferenceServerException:
    try:
        with pytest.raises(InferenceServerException) as info:
            client.get_server_metadata(client_timeout=CLIENT_TIMEOUT_S)
    finally:
        client.close()
    return info.value


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls(tls_agent: AgentProcess, pki: Pki, host: str) -> None:
    client = _tls_client(f"{host}:{_port(tls_agent)}", pki.ca)
    try:
        assert client.is_server_ready(client_timeout=CLIENT_TIMEOUT_S)
        assert _infer_label(client).shape == (2, 1)
    finally:
        client.close()


def test_tls_refuses_plaintext_and_untrusted_server(tls_agent: AgentProcess, pki: Pki) -> None:
    plain = grpcclient.InferenceServerClient(tls_agent.address)
    assert _refused(plain).status() == "StatusCode.UNAVAILABLE"
    # A client that trusts another CA does not accept the agent's certificate.
    assert _refused(_tls_client(tls_agent.address, pki.other_ca)).status() == (
        "StatusCode.UNAVAILABLE"
    )


def test_mutual_tls(mtls_agent: AgentProcess, pki: Pki) -> None:
    client = _tls_client(mtls_agent.address, pki.ca, pki.client_key, pki.client_cert)
    try:
        assert client.is_server_live(client_timeout=CLIENT_TIMEOUT_S)
        assert _infer_label(client).shape == (2, 1)
    finally:
        client.close()


def test_mutual_tls_refuses_client_without_certificate(mtls_agent: AgentProcess, pki: Pki) -> None:
    error = _refused(_tls_client(mtls_agent.address, pki.ca))
    assert error.status() == "StatusCode.UNAVAILABLE"


def test_mutual_tls_refuses_certificate_from_another_ca(mtls_agent: AgentProcess, pki: Pki) -> None:
    error = _refused(_tls_client(mtls_agent.address, pki.ca, pki.rogue_key, pki.rogue_cert))
    assert error.status() == "StatusCode.UNAVAILABLE"
    # and the agent keeps serving the clients it trusts
    test_mutual_tls(mtls_agent, pki)


# -- message size ------------------------------------------------------------------------


def _all_dtypes_inputs(fp32: Any) -> list[grpcclient.InferInput]:
    small = {
        "bool": ("BOOL", np.ones((1, 1), np.bool_)),
        "int8": ("INT8", np.ones((1, 1), np.int8)),
        "int16": ("INT16", np.ones((1, 1), np.int16)),
        "int32": ("INT32", np.ones((1, 1), np.int32)),
        "int64": ("INT64", np.ones((1, 1), np.int64)),
        "uint8": ("UINT8", np.ones((1, 1), np.uint8)),
        "uint16": ("UINT16", np.ones((1, 1), np.uint16)),
        "uint32": ("UINT32", np.ones((1, 1), np.uint32)),
        "uint64": ("UINT64", np.ones((1, 1), np.uint64)),
        "fp16": ("FP16", np.ones((1, 1), np.float16)),
        "fp32": ("FP32", fp32),
        "fp64": ("FP64", np.ones((1, 1), np.float64)),
        "string": ("BYTES", np.array([["x"]], dtype=np.object_)),
    }
    inputs = []
    for suffix, (datatype, array) in small.items():
        tensor = grpcclient.InferInput(f"in_{suffix}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _big_client(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        address,
        channel_args=[
            ("grpc.max_send_message_length", 256 * MIB),
            ("grpc.max_receive_message_length", 256 * MIB),
        ],
    )


def test_64_mib_tensor_round_trips(example_agent: AgentProcess) -> None:
    rows = 4096
    cols = 64 * MIB // 4 // rows
    big = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    big[0, :4] = [np.nan, np.inf, -0.0, 1e-45]
    assert big.nbytes == 64 * MIB
    client = _big_client(example_agent.address)
    try:
        result = client.infer(
            "all_dtypes",
            _all_dtypes_inputs(big),
            outputs=[grpcclient.InferRequestedOutput("out_fp32")],
            client_timeout=120,
        )
        out = result.as_numpy("out_fp32")
        assert out.shape == big.shape
        assert out.tobytes() == big.tobytes()
    finally:
        client.close()


def test_message_over_the_limit_is_refused(example_agent: AgentProcess) -> None:
    # The default limit (80 MiB) holds a 64 MiB tensor but not a 96 MiB one.
    big = np.zeros((96, MIB // 4), dtype=np.float32)
    client = _big_client(example_agent.address)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("all_dtypes", _all_dtypes_inputs(big), client_timeout=120)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.is_server_ready()  # still serving
        tiny = np.ones((1, 1), np.float32)
        client.infer("all_dtypes", _all_dtypes_inputs(tiny), client_timeout=CLIENT_TIMEOUT_S)
    finally:
        client.close()


def test_configured_message_limit(tmp_path: Path) -> None:
    # A smaller configured limit is enforced on what the agent receives.
    with _start(tmp_path, {"address": "127.0.0.1:0", "max_message_bytes": 1 * MIB}) as agent:
        client = _big_client(agent.address)
        try:
            ok = np.ones((16, 1024), np.float32)  # 64 KiB
            client.infer("all_dtypes", _all_dtypes_inputs(ok), client_timeout=CLIENT_TIMEOUT_S)
            too_big = np.ones((2, MIB // 4), np.float32)  # 2 MiB
            with pytest.raises(InferenceServerException) as info:
                client.infer(
                    "all_dtypes",
                    _all_dtypes_inputs(too_big),
                    outputs=[grpcclient.InferRequestedOutput("out_bool")],  # a tiny reply
                    client_timeout=CLIENT_TIMEOUT_S,
                )
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        finally:
            client.close()


# -- address already in use -------------------------------------------------------------


def _assert_agent_names(agent: AgentProcess, address: str) -> None:
    # The agent's own message (not only gRPC core's log line) names the address.
    own = [line for line in agent.lines if line.startswith("edge-agent:")]
    assert own, agent.log_text()
    assert address in own[-1], own[-1]
    assert "listen" in own[-1] or "in use" in own[-1], own[-1]


def test_second_agent_on_same_port_fails_naming_address(
    example_agent: AgentProcess, tmp_path: Path
) -> None:
    address = example_agent.address
    config = agent_config(tmp_path, server={"address": address}, **_base_sections(tmp_path))
    second = AgentProcess(config)
    try:
        code = second.wait_exit(timeout=60)
    finally:
        second.stop()
    assert code != 0
    _assert_agent_names(second, address)
    assert not second.addresses  # never reported serving
    # the first agent is untouched
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_ready()
    finally:
        client.close()


def test_port_taken_by_another_program(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        config = agent_config(tmp_path, server={"address": address}, **_base_sections(tmp_path))
        agent = AgentProcess(config)
        try:
            code = agent.wait_exit(timeout=60)
        finally:
            agent.stop()
    assert code != 0
    _assert_agent_names(agent, address)
