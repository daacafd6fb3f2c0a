"""The agent's configuration: defaults for every key, validation with named errors.

Pure: takes the already-parsed TOML mapping (``tomllib``) and returns a frozen
``AgentConfig``. Validation uses a JSON Schema so that every wrong key or value
is reported with its dotted path. A config that passes a small check of the
schema's keywords here (``_plainly_valid``) is valid; only one that does not is
handed to ``jsonschema`` (imported then: several megabytes a serving agent that
starts with a good config does not need) to find and name the error.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id
from agent.protocol.tags import MAX_TAGS, TAG_PATTERN, is_tag

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
MIB = 1024 * 1024
# On SIGTERM, after the drain (server.drain_timeout_s): what the stop hooks
# (telemetry flush, offline state) get in all. systemd's TimeoutStopSec must
# exceed the two together.
STOP_HOOKS_TIMEOUT_S = 5.0

# The embedded defaults: `edge-agent serve` with no config file at all serves
# the example repository in ./models on Triton's port, trusting the demo key.
DEFAULTS: dict[str, Any] = {
    "server": {
        "address": "127.0.0.1:8001",
        "unix_socket": "",
        "max_message_bytes": 80 * MIB,  # a 64 MiB tensor plus protocol overhead
        "tls_cert": "",
        "tls_key": "",
        "tls_client_ca": "",  # set to require client certificates (mutual TLS)
        "drain_timeout_s": 10.0,  # SIGTERM: how long in-flight requests may take to finish
        # Watchdog: an inference run going longer than this counts as stuck and
        # stops the systemd watchdog pings (0: never).
        "stall_timeout_s": 60.0,
        "max_concurrent_streams": 0,  # 0: unlimited
        # "system": local clients may register POSIX shared-memory regions (/dev/shm)
        # for tensors (Triton's system shared memory extension); "off": refused.
        "shared_memory": "off",
    },
    "repository": {
        "path": "models",
        "model_control": "none",  # "none" or "explicit" (enables load/unload RPCs)
        "startup_models": [],  # with explicit control: models to load at start ([]: none)
    },
    # The repository control RPCs (RepositoryModelLoad / RepositoryModelUnload), apart
    # from serving: off unless enabled (and repository.model_control = "explicit").
    "control": {
        "enabled": False,
        "token_file": "",  # a file holding a bearer token callers must send ("": none)
        "require_client_cert": False,  # a mutual-TLS client certificate (server.tls_client_ca)
        "client_cns": [],  # only these client certificate subject CNs ([]: any)
    },
    "signing": {
        "trust_dir": "models/keys/trusted",
        "allow_unsigned_models": False,
    },
    "runtime": {
        # 0 (both): decided from the cores: min(cores, 4) instances per model, and
        # cores / instances threads per run (one per run on 2 cores, as raw
        # onnxruntime is fastest there under concurrency).
        "intra_op_threads": 0,
        "inter_op_threads": 0,
        "graph_optimization": "all",  # disable | basic | extended | all
        "execution_providers": ["CPUExecutionProvider"],
        "default_instance_count": 0,
        "default_max_queue_size": 1024,
        "max_instance_count": 0,  # per model (threads); 0: 4 per CPU, at least 8
        # Where runs happen: "worker" threads, "inline" on the event loop, or "auto":
        # inline while a model's runs are shorter than a thread hop (per model:
        # config.pbtxt parameters { key: "execution" value { string_value: ... } }).
        "execution": "auto",
        "inline_threshold_us": 0,  # auto: the run time below which inline; 0: measured hop
    },
    "state": {
        "dir": "state",
    },
    "mqtt": {
        "enabled": False,  # the fleet plane; the agent serves gRPC either way
        "host": "127.0.0.1",
        "port": 1883,
        "tls_ca": "",  # CA bundle of the broker's certificate; "" = plain TCP
        "tls_cert": "",  # client certificate (mutual TLS: the device identity)
        "tls_key": "",
        "tls_server_name": "",  # check this name in the broker certificate instead of host
        "username": "",
        "password": "",
        "device_id": "",  # "": the host name
        "topic_prefix": "edge",
        "keepalive_s": 30,
        "session_expiry_s": 7 * 24 * 3600,  # QoS 1 messages wait this long at the broker
        "reconnect_max_s": 30.0,
    },
    "fleet": {
        # Public keys allowed to sign deployments (not the model-signing keys).
        "deployment_trust_dir": "/etc/edge-agent/deployment-keys",
        # 1 MiB (the controller's default max_chunk_bytes) with 16 in flight: about
        # half of mosquitto's raw loopback throughput on 2 CPUs, 256 KiB x 8 about a
        # third (tests/bench/bench_fleet.py); per-message overhead dominates below.
        "chunk_bytes": 1024 * 1024,
        "window": 16,  # chunk requests in flight
        "chunk_timeout_s": 10.0,
        "chunk_retries": 8,  # per chunk, while connected, before the job fails
        # The whole transfer of one job (per agent run, broker outages included):
        # slow or silent controllers end the job instead of keeping it forever.
        "download_timeout_s": 3600.0,
        # Cap on the download rate (0: none). Receiving costs CPU that serving also
        # wants; a cap trades update time for serving latency during downloads.
        "max_download_bytes_per_s": 0,
        "max_model_bytes": 4 * 1024 * MIB,
        "max_clock_skew_s": 300.0,
        "probation_s": 60.0,  # a deployment's probation_s overrides it
        "probation_max_error_rate": 0.05,
        "probation_min_requests": 20,  # fewer requests than this never fail probation
        "max_start_attempts": 3,  # restarts in one activation/probation before giving up
        # Version directories a model keeps after a successful update: the active one
        # and the keep_versions - 1 highest below it (2: the previous one stays).
        "keep_versions": 2,
        # Labels this device reports (reported state "tags") for controllers to group by.
        "tags": [],
    },
    "telemetry": {
        "health_interval_s": 30.0,  # edge.health messages
        "drift_window_s": 300.0,  # one edge.drift message per window
        "sample_rate": 0.1,  # share of requests whose tensors feed drift monitoring (0: off)
        "sample_queue": 1024,  # sampled requests waiting for the drift thread; more are dropped
        # The store-and-forward outbox (SQLite in the state directory).
        "outbox_max_messages": 10_000,
        "outbox_max_bytes": 64 * MIB,
        "outbox_max_age_s": 7 * 24 * 3600.0,
        "prometheus_address": "127.0.0.1:9464",  # "" = no Prometheus endpoint
        # [warn, drift] per metric ([] = report, never flag); min_samples per window.
        "thresholds": {
            "psi": [0.1, 0.2],
            "js": [0.1, 0.2],
            "ks": [0.1, 0.2],
            "wasserstein": [0.1, 0.2],  # W1 / reference std
            "missing_rate": [0.05, 0.1],  # increase over the reference's missing rate
            "out_of_range": [0.05, 0.1],
            "min_samples": 500,
        },
        "model_thresholds": {},  # model name -> overrides of "thresholds"
    },
    "logging": {
        "level": "info",
        "format": "json",  # json | logfmt
    },
}

_BAND = {"type": "array", "items": {"type": "number", "minimum": 0}, "maxItems": 2}
_DRIFT_THRESHOLDS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{m: _BAND for m in ("psi", "js", "ks", "wasserstein", "missing_rate", "out_of_range")},
        "min_samples": {"type": "integer", "minimum": 1},
    },
}

_SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {"drift_thresholds": _DRIFT_THRESHOLDS},
    "additionalProperties": False,
    "properties": {
        "server": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "address": {"type": "string"},
                "unix_socket": {"type": "string"},
                "max_message_bytes": {"type": "integer", "minimum": 4096, "maximum": 2**31 - 1},
                "tls_cert": {"type": "string"},
                "tls_key": {"type": "string"},
                "tls_client_ca": {"type": "string"},
                "drain_timeout_s": {"type": "number", "minimum": 0, "maximum": 3600},
                "stall_timeout_s": {"type": "number", "minimum": 0, "maximum": 86400},
                "max_concurrent_streams": {"type": "integer", "minimum": 0},
                "shared_memory": {"enum": ["off", "system"]},
            },
        },
        "repository": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "model_control": {"enum": ["none", "explicit"]},
                "startup_models": {"type": "array", "items": {"type": "string"}},
            },
        },
        "control": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "token_file": {"type": "string"},
                "require_client_cert": {"type": "boolean"},
                "client_cns": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "minLength": 1, "maxLength": 64},
                },
            },
        },
        "signing": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "trust_dir": {"type": "string"},
                "allow_unsigned_models": {"type": "boolean"},
            },
        },
        "runtime": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "intra_op_threads": {"type": "integer", "minimum": 0, "maximum": 1024},
                "inter_op_threads": {"type": "integer", "minimum": 0, "maximum": 1024},
                "graph_optimization": {"enum": ["disable", "basic", "extended", "all"]},
                "execution_providers": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                },
                "default_instance_count": {"type": "integer", "minimum": 0, "maximum": 256},
                "default_max_queue_size": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "max_instance_count": {"type": "integer", "minimum": 0, "maximum": 1024},
                "execution": {"enum": ["auto", "inline", "worker"]},
                "inline_threshold_us": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            },
        },
        "state": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"dir": {"type": "string", "minLength": 1}},
        },
        "mqtt": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "host": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "tls_ca": {"type": "string"},
                "tls_cert": {"type": "string"},
                "tls_key": {"type": "string"},
                "tls_server_name": {"type": "string"},
                "username": {"type": "string"},
                "password": {"type": "string"},
                # \Z, not $: jsonschema searches, and '$' accepts a trailing newline.
                "device_id": {"type": "string", "pattern": r"^([A-Za-z0-9_.-]{1,64})?\Z"},
                "topic_prefix": {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z",
                },
                "keepalive_s": {"type": "integer", "minimum": 5, "maximum": 65535},
                "session_expiry_s": {"type": "integer", "minimum": 0, "maximum": 4294967295},
                "reconnect_max_s": {"type": "number", "minimum": 1, "maximum": 3600},
            },
        },
        "fleet": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "deployment_trust_dir": {"type": "string", "minLength": 1},
                "chunk_bytes": {"type": "integer", "minimum": 1024, "maximum": 16 * MIB},
                "window": {"type": "integer", "minimum": 1, "maximum": 256},
                "chunk_timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                "chunk_retries": {"type": "integer", "minimum": 0, "maximum": 1000},
                "download_timeout_s": {
                    "type": "number", "exclusiveMinimum": 0, "maximum": 30 * 86400
                },
                "max_download_bytes_per_s": {"type": "integer", "minimum": 0},
                "max_model_bytes": {"type": "integer", "minimum": 1, "maximum": 2**48},
                "max_clock_skew_s": {"type": "number", "minimum": 0, "maximum": 86400},
                "probation_s": {"type": "number", "minimum": 0, "maximum": 7 * 24 * 3600},
                "probation_max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                "probation_min_requests": {"type": "integer", "minimum": 1},
                "max_start_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                "keep_versions": {"type": "integer", "minimum": 1},
                "tags": {
                    "type": "array",
                    "maxItems": MAX_TAGS,
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": TAG_PATTERN},
                },
            },
        },
        "telemetry": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "health_interval_s": {"type": "number", "minimum": 0.1, "maximum": 86400},
                "drift_window_s": {"type": "number", "minimum": 0.1, "maximum": 7 * 86400},
                "sample_rate": {"type": "number", "minimum": 0, "maximum": 1},
                "sample_queue": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "outbox_max_messages": {"type": "integer", "minimum": 1, "maximum": 10_000_000},
                "outbox_max_bytes": {"type": "integer", "minimum": 65536, "maximum": 2**40},
                "outbox_max_age_s": {"type": "number", "exclusiveMinimum": 0},
                "prometheus_address": {"type": "string"},
                "thresholds": {"$ref": "#/$defs/drift_thresholds"},
                "model_thresholds": {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/drift_thresholds"},
                },
            },
        },
        "logging": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "level": {"enum": ["debug", "info", "warning", "error"]},
                "format": {"enum": ["json", "logfmt"]},
            },
        },
    },
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str
    unix_socket: str
    max_message_bytes: int
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    drain_timeout_s: float
    stall_timeout_s: float
    max_concurrent_streams: int
    shared_memory: str = "off"


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    path: str
    model_control: str
    startup_models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ControlConfig:
    enabled: bool
    token_file: str
    require_client_cert: bool
    client_cns: tuple[str, ...]


def _control_config(
    control: Mapping[str, Any], server: Mapping[str, Any], model_control: str, source: str
) -> ControlConfig:
    needs_cert = control["require_client_cert"] or control["client_cns"]
    if needs_cert and not server["tls_client_ca"]:
        key = "control.client_cns" if control["client_cns"] else "control.require_client_cert"
        raise ConfigError(
            f"{source}: key '{key}' needs 'server.tls_client_ca' (mutual TLS), "
            "or nobody could ever present a client certificate"
        )
    if control["enabled"] and model_control != "explicit":
        raise ConfigError(
            f"{source}: key 'control.enabled' needs 'repository.model_control' = \"explicit\" "
            "(with \"none\" there is nothing to load or unload)"
        )
    return ControlConfig(**{**control, "client_cns": tuple(control["client_cns"])})


@dataclass(frozen=True, slots=True)
class SigningConfig:
    trust_dir: str
    allow_unsigned_models: bool


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    intra_op_threads: int
    inter_op_threads: int
    graph_optimization: str
    execution_providers: tuple[str, ...]
    default_instance_count: int
    default_max_queue_size: int
    max_instance_count: int = 0
    execution: str = "auto"
    inline_threshold_us: int = 0


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: str


@dataclass(frozen=True, slots=True)
class MqttConfig:
    enabled: bool
    host: str
    port: int
    tls_ca: str
    tls_cert: str
    tls_key: str
    tls_server_name: str
    username: str
    password: str
    device_id: str
    topic_prefix: str
    keepalive_s: int
    session_expiry_s: int
    reconnect_max_s: float


@dataclass(frozen=True, slots=True)
class FleetConfig:
    deployment_trust_dir: str
    chunk_bytes: int
    window: int
    chunk_timeout_s: float
    chunk_retries: int
    download_timeout_s: float
    max_download_bytes_per_s: int
    max_model_bytes: int
    max_clock_skew_s: float
    probation_s: float
    probation_max_error_rate: float
    probation_min_requests: int
    max_start_attempts: int
    keep_versions: int
    tags: tuple[str, ...] = ()


def _fleet_config(values: Mapping[str, Any], source: str) -> FleetConfig:
    # The schema's pattern lets a trailing newline through ($ in Python's re).
    bad = [t for t in values["tags"] if not is_tag(t)]
    if bad:
        raise ConfigError(f"{source}: key 'fleet.tags': {bad[0]!r} is not a tag")
    return FleetConfig(**{**values, "tags": tuple(values["tags"])})


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    health_interval_s: float
    drift_window_s: float
    sample_rate: float
    sample_queue: int
    outbox_max_messages: int
    outbox_max_bytes: int
    outbox_max_age_s: float
    prometheus_address: str
    thresholds: Mapping[str, Any]  # metric -> [warn, drift] or []; min_samples
    model_thresholds: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class AgentConfig:
    server: ServerConfig
    repository: RepositoryConfig
    signing: SigningConfig
    runtime: RuntimeConfig
    state: StateConfig
    logging: LoggingConfig
    mqtt: MqttConfig = field(default_factory=lambda: _mqtt_config(DEFAULTS["mqtt"], ""))
    fleet: FleetConfig = field(default_factory=lambda: _fleet_config(DEFAULTS["fleet"], ""))
    telemetry: TelemetryConfig = field(
        default_factory=lambda: _telemetry_config(DEFAULTS["telemetry"], "")
    )
    control: ControlConfig = field(
        default_factory=lambda: ControlConfig(False, "", False, ())
    )
    source: str = field(default="<defaults>")


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


if TYPE_CHECKING:
    import jsonschema


def _validator() -> Any:
    import jsonschema

    # JSON Schema counts 2.0 as an integer; TOML says it is a float, and a float in
    # an integer setting (thread counts, sizes) must stop start-up, not crash it later.
    return jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer",
            lambda _checker, value: isinstance(value, int) and not isinstance(value, bool),
        ),
    )


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
_KEYWORDS = frozenset({
    "type", "minimum", "maximum", "exclusiveMinimum", "enum", "properties",
    "additionalProperties", "items", "minItems", "maxItems", "minLength", "maxLength",
    "pattern", "uniqueItems", "$defs", "$ref",
})
_LOCAL_REF = "#/$defs/"


def _plainly_valid(
    value: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None
) -> bool:
    """True if ``value`` meets ``schema`` by the keywords above; False if it does not,
    or if the schema says something this check does not read (jsonschema decides)."""
    root = schema if root is None else root
    if not _KEYWORDS.issuperset(schema):
        return False
    ref = schema.get("$ref")
    if ref is not None:
        if not ref.startswith(_LOCAL_REF) or ref[len(_LOCAL_REF):] not in root.get("$defs", {}):
            return False
        if not _plainly_valid(value, root["$defs"][ref[len(_LOCAL_REF):]], root):
            return False
    kind = schema.get("type")
    if kind is not None and (kind not in _TYPES or not _TYPES[kind](value)):
        return False
    if "enum" in schema and not any(
        value == v and type(value) is type(v) for v in schema["enum"]
    ):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 62):
            return False
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 62):
            return False
        if schema.get("uniqueItems") and any(
            a == b for i, a in enumerate(value) for b in value[i + 1 :]
        ):
            return False
        items = schema.get("items")
        if items is not None and not all(_plainly_valid(v, items, root) for v in value):
            return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                if not _plainly_valid(item, props[key], root):
                    return False
            elif extra is False or (extra is not True and not _plainly_valid(item, extra, root)):
                return False
    return True


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        # Name the unknown key itself, not just its parent table.
        schema: Any = error.schema
        instance: Any = error.instance
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        where = f"{path}." if path else ""
        return f"unknown key '{where}{extra[0]}'" if extra else error.message
    if error.validator == "enum":
        options: Any = error.validator_value
        allowed = ", ".join(repr(v) for v in options)
        return f"key '{path}': {error.instance!r} is not one of {allowed}"
    return f"key '{path}': {error.message}"


def build_config(overrides: Mapping[str, Any], source: str = "<defaults>") -> AgentConfig:
    """Merge ``overrides`` (parsed TOML plus CLI flags) over the defaults and validate."""
    if not _plainly_valid(overrides, _SCHEMA):
        validator = _validator()(_SCHEMA)
        errors = sorted(validator.iter_errors(overrides), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError(f"{source}: {_describe(errors[0])}")
    merged = _merge(DEFAULTS, overrides)
    server = merged["server"]
    if bool(server["tls_cert"]) != bool(server["tls_key"]):
        raise ConfigError(f"{source}: keys 'server.tls_cert' and 'server.tls_key' go together")
    if server["tls_client_ca"] and not server["tls_cert"]:
        raise ConfigError(f"{source}: key 'server.tls_client_ca' needs 'server.tls_cert'")
    if not server["address"] and not server["unix_socket"]:
        raise ConfigError(f"{source}: set 'server.address' or 'server.unix_socket'")
    if server["address"]:
        _check_address(server["address"], source)
    repo = merged["repository"]
    runtime = merged["runtime"]
    return AgentConfig(
        server=ServerConfig(**server),
        repository=RepositoryConfig(
            path=repo["path"],
            model_control=repo["model_control"],
            startup_models=tuple(repo["startup_models"]),
        ),
        signing=SigningConfig(**merged["signing"]),
        control=_control_config(merged["control"], server, repo["model_control"], source),
        runtime=RuntimeConfig(
            **{**runtime, "execution_providers": tuple(runtime["execution_providers"])}
        ),
        state=StateConfig(**merged["state"]),
        mqtt=_mqtt_config(merged["mqtt"], source),
        fleet=_fleet_config(merged["fleet"], source),
        telemetry=_telemetry_config(merged["telemetry"], source),
        logging=LoggingConfig(**merged["logging"]),
        source=source,
    )


def _check_address(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"{source}: key 'server.address': {address!r} is not HOST:PORT (e.g. 127.0.0.1:8001)"
        )


def _mqtt_config(mqtt: Mapping[str, Any], source: str) -> MqttConfig:
    if bool(mqtt["tls_cert"]) != bool(mqtt["tls_key"]):
        raise ConfigError(f"{source}: keys 'mqtt.tls_cert' and 'mqtt.tls_key' go together")
    if mqtt["tls_cert"] and not mqtt["tls_ca"]:
        raise ConfigError(
            f"{source}: key 'mqtt.tls_cert' needs 'mqtt.tls_ca' (the broker's CA) for TLS"
        )
    if mqtt["password"] and not mqtt["username"]:
        raise ConfigError(f"{source}: key 'mqtt.password' needs 'mqtt.username'")
    if is_reserved_device_id(mqtt["device_id"]):
        raise ConfigError(
            f"{source}: key 'mqtt.device_id': {mqtt['device_id']!r} is reserved: device ids "
            f"may not start with {RESERVED_DEVICE_PREFIX!r} (the controllers' namespace)"
        )
    return MqttConfig(**mqtt)


def _telemetry_config(telemetry: Mapping[str, Any], source: str) -> TelemetryConfig:
    address = telemetry["prometheus_address"]
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"{source}: key 'telemetry.prometheus_address': {address!r} is not HOST:PORT "
                "(e.g. 127.0.0.1:9464) or \"\" (off)"
            )
    tables = {"telemetry.thresholds": telemetry["thresholds"]}
    tables.update(
        {f"telemetry.model_thresholds.{m}": t for m, t in telemetry["model_thresholds"].items()}
    )
    for where, table in tables.items():
        for metric, band in table.items():
            if metric == "min_samples":
                continue
            if len(band) == 1 or (len(band) == 2 and band[0] > band[1]):
                raise ConfigError(
                    f"{source}: key '{where}.{metric}': {band!r} is not [warn, drift] with "
                    "warn <= drift (or [] to never flag)"
                )
    return TelemetryConfig(**telemetry)
