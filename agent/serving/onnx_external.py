"""External data references in an ONNX model, found without the ``onnx`` package.

A tensor in an ONNX model may keep its bytes outside the model file
(``data_location = EXTERNAL`` plus ``location``/``offset``/``length`` entries).
Left to itself onnxruntime opens that location relative to the model's path
(older versions follow ``..`` and absolute paths), so a signed model could make
it read bytes the signature never covered. The agent therefore resolves every
such reference itself, against the verified files of the version, and hands
onnxruntime the verified buffers (``onnx_runtime``); this module is the pure
part: a minimal protobuf wire parse of ModelProto, the checks, and a rewrite
of the model whose external references no longer name any file.

Field numbers are onnx.proto's (proto2). Parsing follows protobuf's rules
where they matter (a singular scalar's last occurrence wins, repeated fields
concatenate); what a conforming writer never produces (groups, a known field
with another wire type, an unknown ``data_location``, duplicate or unknown
external-data keys) is refused rather than interpreted, so this parse and
onnxruntime's cannot disagree about what is external.

Only the main graph's initializers may be external (that is what exporters
write for large models); an external tensor anywhere else (node attributes,
subgraphs, sparse initializers, functions, training info) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from agent.common.buffers import FileBytes
from agent.errors import VerificationError

# onnx.proto field numbers.
_MODEL_GRAPH: Final = 7
_MODEL_TRAINING_INFO: Final = 20
_MODEL_FUNCTIONS: Final = 25
_GRAPH_NODE: Final = 1
_GRAPH_INITIALIZER: Final = 5
_GRAPH_SPARSE_INITIALIZER: Final = 15
_NODE_ATTRIBUTE: Final = 5
_ATTR_T: Final = 5
_ATTR_G: Final = 6
_ATTR_TENSORS: Final = 10
_ATTR_GRAPHS: Final = 11
_ATTR_SPARSE_TENSOR: Final = 22
_ATTR_SPARSE_TENSORS: Final = 23
_SPARSE_VALUES: Final = 1
_SPARSE_INDICES: Final = 2
_FUNCTION_NODE: Final = 7
_FUNCTION_ATTRIBUTE_PROTO: Final = 11
_TRAINING_INITIALIZATION: Final = 1
_TRAINING_ALGORITHM: Final = 2
_TENSOR_DIMS: Final = 1
_TENSOR_DATA_TYPE: Final = 2
_TENSOR_NAME: Final = 8
_TENSOR_RAW_DATA: Final = 9
_TENSOR_EXTERNAL_DATA: Final = 13
_TENSOR_DATA_LOCATION: Final = 14
# float_data, int32_data, string_data, int64_data, double_data, uint64_data
_TENSOR_INLINE_DATA: Final = frozenset({4, 5, 6, 7, 10, 11})
_ENTRY_KEY: Final = 1
_ENTRY_VALUE: Final = 2

_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5

_DEFAULT: Final = 0
_EXTERNAL: Final = 1

# onnxruntime reads a tensor from a raw memory address when its location is this tag.
ORT_MEMORY_TAG: Final = "*/_ORT_MEM_ADDR_/*"
# What a rewritten tensor's location says: no file of that name exists under any
# model path (onnxruntime is given the tensor's bytes and never opens it).
STUB_LOCATION: Final = "edge-agent-verified-in-memory/none"
_KEYS: Final = frozenset({"location", "offset", "length", "checksum"})

# ONNX TensorProto.DataType -> numpy dtype string, for the types onnxruntime's
# Python API builds a tensor from.
NUMPY_TYPES: Final = {
    1: "<f4",  # FLOAT
    2: "u1",  # UINT8
    3: "i1",  # INT8
    4: "<u2",  # UINT16
    5: "<i2",  # INT16
    6: "<i4",  # INT32
    7: "<i8",  # INT64
    9: "?",  # BOOL
    10: "<f2",  # FLOAT16
    11: "<f8",  # DOUBLE
    12: "<u4",  # UINT32
    13: "<u8",  # UINT64
}
_ITEM_SIZES: Final = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8}


class ExternalDataError(VerificationError):
    """A model's external data is not a verified file of its version (or is unreadable)."""

    code = "external_data_refused"


