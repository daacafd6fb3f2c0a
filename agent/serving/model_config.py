"""Triton ``config.pbtxt``: parse, complete from the ONNX graph, check, summarise.

Pure: works on text and on the graph's tensor list; the caller does the I/O.
The completed ``ModelConfig`` message is what the ModelConfig RPC returns; the
``ModelSpec`` summary is what the data plane validates requests against.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import text_format

from agent.errors import ModelConfigError
from agent.serving.datatypes import NUMPY_DTYPES, config_type_from_wire, wire_from_config_type
from agent.serving.onnx_runtime import GraphTensor
from agent.wire import model_config_pb2 as mc

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"
# Triton's --backend-config=default-max-batch-size: the max_batch_size an
# auto-completed config gets when it asks for dynamic batching without one.
DEFAULT_MAX_BATCH_SIZE = 4

# The config.pbtxt fields the agent acts on (dotted paths; a message's path admits
# all of its fields). Any other field set to a non-default value is refused by
# name rather than ignored in silence.
_SUPPORTED_FIELDS = frozenset({
    "name", "platform", "backend", "version_policy", "max_batch_size",
    "input.name", "input.data_type", "input.format", "input.dims", "input.reshape",
    "input.optional",
    "output.name", "output.data_type", "output.dims", "output.reshape",
    "output.label_filename",
    "dynamic_batching.preferred_batch_size", "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.preserve_ordering",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "instance_group.name", "instance_group.kind", "instance_group.count",
    "default_model_filename",
    "parameters[execution]",  # where a model runs: inline, worker or auto (model_manager)
    "model_warmup.name", "model_warmup.batch_size", "model_warmup.count",
    "model_warmup.inputs.value.data_type",
    "model_warmup.inputs.value.dims", "model_warmup.inputs.value.zero_data",
    "model_warmup.inputs.value.random_data",
    "parameters.string_value",  # key "execution" only (model_manager checks the keys)
})


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
    # config.pbtxt ``reshape``: the shape the model sees (without the batch
    # dimension), while ``dims`` is the shape on the wire. None: no reshape.
    reshape: tuple[int, ...] | None = None
    labels: tuple[str, ...] = ()  # output label_filename's lines (classification)


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
    reshaped_outputs: bool = False  # some output's config dims differ from the model's

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
    unsupported = sorted(set(_set_fields(config, "")) - _SUPPORTED_FIELDS)
    unsupported = [f for f in unsupported if not any(
        f.startswith(ok + ".") for ok in _SUPPORTED_FIELDS)]
    if unsupported:
        raise ModelConfigError(
            f"{where}: field(s) {', '.join(f.replace('.value.', '.') for f in unsupported)} "
            "not supported by edge-agent "
            "(remove them; see README, Triton compatibility)"
        )
    return config


def _set_fields(message: Any, prefix: str) -> Iterator[str]:
    """Dotted paths of the leaf fields set to a non-default value (an empty message
    such as ``dynamic_batching {}`` sets nothing)."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.message_type is None:
            yield path
            continue
        if field.message_type.GetOptions().map_entry:
            if path == "parameters":  # by key: each is a setting of its own
                yield from (f"parameters[{key}]" for key in value)
            elif field.message_type.fields_by_name["value"].message_type is None:
                yield path
            else:
                for entry in value.values():
                    yield from _set_fields(entry, f"{path}.value.")
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            yield from _set_fields(item, path + ".")


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
    if (
        done.max_batch_size == 0
        and done.HasField("dynamic_batching")
        and _can_batch(graph_inputs, graph_outputs)
    ):
        # As Triton's auto-complete: a model that can batch and asks for dynamic
        # batching without a max_batch_size gets the default one.
        done.max_batch_size = DEFAULT_MAX_BATCH_SIZE
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


