"""The [mqtt] and [fleet] config sections: defaults, validation that names the key."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import build_config
from agent.errors import ConfigError


def test_defaults_leave_mqtt_off_with_documented_values() -> None:
    config = build_config({})
    assert config.mqtt.enabled is False
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.topic_prefix) == (
        "127.0.0.1", 1883, "edge"
    )
    assert config.mqtt.device_id == ""  # the host name at run time
    assert config.fleet.chunk_bytes == 1024 * 1024  # the controller's default max_chunk_bytes
    assert config.fleet.window == 16
    assert config.fleet.probation_s == 60.0
    assert 0 < config.fleet.probation_max_error_rate < 1
    assert config.fleet.keep_versions == 2  # the active version and the one before it
    assert config.fleet.download_timeout_s == 3600.0


def test_a_full_section_is_taken_as_given() -> None:
    config = build_config({
        "mqtt": {"enabled": True, "host": "broker", "port": 8883, "tls_ca": "ca.crt",
                 "tls_cert": "d.crt", "tls_key": "d.key", "device_id": "dev-7",
                 "topic_prefix": "plant/a", "keepalive_s": 10, "session_expiry_s": 0},
        "fleet": {"deployment_trust_dir": "/keys", "chunk_bytes": 65536, "window": 2,
                  "chunk_timeout_s": 0.5, "max_model_bytes": 1 << 20, "probation_s": 0,
                  "probation_max_error_rate": 0.0, "keep_versions": 1,
                  "download_timeout_s": 0.5},
    })
    assert config.mqtt.device_id == "dev-7"
    assert config.mqtt.topic_prefix == "plant/a"
    assert config.fleet.window == 2
    assert config.fleet.probation_s == 0
    assert config.fleet.keep_versions == 1
    assert config.fleet.download_timeout_s == 0.5


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("mqtt", {"port": 0}, "mqtt.port"),
        ("mqtt", {"port": 1883.0}, "mqtt.port"),
        ("mqtt", {"enabled": "yes"}, "mqtt.enabled"),
        ("mqtt", {"device_id": "a/b"}, "mqtt.device_id"),
        ("mqtt", {"device_id": "x" * 65}, "mqtt.device_id"),
        ("mqtt", {"topic_prefix": "edge/#"}, "mqtt.topic_prefix"),
        ("mqtt", {"topic_prefix": "/edge"}, "mqtt.topic_prefix"),
        ("mqtt", {"keepalive_s": 1}, "mqtt.keepalive_s"),
        ("mqtt", {"tls_cert": "c.crt"}, "mqtt.tls_cert"),
        ("mqtt", {"tls_cert": "c.crt", "tls_key": "c.key"}, "mqtt.tls_ca"),
        ("mqtt", {"password": "secret"}, "mqtt.password"),
        ("mqtt", {"hostname": "x"}, "mqtt.hostname"),
        ("fleet", {"chunk_bytes": 100}, "fleet.chunk_bytes"),
        ("fleet", {"window": 0}, "fleet.window"),
        ("fleet", {"chunk_timeout_s": 0}, "fleet.chunk_timeout_s"),
        ("fleet", {"probation_max_error_rate": 1.5}, "fleet.probation_max_error_rate"),
        ("fleet", {"max_model_bytes": 0}, "fleet.max_model_bytes"),
        ("fleet", {"deployment_trust_dir": ""}, "fleet.deployment_trust_dir"),
        ("fleet", {"staging": "/tmp"}, "fleet.staging"),
        ("fleet", {"keep_versions": 0}, "fleet.keep_versions"),
        ("fleet", {"keep_versions": 2.0}, "fleet.keep_versions"),
        ("fleet", {"keep_versions": "2"}, "fleet.keep_versions"),
        ("fleet", {"download_timeout_s": 0}, "fleet.download_timeout_s"),
        ("fleet", {"download_timeout_s": -1.0}, "fleet.download_timeout_s"),
        ("fleet", {"download_timeout_s": float("inf")}, "fleet.download_timeout_s"),
        ("fleet", {"download_timeout_s": "1h"}, "fleet.download_timeout_s"),
        ("fleet", {"max_download_bytes_per_s": -1}, "fleet.max_download_bytes_per_s"),
        ("fleet", {"max_download_bytes_per_s": 1.5e6}, "fleet.max_download_bytes_per_s"),
    ],
)
def test_a_wrong_key_or_value_names_it(section: str, values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build_config({section: values}, "agent.toml")