@dataclass(frozen=True, slots=True)
class ExternalTensor:
    """One initializer whose bytes live in a file of the version directory."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str  # normalised path relative to the version directory
    offset: int
    length: int | None  # None: to the end of the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * _ITEM_SIZES[self.data_type]


# --------------------------------------------------------------------------- wire format


def _malformed(where: str, what: str) -> ExternalDataError:
    return ExternalDataError(f"the model is malformed ({where}: {what}); its external data "
                             "cannot be checked")


def _varint(buf: memoryview, pos: int, where: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise _malformed(where, "truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
    raise _malformed(where, "varint longer than 10 bytes")


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    wire: int
    value: int  # varints (0 for other wire types)
    data: memoryview  # length-delimited payload (empty for other wire types)
    start: int  # the whole field (tag included) is buf[start:end]
    end: int


def _fields(buf: memoryview, where: str) -> Iterator[_Field]:
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise _malformed(where, f"field number {number}")
        value = 0
        data = buf[0:0]
        if wire == _VARINT:
            value, pos = _varint(buf, pos, where)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos, where)
            if size > len(buf) - pos:
                raise _malformed(where, f"field {number} runs past the end")
            data = buf[pos : pos + size]
            pos += size
        else:  # groups (3, 4) are never written for onnx.proto; 6, 7 are invalid
            raise _malformed(where, f"field {number} has wire type {wire}")
        if pos > len(buf):
            raise _malformed(where, f"field {number} runs past the end")
        yield _Field(number, wire, value, data, start, pos)


def _messages(buf: memoryview, where: str, numbers: frozenset[int]) -> Iterator[_Field]:
    """The fields numbered ``numbers`` of ``buf``, each required to be length-delimited."""
    for field in _fields(buf, where):
        if field.number in numbers:
            if field.wire != _LEN:
                raise _malformed(where, f"field {field.number} is not length-delimited")
            yield field


def _text(data: memoryview, where: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(where, "a string is not UTF-8") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


# --------------------------------------------------------------------------- tensors


@dataclass(slots=True)
class _Tensor:
    name: str = ""
    data_type: int = 0
    dims: list[int] | None = None
    location: int = _DEFAULT
    entries: list[tuple[str, str]] | None = None
    inline: bool = False

    @property
    def external(self) -> bool:
        return self.location == _EXTERNAL or bool(self.entries)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_tensor(buf: memoryview, where: str) -> _Tensor:
    tensor = _Tensor(dims=[], entries=[])
    assert tensor.dims is not None and tensor.entries is not None
    for field in _fields(buf, where):
        n = field.number
        if n == _TENSOR_NAME:
            if field.wire != _LEN:
                raise _malformed(where, "tensor name is not a string")
            tensor.name = _text(field.data, where)
        elif n == _TENSOR_DATA_TYPE:
            if field.wire != _VARINT:
                raise _malformed(where, "tensor data_type is not a varint")
            tensor.data_type = _signed64(field.value)
        elif n == _TENSOR_DIMS:
            if field.wire == _VARINT:
                tensor.dims.append(_signed64(field.value))
            elif field.wire == _LEN:  # packed
                pos = 0
                while pos < len(field.data):
                    dim, pos = _varint(field.data, pos, where)
                    tensor.dims.append(_signed64(dim))
            else:
                raise _malformed(where, "tensor dims are not varints")
        elif n == _TENSOR_DATA_LOCATION:
            if field.wire != _VARINT or field.value not in (_DEFAULT, _EXTERNAL):
                raise _malformed(where, f"tensor data_location {field.value} is not 0 or 1")
            tensor.location = field.value
        elif n == _TENSOR_EXTERNAL_DATA:
            if field.wire != _LEN:
                raise _malformed(where, "tensor external_data is not a message")
            key = value = ""
            for entry in _fields(field.data, where):
                if entry.number in (_ENTRY_KEY, _ENTRY_VALUE):
                    if entry.wire != _LEN:
                        raise _malformed(where, "external_data entry is not a string")
                    if entry.number == _ENTRY_KEY:
                        key = _text(entry.data, where)
                    else:
                        value = _text(entry.data, where)
            tensor.entries.append((key, value))
        elif n == _TENSOR_RAW_DATA or n in _TENSOR_INLINE_DATA:
            tensor.inline = True
    return tensor


def _describe(tensor: _Tensor) -> str:
    location = dict(tensor.entries or ()).get("location")
    at = f" (external data location {location!r})" if location is not None else ""
    return f"tensor {tensor.name!r}{at}"


def normalize_location(tensor_name: str, location: str) -> str:
    """``location`` as a path relative to the version directory, or ExternalDataError.

    Absolute paths, ``..`` anywhere, backslashes, NUL and onnxruntime's memory
    address tag are refused; ``.`` and empty components are dropped (POSIX
    resolves them the same way).
    """
    where = f"tensor {tensor_name!r}: external data location {location!r}"
    if not location:
        raise ExternalDataError(f"{where} is empty")
    if location.startswith(ORT_MEMORY_TAG):
        raise ExternalDataError(f"{where} is onnxruntime's raw memory address tag; refused")
    if "\x00" in location or "\\" in location:
        raise ExternalDataError(f"{where} holds a NUL or backslash; refused")
    if location.startswith("/"):
        raise ExternalDataError(f"{where} is an absolute path outside the version; refused")
    parts = [p for p in location.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ExternalDataError(f"{where} climbs out with '..'; refused")
    if not parts:
        raise ExternalDataError(f"{where} names no file")
    return "/".join(parts)


def _number(where: str, key: str, text: str) -> int:
    if not text or any(c not in "0123456789" for c in text) or len(text) > 19:
        raise ExternalDataError(f"{where}: {key} {text!r} is not a decimal number")
    return int(text)


def _external_tensor(tensor: _Tensor) -> ExternalTensor:
    where = _describe(tensor)
    entries = tensor.entries or []
    if tensor.location != _EXTERNAL:
        raise ExternalDataError(f"{where}: external_data entries without data_location EXTERNAL")
    if tensor.inline:
        raise ExternalDataError(f"{where}: holds both inline and external data")
    keys = [k for k, _ in entries]
    for key in keys:
        if key not in _KEYS:
            raise ExternalDataError(f"{where}: unknown external_data key {key!r}")
        if keys.count(key) > 1:
            raise ExternalDataError(f"{where}: external_data key {key!r} given twice")
    values = dict(entries)
    if "location" not in values:
        raise ExternalDataError(f"{where}: external data without a location")
    if not tensor.name:
        raise ExternalDataError(f"{where}: an external tensor has no name")
    if tensor.data_type not in NUMPY_TYPES:
        raise ExternalDataError(
            f"{where}: external data of ONNX data type {tensor.data_type} is not supported"
        )
    if any(d < 0 for d in tensor.dims or ()):
        raise ExternalDataError(f"{where}: negative dimension in {tensor.dims}")
    length = values.get("length")
    return ExternalTensor(
        name=tensor.name,
        data_type=tensor.data_type,
        dims=tuple(tensor.dims or ()),
        location=normalize_location(tensor.name, values["location"]),
        offset=_number(where, "offset", values.get("offset", "0")),
        length=None if length is None else _number(where, "length", length),
    )


def _stub_tensor(buf: memoryview, where: str) -> bytes:
    """The tensor without its external-data fields, pointing at STUB_LOCATION instead."""
    kept = b"".join(
        bytes(buf[f.start : f.end])
        for f in _fields(buf, where)
        if f.number not in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION)
    )
    entry = _len_field(_ENTRY_KEY, b"location") + _len_field(_ENTRY_VALUE, STUB_LOCATION.encode())
    location = _encode_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encode_varint(_EXTERNAL)
    return kept + location + _len_field(_TENSOR_EXTERNAL_DATA, entry)


# --------------------------------------------------------------------------- the walk


def _refuse_nested(buf: memoryview, where: str) -> None:
    tensor = _parse_tensor(buf, where)
    if tensor.external:
        raise ExternalDataError(
            f"{_describe(tensor)} in {where}: external data is supported only for the main "
            "graph's initializers; refused"
        )


def _walk_sparse(buf: memoryview, where: str) -> None:
    for f in _messages(buf, where, frozenset({_SPARSE_VALUES, _SPARSE_INDICES})):
        _refuse_nested(f.data, where)


def _walk_attribute(buf: memoryview, where: str) -> None:
    tensors = frozenset({_ATTR_T, _ATTR_TENSORS})
    graphs = frozenset({_ATTR_G, _ATTR_GRAPHS})
    sparse = frozenset({_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS})
    for f in _messages(buf, where, tensors | graphs | sparse):
        if f.number in tensors:
            _refuse_nested(f.data, where)
        elif f.number in graphs:
            _walk_graph(f.data, f"a subgraph of {where}", None)
        else:
            _walk_sparse(f.data, where)


def _walk_nodes(buf: memoryview, where: str, node_field: int, attribute_field: int) -> None:
    for f in _messages(buf, where, frozenset({node_field, attribute_field})):
        if f.number == node_field:
            for attribute in _messages(f.data, where, frozenset({_NODE_ATTRIBUTE})):
                _walk_attribute(attribute.data, f"a node attribute of {where}")
        else:
            _walk_attribute(f.data, where)


def _walk_graph(buf: memoryview, where: str, found: list[ExternalTensor] | None) -> None:
    """Check a graph; ``found`` collects the main graph's external initializers (None: a
    nested graph, where none may be external)."""
    _walk_nodes(buf, where, _GRAPH_NODE, -1)
    for f in _messages(buf, where, frozenset({_GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER})):
        if f.number == _GRAPH_SPARSE_INITIALIZER:
            _walk_sparse(f.data, f"a sparse initializer of {where}")
        elif found is None:
            _refuse_nested(f.data, f"an initializer of {where}")
        else:
            tensor = _parse_tensor(f.data, where)
            if tensor.external:
                found.append(_external_tensor(tensor))


def external_tensors(model: FileBytes | memoryview) -> tuple[ExternalTensor, ...]:
    """Every tensor of ``model`` (serialized ModelProto) whose bytes live outside it.

    Raises ExternalDataError for a malformed model, for an external reference
    that is not a plain relative path inside the version, or for external data
    anywhere but the main graph's initializers.
    """
    # The scan's views into ``model`` die with its frames: re-raised from here, no
    # traceback keeps them, so a mapped ``model`` can be closed (released) at once.
    message = None
    try:
        return _scan_model(model)
    except ExternalDataError as exc:
        message = str(exc)
    raise ExternalDataError(message)


def _scan_model(model: FileBytes | memoryview) -> tuple[ExternalTensor, ...]:
    with memoryview(model) as buf:
        found: list[ExternalTensor] = []
        wanted = frozenset({_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS})
        for f in _messages(buf, "model", wanted):
            if f.number == _MODEL_GRAPH:
                _walk_graph(f.data, "the main graph", found)
            elif f.number == _MODEL_FUNCTIONS:
                _walk_nodes(f.data, "a model function", _FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO)
            else:
                for g in _messages(
                    f.data, "training info",
                    frozenset({_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM}),
                ):
                    _walk_graph(g.data, "a training graph", None)
        names = [t.name for t in found]
        for name in names:
            if names.count(name) > 1:
                raise ExternalDataError(f"tensor {name!r}: two external initializers share a name")
        return tuple(found)


def check_files(tensors: tuple[ExternalTensor, ...], file_sizes: Mapping[str, int]) -> None:
    """Each tensor's bytes lie inside a verified file (``file_sizes``: path -> size)."""
    for t in tensors:
        where = f"tensor {t.name!r}: external data location {t.location!r}"
        size = file_sizes.get(t.location)
        if size is None:
            raise ExternalDataError(
                f"{where} is not a file covered by the version's signature; refused"
            )
        length = size - t.offset if t.length is None else t.length
        if t.offset > size or length < 0 or t.offset + length > size:
            raise ExternalDataError(
                f"{where}: offset {t.offset} and length {length} lie outside the file "
                f"({size} bytes)"
            )
        if length != t.nbytes:
            raise ExternalDataError(
                f"{where}: {length} bytes, but dims {list(t.dims)} of data type {t.data_type} "
                f"take {t.nbytes}"
            )