def _can_batch(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> bool:
    return all(t.shape and t.shape[0] == -1 for t in (*inputs, *outputs))


def _fits(config_dims: Sequence[int], graph_dims: Sequence[int]) -> bool:
    return len(config_dims) == len(graph_dims) and all(
        c == g or c == -1 or g == -1 for c, g in zip(config_dims, graph_dims, strict=True)
    )


def _complete_tensors(
    model_name: str,
    kind: str,
    declared: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    graph: Sequence[GraphTensor],
    batching: bool,
) -> None:
    by_name = {t.name: t for t in graph}
    for entry in declared:
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
        if entry.HasField("reshape"):
            _check_reshape(model_name, kind, entry, graph_dims, batching)
            continue
        if not entry.dims:
            entry.dims.extend(graph_dims)
            if not graph_dims and not batching:
                # A rank-0 tensor travels as [1] (as Triton's auto-complete does).
                entry.dims.append(1)
                entry.reshape.SetInParent()
        elif not _fits(entry.dims, graph_dims):
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
        if not entry.dims and not batching:
            entry.dims.append(1)
            entry.reshape.SetInParent()


def _check_reshape(
    model_name: str,
    kind: str,
    entry: mc.ModelInput | mc.ModelOutput,
    graph_dims: Sequence[int],
    batching: bool,
) -> None:
    """``reshape``: ``dims`` is the wire shape, ``reshape.shape`` the model's."""
    where = f"model '{model_name}': {kind} '{entry.name}'"
    shape = list(entry.reshape.shape)
    if not _fits(shape, graph_dims):
        raise ModelConfigError(
            f"{where} has reshape {shape} in config.pbtxt but {list(graph_dims)} in the ONNX "
            "graph" + (" (without the batch dimension)" if batching else "")
        )
    if any(d < -1 or d == 0 for d in (*entry.dims, *shape)):
        raise ModelConfigError(f"{where}: dims and reshape must be > 0 or -1")
    if sum(d == -1 for d in shape) > 1 or (-1 in shape) != (-1 in entry.dims):
        raise ModelConfigError(
            f"{where}: dims {list(entry.dims)} and reshape {shape} must both be fixed or both "
            "have one variable (-1) dimension"
        )
    if -1 not in shape and math.prod(entry.dims) != math.prod(shape):
        raise ModelConfigError(
            f"{where}: dims {list(entry.dims)} and reshape {shape} have different element "
            "counts"
        )


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
    config: mc.ModelConfig,
    version: str,
    default_max_queue_size: int,
    labels: dict[str, tuple[str, ...]] | None = None,
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
                    reshape=tuple(e.reshape.shape) if e.HasField("reshape") else None,
                    labels=(labels or {}).get(e.name, ()),
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
        reshaped_outputs=any(o.HasField("reshape") for o in config.output),
    )


def warmup_samples(
    spec: ModelSpec, config: mc.ModelConfig
) -> list[tuple[str, int, dict[str, Any]]]:
    """config.pbtxt ``model_warmup``: (name, repeat count, feeds in the model's shapes).

    Each sample names every required input, with data ``zero_data`` or ``random_data``
    (a fixed seed, so a load is reproducible). Raises ModelConfigError naming what
    does not fit the model.
    """
    samples = []
    rng = np.random.default_rng(0)
    for warmup in config.model_warmup:
        where = f"model '{spec.name}': model_warmup '{warmup.name}'"
        batch = warmup.batch_size or 1
        if spec.max_batch_size == 0 and warmup.batch_size > 1:
            raise ModelConfigError(f"{where}: batch_size {batch} but the model does not batch")
        if spec.max_batch_size and batch > spec.max_batch_size:
            raise ModelConfigError(f"{where}: batch_size {batch} is above max_batch_size")
        feeds: dict[str, Any] = {}
        for name, sample in warmup.inputs.items():
            tensor = spec.input(name)
            if tensor is None:
                raise ModelConfigError(f"{where}: '{name}' is not an input of the model")
            datatype = wire_from_config_type(mc.DataType.Name(sample.data_type))
            dims = tuple(sample.dims)
            if datatype != tensor.datatype or not _fits(dims, tensor.dims) or -1 in dims:
                raise ModelConfigError(
                    f"{where}: input '{name}' is {datatype} {list(dims)}, the model takes "
                    f"{tensor.datatype} {list(tensor.dims)} (warm-up dims must be fixed)"
                )
            shape = ((batch,) if spec.max_batch_size else ()) + dims
            if sample.random_data and datatype != "BYTES":
                data = rng.random(shape) if datatype in ("FP16", "FP32", "FP64") else (
                    rng.integers(0, 2, shape))
                array = np.asarray(data).astype(tensor.dtype)
            elif datatype == "BYTES":
                array = np.full(shape, "", dtype=object)
            else:
                array = np.zeros(shape, dtype=tensor.dtype)
            if tensor.reshape is not None:
                model_shape = ((batch,) if spec.max_batch_size else ()) + tensor.reshape
                array = array.reshape(model_shape)
            feeds[name] = array
        missing = [t.name for t in spec.inputs if t.name not in feeds and not t.optional]
        if missing:
            raise ModelConfigError(f"{where}: no data for input(s) {', '.join(missing)}")
        samples.append((warmup.name, max(1, warmup.count), feeds))
    return samples
