"""The real adapters behind the updater's ports (``agent.fleet.ports``), for ``agent.app``.

Part of the composition root: the one place where the fleet updater meets the
serving side (onnxruntime, model configs) and the MQTT client. ``MqttClient``,
``MqttChunkFetcher``, ``ModelManager`` and ``StateStore`` satisfy their ports
as they are; what needs a translation is here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from agent.common.background import run_in_background
from agent.common.buffers import FileBytes
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.fleet.ports import LastWill, Validated
from agent.mqtt.client import MqttSettings, Will
from agent.protocol.deployment import CONFIG_PATH
from agent.serving.model_config import complete_config, parse_config_pbtxt
from agent.serving.onnx_runtime import OnnxSession, SessionOptions
from agent.serving.signed_reader import external_locations
from agent.serving.validation import SPEC_FILE, VECTORS_FILE, validate_model
from agent.wire import model_config_pb2 as mc


def session_options(config: AgentConfig) -> SessionOptions:
    runtime = config.runtime
    return SessionOptions(
        intra_op_threads=runtime.intra_op_threads,
        inter_op_threads=runtime.inter_op_threads,
        graph_optimization=runtime.graph_optimization,
        execution_providers=runtime.execution_providers,
    )


def mqtt_settings(config: AgentConfig, device_id: str) -> MqttSettings:
    m = config.mqtt
    return MqttSettings(
        host=m.host,
        port=m.port,
        client_id=device_id,
        tls_ca=m.tls_ca,
        tls_cert=m.tls_cert,
        tls_key=m.tls_key,
        tls_server_name=m.tls_server_name,
        username=m.username,
        password=m.password,
        keepalive_s=m.keepalive_s,
        session_expiry_s=m.session_expiry_s,
        reconnect_max_s=m.reconnect_max_s,
    )


def mqtt_will(will: LastWill) -> Will:
    return Will(will.topic, will.payload, retain=will.retain)


def _declared(config_text: str | None) -> mc.ModelConfig:
    return (
        parse_config_pbtxt(config_text, CONFIG_PATH) if config_text is not None
        else mc.ModelConfig()
    )


class OnnxVersionValidator:
    """Validates a staged version in a fresh onnxruntime session of its own."""

    def __init__(
        self, session: SessionOptions, free: Callable[[OnnxSession | None], None]
    ) -> None:
        # Single-threaded where sessions may have pools of their own; with the agent's
        # shared pools (onnx_runtime.share_thread_pools) it runs on those, as every
        # session must. Same graph optimisation and providers as serving.
        self._options = replace(session, intra_op_threads=1, inter_op_threads=1)
        self._free = free

    @property
    def extra_files(self) -> tuple[str, ...]:
        return (VECTORS_FILE, SPEC_FILE)

    def referenced_files(self, model_path: Path) -> tuple[str, ...]:
        return tuple(sorted(external_locations(model_path)))

    def model_file(self, model_name: str, config_text: str | None) -> str:
        try:
            declared = _declared(config_text)
        except AgentError as exc:
            raise AgentError(f"model config unusable: {exc}") from None
        if declared.name and declared.name != model_name:
            raise AgentError(f"config.pbtxt names model {declared.name!r}, not {model_name!r}")
        return declared.default_model_filename or "model.onnx"

    async def validate(
        self, model_name: str, config_text: str | None, model: FileBytes,
        contents: Mapping[str, FileBytes],
    ) -> Validated:
        declared = _declared(config_text)
        # Created on a low-priority thread: validating a large model takes CPU the
        # serving sessions need more.
        result = await run_in_background(
            validate_model, model, contents, self._options, name="fleet-validate"
        )
        try:
            complete_config(declared, model_name, result.inputs, result.outputs, 1)
        except AgentError:
            self._free(result.session)
            raise
        return Validated(result.session, result.mode, result.max_abs_error)
