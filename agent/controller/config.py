"""The controller's configuration: a TOML file and/or flags, defaults for every key.

```toml
[broker]
host = "127.0.0.1"
port = 1883
client_id = ""            # default: edge-controller-<host>-<pid>
tls_ca = ""               # CA that signed the broker certificate ("" = plain TCP)
tls_cert = ""             # the controller's client certificate (CN = controller)
tls_key = ""
tls_server_name = ""
username = ""
password = ""

[fleet]
prefix = "edge"
share_group = "edge-controllers"
max_chunk_bytes = 1048576
max_bytes_per_s = 0       # what one controller sends at most (0: no limit)

[store]
dir = "controller-store"
status_file = ""          # default: <store.dir>/status.json

[deploy]
key = ""                  # deployment private key (PEM)
passphrase_file = ""
expires_in_s = 604800
probation_s = 60

[signing]
trust_dir = "models/keys/trusted"  # model-signing keys that publish verifies against

[groups]                  # deployment groups: device ids, shell patterns, tag:<tag>
canary = ["dev-001", "dev-002"]
plant-a = ["plant-a-*"]
line-3 = ["tag:line-3", "dev-007"]   # devices reporting tag line-3, and dev-007

[rollout]                 # defaults of `deploy --group` (its flags win)
first = "10%"             # first wave: a count or a share of the group
wave_size = ""            # later waves ("" or "rest": the rest in one wave)
soak_s = 60.0
wave_timeout_s = 3600.0
max_error_rate = 0.05     # a number, or "none" (not checked)
max_p99_ms = "none"       # a number, or "none"
max_failed = 0            # failed devices tolerated per wave
halt_on_drift = true
rollback_on_halt = false
lease_ttl_s = 15.0        # a dead driver's rollouts are taken over after this
```
"""

from __future__ import annotations

import copy
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from agent.errors import ConfigError
from agent.mqtt.client import MqttSettings
from agent.protocol.chunks import DEFAULT_MAX_CHUNK_BYTES
from agent.protocol.tags import TAG_BODY
from agent.protocol.topics import check_prefix, check_share_group

DEFAULT_CONTROLLER_CONFIG = Path("/etc/edge-agent/controller.toml")

DEFAULTS: dict[str, dict[str, Any]] = {
    "broker": {
        "host": "127.0.0.1",
        "port": 1883,
        "client_id": "",
        "tls_ca": "",
        "tls_cert": "",
        "tls_key": "",
        "tls_server_name": "",
        "username": "",
        "password": "",
    },
    "fleet": {
        "prefix": "edge",
        "share_group": "edge-controllers",
        "max_chunk_bytes": DEFAULT_MAX_CHUNK_BYTES,
        "max_bytes_per_s": 0,
    },
    "store": {"dir": "controller-store", "status_file": ""},
    "deploy": {"key": "", "passphrase_file": "", "expires_in_s": 7 * 24 * 3600, "probation_s": 60},
    "signing": {"trust_dir": "models/keys/trusted"},
    "groups": {},
    "rollout": {
        "first": "10%",
        "wave_size": "",
        "soak_s": 60.0,
        "wave_timeout_s": 3600.0,
        "max_error_rate": 0.05,
        "max_p99_ms": "none",
        "max_failed": 0,
        "halt_on_drift": True,
        "rollback_on_halt": False,
        "lease_ttl_s": 15.0,
    },
}


_GROUP_MEMBER = "^(tag:" + TAG_BODY + "|[A-Za-z0-9_.*?\\[\\]!-]{1,64})\\Z"  # \Z: no "\n"


def _strings(*names: str) -> dict[str, Any]:
    return {name: {"type": "string"} for name in names}


_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "broker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **_strings(
                    "host",
                    "client_id",
                    "tls_ca",
                    "tls_cert",
                    "tls_key",
                    "tls_server_name",
                    "username",
                    "password",
                ),
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            },
        },
        "fleet": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **_strings("prefix", "share_group"),
                "max_chunk_bytes": {"type": "integer", "minimum": 1024, "maximum": 64 * 2**20},
                "max_bytes_per_s": {"type": "integer", "minimum": 0},
            },
        },
        "store": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"dir": {"type": "string", "minLength": 1}, **_strings("status_file")},
        },
        "deploy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **_strings("key", "passphrase_file"),
                "expires_in_s": {"type": "integer", "minimum": 1},
                "probation_s": {"type": "integer", "minimum": 0},
            },
        },
        "signing": {
            "type": "object",
            "additionalProperties": False,
            "properties": _strings("trust_dir"),
        },
        "groups": {
            "type": "object",
            "propertyNames": {"pattern": r"^[A-Za-z0-9_.-]{1,64}\Z"},
            "additionalProperties": {
                "type": "array",
                # A device id, a shell pattern, or tag:<tag> (devices reporting the tag).
                "items": {
                    "type": "string",
                    "pattern": _GROUP_MEMBER,
                },
            },
        },
        "rollout": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **_strings("first", "wave_size"),
                "soak_s": {"type": "number", "minimum": 0},
                "wave_timeout_s": {"type": "number", "exclusiveMinimum": 0},
                # TOML has no null: "none" turns a threshold off.
                "max_error_rate": {
                    "anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"const": "none"}]
                },
                "max_p99_ms": {
                    "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "none"}]
                },
                "max_failed": {"type": "integer", "minimum": 0},
                "halt_on_drift": {"type": "boolean"},
                "rollback_on_halt": {"type": "boolean"},
                # Renewed every step (about 1 s): well above that, or leases flap.
                "lease_ttl_s": {"type": "number", "minimum": 2, "maximum": 3600},
            },
        },
    },
}


