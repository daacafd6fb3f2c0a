"""Triton ``config.pbtxt``: parse, complete from the ONNX graph, check, summarise.

Pure: works on text and on the graph's tensor list; the caller does the I/O.
The completed ``ModelConfig`` message is what the ModelConfig RPC returns; the
``ModelSpec`` summary is what the data plane validates requests against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format

from agent.errors import ModelConfigError
from agent.serving.datatypes import NUMPY_DTYPES, config_type_from_wire, wire_from_config_type
from agent.serving.onnx_runtime import GraphTensor
from agent.wire import model_config_pb2 as mc

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"


def default_max_instances() -> int:
    """The instance bound when ``runtime.max_instance_count`` is 0: each instance
    is a thread, and more than a few per CPU only queue for the same cores."""
    return max(8, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension when the model batches
    dtype: np.dtype[np.generic]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the data plane needs to know about one model version."""

    name: str
    version: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingSpec | None
    instance_count: int
    max_queue_size: int
    default_timeout_us: int

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None


def parse_config_pbtxt(text: str, where: str) -> mc.ModelConfig:
    """Parse Triton's text format; unknown or unsupported fields are errors naming them."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{where}: {exc}") from exc
    return config


def complete_config(
    config: mc.ModelConfig,
    model_name: str,
    graph_inputs: Sequence[GraphTensor],
    graph_outputs: Sequence[GraphTensor],
    default_instance_count: int,
    max_instance_count: int = 0,
) -> mc.ModelConfig:
    """Fill what config.pbtxt left out from the graph and check what it says.

    The instance groups may not add up to more than ``max_instance_count``
    instances (0: ``default_max_instances()``).
    """
    done = mc.ModelConfig()
    done.CopyFrom(config)
    if done.name and done.name != model_name:
        raise ModelConfigError(
            f"config.pbtxt of '{model_name}' names the model '{done.name}' (must match its "
            "directory)"
        )
    done.name = model_name
    if done.platform and done.platform != ONNX_PLATFORM:
        raise ModelConfigError(
            f"model '{model_name}': platform '{done.platform}' is not supported "
            f"(only '{ONNX_PLATFORM}')"
        )
    if done.backend and done.backend != ONNX_BACKEND:
        raise ModelConfigError(
            f"model '{model_name}': backend '{done.backend}' is not supported (only "
            f"'{ONNX_BACKEND}')"
        )
    done.platform = ONNX_PLATFORM
    done.backend = ONNX_BACKEND
    if done.max_batch_size < 0:
        raise ModelConfigError(f"model '{model_name}': max_batch_size must be >= 0")
    if not done.default_model_filename:
        done.default_model_filename = DEFAULT_MODEL_FILENAME
    if not done.HasField("version_policy"):
        done.version_policy.latest.num_versions = 1
    batching = done.max_batch_size > 0
    _complete_tensors(model_name, "input", done.input, graph_inputs, batching)
    _complete_tensors(model_name, "output", done.output, graph_outputs, batching)
    if done.HasField("dynamic_batching"):
        if not batching:
            raise ModelConfigError(
                f"model '{model_name}': dynamic_batching needs max_batch_size > 0"
            )
        for size in done.dynamic_batching.preferred_batch_size:
            if not 0 < size <= done.max_batch_size:
                raise ModelConfigError(
                    f"model '{model_name}': preferred_batch_size {size} is outside "
                    f"1..max_batch_size ({done.max_batch_size})"
                )
    if not done.instance_group:
        group = done.instance_group.add()
        group.count = default_instance_count
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    for group in done.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            raise ModelConfigError(
                f"model '{model_name}': instance_group kind KIND_GPU is not supported; use "
                "runtime.execution_providers in the agent config"
            )
        if group.count == 0:
            group.count = default_instance_count
        if group.count < 0:
            raise ModelConfigError(f"model '{model_name}': instance_group count must be > 0")
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
        if not group.name:
            group.name = model_name
    bound = max_instance_count or default_max_instances()
    total = sum(g.count for g in done.instance_group)
    if total > bound:
        where = "instance_group count" if config.instance_group else (
            "instance_group count (from runtime.default_instance_count)"
        )
        raise ModelConfigError(
            f"model '{model_name}': {where} {total} is above the bound of {bound} instances "
            f"(one thread each; runtime.max_instance_count, default 4 per CPU, at least 8)"
        )
    return done


def _complete_tensors(
    model_name: str,
    kind: str,
    declared: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    graph: Sequence[GraphTensor],
    batching: bool,
) -> None:
    by_name = {t.name: t for t in graph}
    for entry in declared:
        if entry.HasField("reshape"):
            raise ModelConfigError(
                f"model '{model_name}': {kind} '{entry.name}': reshape is not supported"
            )
        tensor = by_name.get(entry.name)
        if tensor is None:
            raise ModelConfigError(
                f"model '{model_name}': config {kind} '{entry.name}' is not in the ONNX graph "
                f"(graph {kind}s: {', '.join(by_name)})"
            )
        graph_dims = tensor.shape[1:] if batching else tensor.shape
        _check_batch_dimension(model_name, kind, tensor, batching)
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = mc.DataType.Value(config_type_from_wire(tensor.datatype))
        elif wire_from_config_type(mc.DataType.Name(entry.data_type)) != tensor.datatype:
            raise ModelConfigError(
                f"model '{model_name}': {kind} '{entry.name}' is "
                f"{mc.DataType.Name(entry.data_type)} in config.pbtxt but {tensor.datatype} in "
                "the ONNX graph"
            )
        if not entry.dims:
            entry.dims.extend(graph_dims)
        elif len(entry.dims) != len(graph_dims) or any(
            c != g and c != -1 and g != -1 for c, g in zip(entry.dims, graph_dims, strict=False)
        ):
            raise ModelConfigError(
                f"model '{model_name}': {kind} '{entry.name}' has dims {list(entry.dims)} in "
                f"config.pbtxt but {list(graph_dims)} in the ONNX graph"
                + (" (without the batch dimension)" if batching else "")
            )
    # Tensors the config does not mention are taken from the graph as they are.
    named = {e.name for e in declared}
    for tensor in graph:
        if tensor.name in named:
            continue
        _check_batch_dimension(model_name, kind, tensor, batching)
        entry = declared.add()  # type: ignore[union-attr]
        entry.name = tensor.name
        entry.data_type = mc.DataType.Value(config_type_from_wire(tensor.datatype))
        entry.dims.extend(tensor.shape[1:] if batching else tensor.shape)


def _check_batch_dimension(
    model_name: str, kind: str, tensor: GraphTensor, batching: bool
) -> None:
    # With max_batch_size > 0 every graph tensor's first dimension is the batch:
    # it must be dynamic, whether or not config.pbtxt lists the tensor.
    if batching and (not tensor.shape or tensor.shape[0] != -1):
        first = f"a fixed first dimension {tensor.shape[0]}" if tensor.shape else "no dimensions"
        raise ModelConfigError(
            f"model '{model_name}': max_batch_size > 0 but {kind} '{tensor.name}' has {first}"
        )


def model_spec(
    config: mc.ModelConfig, version: str, default_max_queue_size: int
) -> ModelSpec:
    """Summarise a completed config for request validation and scheduling."""

    def tensors(entries: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput]) -> tuple[
        TensorSpec, ...
    ]:
        specs = []
        for e in entries:
            datatype = wire_from_config_type(mc.DataType.Name(e.data_type))
            dims = tuple(e.dims)
            specs.append(
                TensorSpec(
                    name=e.name,
                    datatype=datatype,
                    dims=dims,
                    dtype=NUMPY_DTYPES[datatype],
                    optional=bool(getattr(e, "optional", False)),
                )
            )
        return tuple(specs)

    batching = None
    max_queue_size = default_max_queue_size
    default_timeout_us = 0
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        batching = BatchingSpec(tuple(db.preferred_batch_size), db.max_queue_delay_microseconds)
        policy = db.default_queue_policy
        if policy.max_queue_size:
            max_queue_size = policy.max_queue_size
        default_timeout_us = policy.default_timeout_microseconds
    return ModelSpec(
        name=config.name,
        version=version,
        max_batch_size=config.max_batch_size,
        inputs=tensors(config.input),
        outputs=tensors(config.output),
        batching=batching,
        instance_count=sum(g.count for g in config.instance_group) or 1,
        max_queue_size=max_queue_size,
        default_timeout_us=default_timeout_us,
    )
