"""KServe v2 tensor datatypes: names, NumPy dtypes and the BYTES wire encoding.

Pure: no I/O. The BYTES encoding is the protocol's: each element is a 4-byte
little-endian length followed by that many bytes.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from agent.errors import InvalidInputError

BYTES = "BYTES"

# Triton datatype name -> NumPy dtype. BYTES maps to object arrays of bytes.
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(np.object_),
}

# Element size in bytes on the wire; BYTES has none (variable length).
ITEM_SIZES: dict[str, int] = {
    name: dt.itemsize for name, dt in NUMPY_DTYPES.items() if name != BYTES
}

# model_config.proto DataType enum names <-> protocol datatype names.
_CONFIG_TO_WIRE = {f"TYPE_{name}": name for name in NUMPY_DTYPES if name != BYTES}
_CONFIG_TO_WIRE["TYPE_STRING"] = BYTES
_WIRE_TO_CONFIG = {wire: cfg for cfg, wire in _CONFIG_TO_WIRE.items()}

_LENGTH = struct.Struct("<I")


def wire_from_config_type(config_type_name: str) -> str:
    """``TYPE_FP32`` -> ``FP32``; ``TYPE_STRING`` -> ``BYTES``."""
    try:
        return _CONFIG_TO_WIRE[config_type_name]
    except KeyError:
        raise ValueError(f"unsupported data_type {config_type_name}") from None


def config_type_from_wire(datatype: str) -> str:
    """``FP32`` -> ``TYPE_FP32``; ``BYTES`` -> ``TYPE_STRING``."""
    return _WIRE_TO_CONFIG[datatype]


def as_text(name: str, index: int, data: bytes) -> str:
    """onnxruntime string tensors take Python ``str`` (it would ``str()`` bytes objects)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"input '{name}': BYTES element {index} is not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start}); ONNX string tensors carry text"
        ) from None


def decode_bytes_tensor(name: str, raw: bytes | memoryview, count: int) -> npt.NDArray[np.object_]:
    """Split length-prefixed BYTES elements into text; exactly ``count`` must fill ``raw``."""
    out = np.empty(count, dtype=np.object_)
    view = memoryview(raw)
    offset = 0
    end = len(raw)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInputError(
                f"input '{name}': BYTES data ends after {i} of {count} elements "
                f"(no room for element {i}'s 4-byte length prefix)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInputError(
                f"input '{name}': BYTES element {i} declares {length} bytes but only "
                f"{end - offset} remain"
            )
        out[i] = as_text(name, i, view[offset : offset + length].tobytes())
        offset += length
    if offset != end:
        raise InvalidInputError(
            f"input '{name}': {end - offset} bytes left over after {count} BYTES elements"
        )
    return out


def encode_bytes_tensor(array: npt.NDArray[np.generic]) -> bytes:
    """Length-prefix every element (bytes, or str encoded as UTF-8) in C order."""
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
        append(_LENGTH.pack(len(data)))
        append(data)
    return b"".join(parts)
