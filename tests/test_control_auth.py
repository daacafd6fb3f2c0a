"""The repository control RPCs are opt-in and can require a bearer token or a
client certificate. Real agent processes, Triton's own client, real TLS
material (tests/tls_material.py); the config checks run in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from agent.config import build_config
from agent.errors import ConfigError
from agent.serving.control_auth import control_policy
from tests.agent_process import AgentProcess, start_serving, write_toml
from tests.serving_models import make_repository, scale_and_echo_model, serving_config
from tests.tls_material import TlsMaterial

TIMEOUT_S = 20.0
TOKEN = "3f9c2a7d41e8b6055c1d9e0a7b2f4c68"
MODEL = "scaler"


def _start(tmp: Path, **sections: Any) -> AgentProcess:
    repo = tmp / "models"
    if not repo.exists():
        make_repository(repo, {MODEL: (scale_and_echo_model(), None)})
    config = serving_config(tmp, repo, **sections)
    config["repository"]["model_control"] = "explicit"
    config["repository"]["startup_models"] = [MODEL]  # explicit control loads none by default
    return start_serving(write_toml(tmp / "agent.toml", config))


def _error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def _infer(client: grpcclient.InferenceServerClient) -> None:
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    tag = grpcclient.InferInput("tag", [1, 1], "BYTES")
    tag.set_data_from_numpy(np.array([[b"t"]], dtype=np.object_))
    result = client.infer(MODEL, [x, tag], client_timeout=TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("y"), [[2.0] * 4])


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- control off ---------------------------------------------------------------------


def test_control_rpcs_are_off_by_default_even_in_explicit_mode(tmp_path: Path) -> None:
    with _start(tmp_path) as agent:
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            for call in (lambda: client.unload_model(MODEL, client_timeout=TIMEOUT_S),
                         lambda: client.load_model(MODEL, client_timeout=TIMEOUT_S)):
                error = _error(call)
                assert error.status() == "StatusCode.PERMISSION_DENIED"
                assert "control.enabled = true" in str(error.message())
            assert client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
            _infer(client)  # serving is not control
        finally:
            client.close()


# -- bearer token ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("token")
    token_file = tmp / "control.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    agent = _start(tmp, control={"enabled": True, "token_file": str(token_file)})
    try:
        yield agent
    finally:
        agent.stop()


def test_unload_refused_without_a_token(token_agent: AgentProcess) -> None:
    client = grpcclient.InferenceServerClient(token_agent.address)
    try:
        error = _error(lambda: client.unload_model(MODEL, client_timeout=TIMEOUT_S))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
        assert "authorization: Bearer" in str(error.message())
        for headers in (_bearer(TOKEN[:-1] + "0"), _bearer(""), {"authorization": TOKEN},
                        {"authorization": f"Basic {TOKEN}"}):
            with pytest.raises(InferenceServerException) as info:
                client.unload_model(MODEL, headers=headers, client_timeout=TIMEOUT_S)
            error = info.value
            assert error.status() == "StatusCode.UNAUTHENTICATED", headers
        assert client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        _infer(client)  # inference needs no token
    finally:
        client.close()


def test_unload_and_load_allowed_with_the_token(token_agent: AgentProcess) -> None:
    client = grpcclient.InferenceServerClient(token_agent.address)
    try:
        client.unload_model(MODEL, headers=_bearer(TOKEN), client_timeout=TIMEOUT_S)
        assert not client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        error = _error(lambda: client.load_model(MODEL, client_timeout=TIMEOUT_S))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
        assert not client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        client.load_model(MODEL, headers={"authorization": f"bearer {TOKEN}"},
                          client_timeout=TIMEOUT_S)
        assert client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        _infer(client)
    finally:
        client.close()


# -- mutual TLS ------------------------------------------------------------------------


def test_client_certificate_with_allowed_cn(tmp_path: Path) -> None:
    tls = TlsMaterial(tmp_path / "pki")
    operator, reader = tls.client("operator"), tls.client("reader")
    server = {"tls_cert": str(tls.server_cert), "tls_key": str(tls.server_key),
              "tls_client_ca": str(tls.ca_cert)}
    control = {"enabled": True, "client_cns": ["operator"]}
    with _start(tmp_path, server=server, control=control) as agent:

        def client_for(cert: Any) -> grpcclient.InferenceServerClient:
            return grpcclient.InferenceServerClient(
                agent.address, ssl=True, root_certificates=str(tls.ca_cert),
                private_key=str(cert.key), certificate_chain=str(cert.cert),
            )

        denied = client_for(reader)
        try:
            _infer(denied)
            error = _error(lambda: denied.unload_model(MODEL, client_timeout=TIMEOUT_S))
            assert error.status() == "StatusCode.PERMISSION_DENIED"
            assert "reader" in str(error.message()) and "control.client_cns" in str(
                error.message()
            )
            assert denied.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        finally:
            denied.close()
        allowed = client_for(operator)
        try:
            allowed.unload_model(MODEL, client_timeout=TIMEOUT_S)
            assert not allowed.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
            allowed.load_model(MODEL, client_timeout=TIMEOUT_S)
            _infer(allowed)
        finally:
            allowed.close()


# -- config checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"control": {"enabled": "yes"}}, "control.enabled"),
        ({"control": {"tokenfile": "x"}}, "control.tokenfile"),
        ({"control": {"client_cns": ["a", "a"]}}, "control.client_cns"),
        ({"repository": {"model_control": "explicit"}, "control": {"client_cns": ["a"]}},
         "'control.client_cns' needs 'server.tls_client_ca'"),
        ({"repository": {"model_control": "explicit"},
          "control": {"require_client_cert": True}},
         "'control.require_client_cert' needs 'server.tls_client_ca'"),
        ({"control": {"enabled": True}}, "'control.enabled' needs 'repository.model_control'"),
    ],
)
def test_config_errors_name_the_key(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build_config(overrides, "agent.toml")


def test_token_file_must_be_readable_and_long_enough(tmp_path: Path) -> None:
    def policy(path: Path) -> object:
        return control_policy(build_config(
            {"repository": {"model_control": "explicit"},
             "control": {"enabled": True, "token_file": str(path)}}, "agent.toml"))

    with pytest.raises(ConfigError, match=r"control\.token_file.*cannot read"):
        policy(tmp_path / "absent")
    short = tmp_path / "short"
    short.write_text("secret\n")
    with pytest.raises(ConfigError, match=r"control\.token_file.*at least 16"):
        policy(short)
    good = tmp_path / "good"
    good.write_text(TOKEN)
    policy(good)


def test_bad_token_file_stops_start_up(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "models", {MODEL: (scale_and_echo_model(), None)})
    config = serving_config(tmp_path, repo, control={"enabled": True,
                                                     "token_file": str(tmp_path / "absent")})
    config["repository"]["model_control"] = "explicit"
    agent = AgentProcess(write_toml(tmp_path / "agent.toml", config))
    try:
        assert agent.wait_exit(TIMEOUT_S) != 0
        assert "control.token_file" in agent.log_text()
    finally:
        agent.stop()