@dataclass(frozen=True)
class RolloutDefaults:
    """``[rollout]``: the plan ``deploy --group`` makes unless flags say otherwise,
    and how rollouts are driven."""

    first: str = "10%"
    wave_size: str | None = None  # None: the rest in one wave
    soak_s: float = 60.0
    wave_timeout_s: float = 3600.0
    max_error_rate: float | None = 0.05
    max_p99_ms: float | None = None
    max_failed: int = 0
    halt_on_drift: bool = True
    rollback_on_halt: bool = False
    lease_ttl_s: float = 15.0


def wave_size_or_rest(text: str | None) -> str | None:
    """``--wave-size`` / ``rollout.wave_size``: "" and "rest" mean the rest in one wave."""
    return None if text is None or text.strip().lower() in ("", "rest") else text


def _rollout_defaults(values: Mapping[str, Any], source: str) -> RolloutDefaults:
    from agent.controller.rollout import RolloutError, parse_size

    wave_size = wave_size_or_rest(values["wave_size"])
    for key, text in (("first", values["first"]), ("wave_size", wave_size)):
        if text is None:
            continue
        try:
            parse_size(text, f"key 'rollout.{key}':")
        except RolloutError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def limit(value: Any) -> float | None:
        return None if value == "none" else float(value)

    return RolloutDefaults(
        first=values["first"],
        wave_size=wave_size,
        soak_s=float(values["soak_s"]),
        wave_timeout_s=float(values["wave_timeout_s"]),
        max_error_rate=limit(values["max_error_rate"]),
        max_p99_ms=limit(values["max_p99_ms"]),
        max_failed=values["max_failed"],
        halt_on_drift=values["halt_on_drift"],
        rollback_on_halt=values["rollback_on_halt"],
        lease_ttl_s=float(values["lease_ttl_s"]),
    )


@dataclass(frozen=True)
class ControllerConfig:
    broker: MqttSettings
    prefix: str
    share_group: str
    max_chunk_bytes: int
    max_bytes_per_s: int
    store_dir: Path
    status_file: Path
    deploy_key: Path | None
    passphrase_file: Path | None
    expires_in_s: int
    probation_s: int
    trust_dir: Path
    source: str
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rollout: RolloutDefaults = field(default_factory=RolloutDefaults)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        schema: Any = error.schema
        instance: Any = error.instance
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        where = f"{path}." if path else ""
        return f"unknown key '{where}{extra[0]}'" if extra else error.message
    return f"key '{path}': {error.message}"


def build_controller_config(
    file_values: Mapping[str, Any], overrides: Mapping[str, Any], source: str
) -> ControllerConfig:
    """Merge the file's values, then flag ``overrides``, over the defaults; validate."""
    validator = jsonschema.Draft202012Validator(_SCHEMA)
    for values, where in ((file_values, source), (overrides, "command line")):
        errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError(f"{where}: {_describe(errors[0])}")
    merged = _merge(_merge(DEFAULTS, file_values), overrides)
    broker = merged["broker"]
    fleet = merged["fleet"]
    try:
        check_prefix(fleet["prefix"])
        check_share_group(fleet["share_group"])
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if bool(broker["tls_cert"]) != bool(broker["tls_key"]):
        raise ConfigError(f"{source}: keys 'broker.tls_cert' and 'broker.tls_key' go together")
    if broker["tls_cert"] and not broker["tls_ca"]:
        raise ConfigError(f"{source}: key 'broker.tls_cert' needs 'broker.tls_ca'")
    client_id = broker["client_id"] or f"edge-controller-{socket.gethostname()}-{os.getpid()}"
    settings = MqttSettings(
        host=broker["host"],
        port=broker["port"],
        client_id=client_id,
        tls_ca=broker["tls_ca"],
        tls_cert=broker["tls_cert"],
        tls_key=broker["tls_key"],
        tls_server_name=broker["tls_server_name"],
        username=broker["username"],
        password=broker["password"],
        # A controller keeps no session: requests for a controller that is gone
        # must go to the others in the share group, not wait in its queue.
        clean_start=True,
        session_expiry_s=0,
        reconnect_min_s=0.5,
        reconnect_max_s=5.0,
    )
    store_dir = Path(merged["store"]["dir"])
    status_file = merged["store"]["status_file"]
    deploy = merged["deploy"]
    return ControllerConfig(
        broker=settings,
        prefix=fleet["prefix"],
        share_group=fleet["share_group"],
        max_chunk_bytes=fleet["max_chunk_bytes"],
        max_bytes_per_s=fleet["max_bytes_per_s"],
        store_dir=store_dir,
        status_file=Path(status_file) if status_file else store_dir / "status.json",
        deploy_key=Path(deploy["key"]) if deploy["key"] else None,
        passphrase_file=Path(deploy["passphrase_file"]) if deploy["passphrase_file"] else None,
        expires_in_s=deploy["expires_in_s"],
        probation_s=deploy["probation_s"],
        trust_dir=Path(merged["signing"]["trust_dir"]),
        source=source,
        groups={name: tuple(members) for name, members in merged["groups"].items()},
        rollout=_rollout_defaults(merged["rollout"], source),
    )


def read_controller_config(
    path: Path | None, overrides: Mapping[str, Any] | None = None
) -> ControllerConfig:
    """Read ``path`` (or the default file if it exists, else only defaults) plus overrides."""
    if path is None and DEFAULT_CONTROLLER_CONFIG.is_file():
        path = DEFAULT_CONTROLLER_CONFIG
    values: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return build_controller_config(values, overrides or {}, source)
