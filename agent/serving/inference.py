"""Protocol-neutral inference requests and responses, and their validation.

Pure: checks a request against a ``ModelSpec`` and turns raw tensor bytes into
NumPy views (no copies for fixed-size types). Every error names the input and
what is wrong, and no buffer is ever sized from a number the client sent before
that number has been checked against the bytes actually received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import InvalidInputError
from agent.serving.datatypes import BYTES, ITEM_SIZES, NUMPY_DTYPES, as_text, decode_bytes_tensor
from agent.serving.model_config import ModelSpec, TensorSpec

Array = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """A tensor's place in a registered shared memory region (its parameters
    shared_memory_region / shared_memory_offset / shared_memory_byte_size)."""

    region: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None  # raw_input_contents entry, or shared memory
    typed: Sequence[Any] | None = None  # InferTensorContents values, if sent that way
    shm: SharedMemoryRef | None = None  # data in shared memory (resolved into raw)


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """What a request asked of one output beyond its values."""

    shm: SharedMemoryRef | None = None  # write it into shared memory
    class_count: int = 0  # > 0: the classification extension's top-k strings


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    model_version: str
    request_id: str
    inputs: list[InputTensor]
    requested_outputs: list[str] | None = None  # None: every output
    output_options: dict[str, OutputOptions] | None = None
    shared_memory_inputs: bool = False  # some input's data is in shared memory
    deadline: float | None = None  # time.monotonic() seconds; None: no deadline


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes
    in_shared_memory: bool = False  # written into the region the request named


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    request_id: str
    outputs: list[OutputTensor] = field(default_factory=list)


@dataclass(slots=True)
class DecodedRequest:
    """A validated request: feeds ready for onnxruntime, its batch size, outputs wanted."""

    feeds: dict[str, Array]
    batch_size: int  # 1 for models without batching
    output_names: list[str]
    output_datatypes: list[str]


def decode_request(spec: ModelSpec, request: InferenceRequest) -> DecodedRequest:
    feeds: dict[str, Array] = {}
    batch_size = 0
    for tensor in request.inputs:
        expected = spec.input(tensor.name)
        if expected is None:
            known = ", ".join(s.name for s in spec.inputs)
            raise InvalidInputError(
                f"unexpected input '{tensor.name}' for model '{spec.name}' (inputs: {known})"
            )
        if tensor.name in feeds:
            raise InvalidInputError(f"input '{tensor.name}' is given more than once")
        array, batch = _decode_tensor(spec, expected, tensor)
        if spec.max_batch_size > 0:
            if batch_size and batch != batch_size:
                raise InvalidInputError(
                    f"input '{tensor.name}' has batch size {batch} but other inputs have "
                    f"{batch_size}"
                )
            batch_size = batch
        if expected.reshape is not None:
            array = array.reshape(((batch,) if spec.max_batch_size > 0 else ()) + expected.reshape)
        feeds[tensor.name] = array
    missing = [s.name for s in spec.inputs if s.name not in feeds and not s.optional]
    if missing:
        raise InvalidInputError(
            f"model '{spec.name}' is missing input(s): {', '.join(repr(m) for m in missing)}"
        )
    names, datatypes = _requested_outputs(spec, request.requested_outputs)
    return DecodedRequest(feeds, batch_size or 1, names, datatypes)


def _requested_outputs(
    spec: ModelSpec, requested: list[str] | None
) -> tuple[list[str], list[str]]:
    if not requested:
        return [o.name for o in spec.outputs], [o.datatype for o in spec.outputs]
    by_name = {o.name: o for o in spec.outputs}
    names: list[str] = []
    datatypes: list[str] = []
    for name in requested:
        out = by_name.get(name)
        if out is None:
            raise InvalidInputError(
                f"requested output '{name}' is not an output of model '{spec.name}' "
                f"(outputs: {', '.join(by_name)})"
            )
        if name in names:
            raise InvalidInputError(f"output '{name}' is requested more than once")
        names.append(name)
        datatypes.append(out.datatype)
    return names, datatypes


def _check_shape(spec: ModelSpec, expected: TensorSpec, shape: tuple[int, ...]) -> int:
    """Validate ``shape`` against the model; return its batch size (0 if not batching)."""
    name = expected.name
    for d in shape:
        if d < 0:
            raise InvalidInputError(f"input '{name}': shape {list(shape)} has a negative dimension")
    dims = expected.dims
    batch = 0
    if spec.max_batch_size > 0:
        if len(shape) != len(dims) + 1:
            raise InvalidInputError(
                f"input '{name}': shape {list(shape)} should be [batch] + {list(dims)} "
                f"(rank {len(dims) + 1})"
            )
        batch = shape[0]
        if batch < 1 or batch > spec.max_batch_size:
            raise InvalidInputError(
                f"input '{name}': batch size {batch} is outside 1..{spec.max_batch_size} "
                f"(max_batch_size of model '{spec.name}')"
            )
        rest = shape[1:]
    else:
        if expected.reshape == () and shape in ((), (1,)):
            return 0  # a rank-0 model input: sent as [1] (perf_analyzer) or as the scalar
        if len(shape) != len(dims):
            raise InvalidInputError(
                f"input '{name}': shape {list(shape)} has rank {len(shape)}, model expects "
                f"{list(dims)}"
            )
        rest = shape
    for got, want in zip(rest, dims, strict=True):
        if want != -1 and got != want:
            raise InvalidInputError(
                f"input '{name}': shape {list(shape)} does not match the model's "
                f"{([-1] if spec.max_batch_size > 0 else []) + list(dims)}"
            )
    return batch


# The most elements a tensor's shape may describe once its zero dimensions are
# set aside: no request can carry more (gRPC messages stay under 2 GiB), and
# NumPy and onnxruntime must never see a shape whose size overflows.
MAX_ELEMENTS = 2**31 - 1


def _element_count(name: str, shape: tuple[int, ...]) -> int:
    # The rank has been checked against the model, so this is a short product of
    # integers: cheap however large the dimensions. Nothing is allocated from it
    # until it has been checked against the data actually received, which bounds
    # any non-zero count; an empty shape such as [0, 2**62] is bounded here.
    count = math.prod(shape)
    if count == 0:
        rest = math.prod(d for d in shape if d)
        if rest > MAX_ELEMENTS:
            raise InvalidInputError(
                f"input '{name}': shape {list(shape)} is too large: its non-zero dimensions "
                f"multiply to {rest}, more than {MAX_ELEMENTS} elements"
            )
    return count


def _decode_tensor(
    spec: ModelSpec, expected: TensorSpec, tensor: InputTensor
) -> tuple[Array, int]:
    name = tensor.name
    if tensor.datatype != expected.datatype:
        raise InvalidInputError(
            f"input '{name}': datatype {tensor.datatype} does not match the model's "
            f"{expected.datatype}"
        )
    batch = _check_shape(spec, expected, tensor.shape)
    if tensor.raw is not None and tensor.typed is not None:
        raise InvalidInputError(
            f"input '{name}': data given both in raw_input_contents and in contents; use one"
        )
    if tensor.raw is not None:
        raw = tensor.raw
        count = _element_count(name, tensor.shape)
        if tensor.datatype == BYTES:
            # Each element needs at least its 4-byte prefix: bounds the count by the data.
            if count * 4 > len(raw):
                raise InvalidInputError(
                    f"input '{name}': got {len(raw)} bytes but shape {list(tensor.shape)} has "
                    f"{count} BYTES elements, which need at least {count * 4} (a 4-byte length "
                    "prefix each)"
                )
            array: Array = decode_bytes_tensor(name, raw, count)
        else:
            itemsize = ITEM_SIZES[tensor.datatype]
            if count * itemsize != len(raw):
                raise InvalidInputError(
                    f"input '{name}': got {len(raw)} bytes but shape {list(tensor.shape)} of "
                    f"{tensor.datatype} needs {count * itemsize}"
                )
            array = np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype])
        return array.reshape(tensor.shape), batch
    typed = tensor.typed if tensor.typed is not None else ()
    count = _element_count(name, tensor.shape)
    if count != len(typed):
        raise InvalidInputError(
            f"input '{name}': got {len(typed)} values but shape {list(tensor.shape)} needs "
            f"{count}"
        )
    if tensor.datatype == BYTES:
        array = np.empty(count, dtype=np.object_)
        array[:] = [as_text(name, i, bytes(v)) for i, v in enumerate(typed)]
    else:
        array = np.asarray(typed, dtype=NUMPY_DTYPES[tensor.datatype])
    return array.reshape(tensor.shape), batch


def wire_output_shape(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An output's shape as the client sees it: its config dims when it has a reshape."""
    out = next((o for o in spec.outputs if o.name == name), None)
    if out is None or out.reshape is None:
        return shape
    lead = shape[:1] if spec.max_batch_size > 0 else ()
    dims = list(out.dims)
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1) or 1
        dims[dims.index(-1)] = math.prod(shape[len(lead):]) // known
    return (*lead, *dims)