def without_external_files(model: FileBytes | memoryview) -> bytes:
    """``model`` with every main-graph initializer's external reference replaced by
    STUB_LOCATION (call after external_tensors accepted it)."""
    with memoryview(model) as buf:
        out = bytearray()
        for f in _fields(buf, "model"):
            if f.number != _MODEL_GRAPH:
                out += buf[f.start : f.end]
                continue
            graph = bytearray()
            for g in _fields(f.data, "the main graph"):
                if g.number == _GRAPH_INITIALIZER and _parse_tensor(g.data, "").external:
                    graph += _len_field(_GRAPH_INITIALIZER, _stub_tensor(g.data, "the main graph"))
                else:
                    graph += f.data[g.start : g.end]
            out += _len_field(_MODEL_GRAPH, bytes(graph))
        return bytes(out)


class ModelBytes(bytes):
    """A model file's verified bytes, carrying the verified files its external data
    lives in (path relative to the version directory -> contents).

    A bytes subclass so that it passes through every reader typed to return a
    file's contents; ``onnx_runtime.OnnxSession`` looks for ``external_files``.
    """

    external_files: Mapping[str, FileBytes]

    def __new__(cls, data: FileBytes, external_files: Mapping[str, FileBytes]) -> ModelBytes:
        self = super().__new__(cls, data)
        self.external_files = external_files
        return self
