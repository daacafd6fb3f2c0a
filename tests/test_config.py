"""The agent's TOML configuration: defaults, validation errors that name the key,
and the command line that reports them.

``agent.config`` is pure (no protobuf modules), so these tests can share a
process with tritonclient.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import DEFAULTS, AgentConfig, build_config
from agent.errors import ConfigError
from tests.agent_process import REPO_ROOT, write_toml

SECTIONS = sorted(DEFAULTS)


def _as_config_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# -- defaults ------------------------------------------------------------------


def test_no_config_gives_the_embedded_defaults() -> None:
    config = build_config({})
    assert config.source == "<defaults>"
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        assert set(values) == set(DEFAULTS[section]), section
        for key, default in DEFAULTS[section].items():
            assert getattr(getattr(config, section), key) == _as_config_value(default), (
                f"{section}.{key}"
            )


def test_every_section_of_the_config_has_defaults() -> None:
    sections = {f.name for f in dataclasses.fields(AgentConfig)} - {"source"}
    assert sections == set(DEFAULTS)


def test_defaults_are_the_documented_ones() -> None:
    config = build_config({})
    assert config.server.address == "127.0.0.1:8001"  # Triton's gRPC port, loopback only
    assert config.server.max_message_bytes > 64 * 2**20  # a 64 MiB tensor fits
    assert config.signing.allow_unsigned_models is False  # secure by default
    assert config.repository.model_control == "none"
    assert config.runtime.execution_providers == ("CPUExecutionProvider",)
    assert config.runtime.default_instance_count == 0  # decided from the CPUs at start
    assert config.runtime.execution == "auto"
    assert config.runtime.default_max_queue_size >= 1


@pytest.mark.parametrize(
    ("section", "key"), [(s, k) for s in SECTIONS for k in DEFAULTS[s]]
)
def test_each_default_is_itself_a_valid_setting(section: str, key: str) -> None:
    # Writing the default explicitly must be accepted and change nothing.
    overrides: dict[str, Any] = {section: {key: DEFAULTS[section][key]}}
    assert build_config(overrides) == build_config({})


def test_overrides_are_applied_and_other_keys_keep_defaults() -> None:
    config = build_config(
        {
            "server": {"address": "0.0.0.0:9001", "drain_timeout_s": 2},
            "runtime": {"intra_op_threads": 2, "execution_providers": ["CPUExecutionProvider"]},
            "repository": {"model_control": "explicit", "startup_models": ["a", "b"]},
        },
        source="/etc/edge-agent/agent.toml",
    )
    assert config.server.address == "0.0.0.0:9001"
    assert config.server.drain_timeout_s == 2
    assert config.server.max_message_bytes == DEFAULTS["server"]["max_message_bytes"]
    assert config.runtime.intra_op_threads == 2
    assert config.repository.startup_models == ("a", "b")
    assert config.source == "/etc/edge-agent/agent.toml"


def test_build_config_does_not_modify_defaults_or_input() -> None:
    before = repr(DEFAULTS)
    overrides = {"repository": {"startup_models": ["m"]}}
    build_config(overrides)
    assert repr(DEFAULTS) == before
    assert overrides == {"repository": {"startup_models": ["m"]}}


def test_unix_socket_alone_is_enough() -> None:
    config = build_config({"server": {"address": "", "unix_socket": "/run/edge-agent.sock"}})
    assert config.server.address == ""
    assert config.server.unix_socket == "/run/edge-agent.sock"


def test_tls_settings_together_are_accepted() -> None:
    config = build_config(
        {"server": {"tls_cert": "c.pem", "tls_key": "k.pem", "tls_client_ca": "ca.pem"}}
    )
    assert (config.server.tls_cert, config.server.tls_key) == ("c.pem", "k.pem")


# -- wrong keys and values ----------------------------------------------------------

WRONG: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown section", {"sever": {"address": "x"}}, ["unknown key 'sever'"]),
    ("unknown key", {"server": {"adress": "127.0.0.1:1"}}, ["unknown key 'server.adress'"]),
    ("unknown key in another section", {"runtime": {"threads": 2}},
     ["unknown key 'runtime.threads'"]),
    ("section not a table", {"server": 5}, ["'server'", "object"]),
    ("wrong type: string for integer", {"server": {"max_message_bytes": "big"}},
     ["'server.max_message_bytes'", "integer"]),
    ("wrong type: bool for integer", {"runtime": {"intra_op_threads": True}},
     ["'runtime.intra_op_threads'"]),
    ("wrong type: float for integer", {"runtime": {"intra_op_threads": 2.0}},
     ["'runtime.intra_op_threads'"]),
    ("wrong type: float for integer count", {"runtime": {"default_instance_count": 1.0}},
     ["'runtime.default_instance_count'"]),
    ("wrong type: string for boolean", {"signing": {"allow_unsigned_models": "yes"}},
     ["'signing.allow_unsigned_models'", "boolean"]),
    ("wrong type: list item", {"repository": {"startup_models": ["a", 3]}},
     ["'repository.startup_models.1'"]),
    ("below minimum", {"server": {"max_message_bytes": 10}}, ["'server.max_message_bytes'"]),
    ("negative", {"server": {"drain_timeout_s": -1}}, ["'server.drain_timeout_s'"]),
    ("negative instances", {"runtime": {"default_instance_count": -1}},
     ["'runtime.default_instance_count'"]),
    ("bad execution", {"runtime": {"execution": "gpu"}}, ["'runtime.execution'"]),
    ("zero queue", {"runtime": {"default_max_queue_size": 0}},
     ["'runtime.default_max_queue_size'"]),
    ("no providers", {"runtime": {"execution_providers": []}},
     ["'runtime.execution_providers'"]),
    ("empty repository path", {"repository": {"path": ""}}, ["'repository.path'"]),
    ("empty state dir", {"state": {"dir": ""}}, ["'state.dir'"]),
    ("bad enum: optimisation", {"runtime": {"graph_optimization": "max"}},
     ["'runtime.graph_optimization'", "'max'", "'all'", "'basic'"]),
    ("bad enum: model control", {"repository": {"model_control": "poll"}},
     ["'repository.model_control'", "'poll'", "'explicit'"]),
    ("bad enum: log level", {"logging": {"level": "verbose"}},
     ["'logging.level'", "'verbose'", "'debug'"]),
    ("bad enum: log format", {"logging": {"format": "xml"}}, ["'logging.format'", "'xml'"]),
    ("address without port", {"server": {"address": "localhost"}},
     ["'server.address'", "'localhost'", "HOST:PORT"]),
    ("address without host", {"server": {"address": ":8001"}}, ["'server.address'"]),
    ("address port not a number", {"server": {"address": "127.0.0.1:http"}},
     ["'server.address'"]),
    ("address port out of range", {"server": {"address": "127.0.0.1:65536"}},
     ["'server.address'", "65536"]),
    ("address not a string", {"server": {"address": 8001}}, ["'server.address'"]),
    ("no listener at all", {"server": {"address": "", "unix_socket": ""}},
     ["'server.address'", "'server.unix_socket'"]),
    ("tls_cert without tls_key", {"server": {"tls_cert": "c.pem"}},
     ["'server.tls_cert'", "'server.tls_key'"]),
    ("tls_key without tls_cert", {"server": {"tls_key": "k.pem"}},
     ["'server.tls_cert'", "'server.tls_key'"]),
    ("client CA without a server certificate", {"server": {"tls_client_ca": "ca.pem"}},
     ["'server.tls_client_ca'", "'server.tls_cert'"]),
]


@pytest.mark.parametrize(("label", "overrides", "fragments"), WRONG, ids=[w[0] for w in WRONG])
def test_wrong_setting_is_rejected_naming_the_key(
    label: str, overrides: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(overrides, source="agent.toml")
    message = str(info.value)
    assert message.startswith("agent.toml: "), message
    for fragment in fragments:
        assert fragment in message, f"{label}: {fragment!r} not in {message!r}"


def test_first_of_several_errors_is_reported_deterministically() -> None:
    overrides = {"server": {"zzz": 1, "aaa": 2}, "logging": {"level": "loud"}}
    messages = set()
    for _ in range(3):
        with pytest.raises(ConfigError) as info:
            build_config(overrides)
        messages.add(str(info.value))
    assert len(messages) == 1
    message = messages.pop()
    assert "'logging.level'" in message or "unknown key 'server.aaa'" in message, message


def test_several_unknown_keys_in_a_table_name_one_of_them() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'server\.aaa'"):
        build_config({"server": {"zzz": 1, "aaa": 2}})


# -- property: unknown keys are always named --------------------------------------

_key_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=24,
)
_values = st.one_of(
    st.integers(), st.booleans(), st.text(max_size=10), st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=2),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    section=st.sampled_from(SECTIONS),
    key=_key_text,
    value=_values,
    keep_valid=st.booleans(),
)
def test_random_unknown_key_in_a_section_is_rejected_by_name(
    section: str, key: str, value: Any, keep_valid: bool
) -> None:
    if key in DEFAULTS[section]:
        key = key + "_x"
    table: dict[str, Any] = {key: value}
    if keep_valid:
        # Valid neighbours do not hide the unknown key.
        table.update({k: v for k, v in list(DEFAULTS[section].items())[:2]})
    with pytest.raises(ConfigError) as info:
        build_config({section: table})
    assert f"unknown key '{section}.{key}'" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(key=_key_text, value=_values)
def test_random_unknown_top_level_key_is_rejected_by_name(key: str, value: Any) -> None:
    if key in DEFAULTS:
        key = key + "_x"
    with pytest.raises(ConfigError) as info:
        build_config({key: value})
    assert f"unknown key '{key}'" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(
    intra=st.integers(min_value=0, max_value=1024),
    instances=st.integers(min_value=1, max_value=256),
    port=st.integers(min_value=0, max_value=65535),
)
def test_random_valid_values_are_accepted_as_given(intra: int, instances: int, port: int) -> None:
    config = build_config(
        {
            "server": {"address": f"127.0.0.1:{port}"},
            "runtime": {"intra_op_threads": intra, "default_instance_count": instances},
        }
    )
    assert config.server.address == f"127.0.0.1:{port}"
    assert config.runtime.intra_op_threads == intra
    assert config.runtime.default_instance_count == instances


@settings(max_examples=200, deadline=None)
@given(value=st.integers().filter(lambda v: not 0 <= v <= 256))
def test_out_of_range_instance_counts_are_rejected(value: int) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.default_instance_count"):
        build_config({"runtime": {"default_instance_count": value}})


# -- the command line ----------------------------------------------------------------

CLI_TIMEOUT_S = 60


def run_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def _bad_config(tmp_path: Path, section: str, values: dict[str, Any]) -> Path:
    # Should validation ever let it through, it would listen on a free port, not 8001.
    config: dict[str, dict[str, Any]] = {"server": {"address": "127.0.0.1:0"}}
    config.setdefault(section, {}).update(values)
    return write_toml(tmp_path / "agent.toml", config)


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("server", {"adress": "127.0.0.1:1"}, "server.adress"),
        ("runtime", {"graph_optimization": "max"}, "runtime.graph_optimization"),
        ("server", {"tls_cert": "cert.pem"}, "server.tls_key"),
        ("repository", {"model_control": 1}, "repository.model_control"),
    ],
)
def test_serve_with_a_bad_config_exits_2_naming_the_key(
    tmp_path: Path, section: str, values: dict[str, Any], named: str
) -> None:
    path = _bad_config(tmp_path, section, values)
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_invalid_toml_exits_2_naming_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[server]\naddress = "127.0.0.1:0"\nmax_message_bytes = = 5\n')
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "not valid TOML" in result.stderr
    assert "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "does not exist" in result.stderr


def test_serve_with_a_bad_address_flag_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "agent.toml", {"server": {"address": "127.0.0.1:0"}})
    result = run_cli("serve", "--config", str(path), "--address", "nohost")
    assert result.returncode == 2, result.stderr
    assert "server.address" in result.stderr and "'nohost'" in result.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0", "drain_timeout_s": 1.5},
            "runtime": {"intra_op_threads": 1, "graph_optimization": "basic"},
            "logging": {"level": "debug", "format": "logfmt"},
        },
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK {path}"


def test_check_config_rejects_a_bad_file_naming_the_key(tmp_path: Path) -> None:
    path = _bad_config(tmp_path, "logging", {"level": "chatty"})
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "logging.level" in result.stderr and "'chatty'" in result.stderr
    assert result.stdout == ""


def test_check_config_rejects_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[server\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr and str(path) in result.stderr
