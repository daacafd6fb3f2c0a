"""Arrow columns to model tensors and model outputs to Arrow columns.

Conversion is vectorised; only when a column fails to convert are its values
looked at one by one, to name the rows at fault (the others still score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from agent.batch.plan import LIST, OTHER, SCALAR, Column, InputBinding, OutputBinding
from agent.errors import InvalidInputError
from agent.serving.datatypes import NUMPY_DTYPES

Array = np.ndarray[Any, Any]

ARROW_TYPES: dict[str, pa.DataType] = {
    "BOOL": pa.bool_(),
    "UINT8": pa.uint8(),
    "UINT16": pa.uint16(),
    "UINT32": pa.uint32(),
    "UINT64": pa.uint64(),
    "INT8": pa.int8(),
    "INT16": pa.int16(),
    "INT32": pa.int32(),
    "INT64": pa.int64(),
    "FP16": pa.float16(),
    "FP32": pa.float32(),
    "FP64": pa.float64(),
    "BYTES": pa.string(),
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Row ``row`` (numbered from 0 in the input) cannot be scored: ``column`` and why.
    ``row`` is None for a row the file's parser could not read at all (``text``)."""

    row: int | None
    column: str
    reason: str
    text: str = ""

    def message(self) -> str:
        if self.row is None:
            return f"unreadable row {self.text[:200]!r}: {self.reason}"
        return f"row {self.row}, column '{self.column}': {self.reason}"


def column_kind(field: pa.Field) -> Column:
    t = field.type
    if pa.types.is_fixed_size_list(t):
        return Column(field.name, LIST, t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return Column(field.name, LIST)
    if pa.types.is_nested(t) or pa.types.is_dictionary(t):
        return Column(field.name, OTHER)
    return Column(field.name, SCALAR)


def columns_of(schema: pa.Schema) -> dict[str, Column]:
    return {f.name: column_kind(f) for f in schema}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalars(arr: pa.Array, datatype: str, what: str) -> tuple[Array, dict[int, str]]:
    """``arr`` as a NumPy array of ``datatype``; bad elements zeroed, with their reasons."""
    target = ARROW_TYPES[datatype]
    dtype = NUMPY_DTYPES[datatype]
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    bad: dict[int, str] = {}
    if arr.null_count:
        nulls = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
        bad.update((int(i), "missing value (null)") for i in nulls)
    if datatype == "BYTES":
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
            arr = pc.cast(arr, pa.string())
        values = arr.to_numpy(zero_copy_only=False).astype(object)
        for i in bad:
            values[i] = ""
        return values, bad
    if arr.type != target:
        try:
            cast = pc.cast(arr, target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            cast = _cast_each(arr, target, datatype, what, bad)
        arr = cast
    if arr.null_count:
        arr = arr.fill_null(pa.scalar(0 if datatype != "BOOL" else False, target))
    values = arr.to_numpy(zero_copy_only=False)
    if values.dtype != dtype:
        values = values.astype(dtype)
    return values, bad


def _cast_each(
    arr: pa.Array, target: pa.DataType, datatype: str, what: str, bad: dict[int, str]
) -> pa.Array:
    # The slow path, on a column that failed: find which values do not convert.
    out = []
    for i in range(len(arr)):
        item = arr.slice(i, 1)
        if i in bad:
            out.append(pa.nulls(1, target))
            continue
        try:
            out.append(pc.cast(item, target, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            value = item[0].as_py()
            bad[i] = f"{_describe(value)} is not a valid {datatype} value{what}"
            out.append(pa.nulls(1, target))
    return pa.concat_arrays(out) if out else pa.array([], target)


def _from_list(arr: pa.Array, binding: InputBinding, column: str) -> tuple[Array, dict[int, str]]:
    n = len(arr)
    size = binding.row_size
    bad: dict[int, str] = {}
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(lengths != size):
        length = int(lengths[i])
        bad[int(i)] = (
            "missing value (null)" if length < 0
            else f"holds {length} values, the input needs {size}"
        )
    good = np.flatnonzero(lengths == size)
    subset = arr if len(good) == n else arr.take(pa.array(good))
    flat, bad_elements = _scalars(subset.flatten(), binding.datatype, "")
    if len(good) == n and not bad_elements:
        return flat.reshape(n, size), bad  # the common case: no copy
    out = np.zeros((n, size), dtype=NUMPY_DTYPES[binding.datatype])
    if binding.datatype == "BYTES":
        out[:] = ""
    if len(good):
        out[good] = flat.reshape(len(good), size)
    for element, reason in bad_elements.items():
        row = int(good[element // size])
        bad.setdefault(row, f"element {element % size}: {reason}")
    return out, bad


def to_tensor(
    batch: pa.RecordBatch, binding: InputBinding
) -> tuple[Array, list[tuple[int, str, str]]]:
    """The tensor for ``binding`` from ``batch``, and its bad rows as
    (row in batch, column, reason); bad rows hold zeros."""
    n = batch.num_rows
    problems: list[tuple[int, str, str]] = []
    if binding.from_list:
        name = binding.columns[0]
        values, bad = _from_list(batch.column(name), binding, name)
        problems.extend((r, name, why) for r, why in bad.items())
    elif len(binding.columns) == 1:
        name = binding.columns[0]
        values, bad = _scalars(batch.column(name), binding.datatype, "")
        problems.extend((r, name, why) for r, why in bad.items())
    else:
        values = np.empty((n, len(binding.columns)), dtype=NUMPY_DTYPES[binding.datatype])
        for j, name in enumerate(binding.columns):
            column, bad = _scalars(batch.column(name), binding.datatype, "")
            values[:, j] = column
            problems.extend((r, name, why) for r, why in bad.items())
    return values.reshape((n, *binding.row_shape)), problems


def output_type(binding: OutputBinding) -> pa.DataType:
    base = ARROW_TYPES[binding.datatype]
    size = binding.row_size
    if binding.expanded or size == 1:
        return base
    if size is not None:
        return pa.list_(base, size)  # fixed-size list
    return pa.list_(base)


def output_fields(bindings: Sequence[OutputBinding]) -> list[pa.Field]:
    fields: list[pa.Field] = []
    for b in bindings:
        t = output_type(b)
        fields.extend(pa.field(c, t) for c in b.columns)
    return fields


def _arrow_values(values: Array, datatype: str) -> pa.Array:
    if datatype == "BYTES":
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                 for v in values.reshape(-1)]
        return pa.array(items, pa.string())
    return pa.array(values.reshape(-1), ARROW_TYPES[datatype])


def from_output(values: Array, binding: OutputBinding) -> list[pa.Array]:
    """The column(s) of one output, ``values`` of shape [rows, ...]."""
    rows = values.shape[0] if values.ndim else 1
    per_row = values.reshape(rows, -1) if rows else values.reshape(0, max(binding.row_size or 0, 0))
    if binding.expanded:
        return [_arrow_values(np.ascontiguousarray(per_row[:, j]), binding.datatype)
                for j in range(per_row.shape[1])]
    size = binding.row_size
    flat = _arrow_values(np.ascontiguousarray(per_row), binding.datatype)
    if size == 1:
        return [flat]
    if size is not None:
        if per_row.shape[1] != size:
            raise InvalidInputError(
                f"output '{binding.output}' has {per_row.shape[1]} values a row, the graph "
                f"declares {size}"
            )
        return [pa.FixedSizeListArray.from_arrays(flat, size)]
    width = per_row.shape[1]
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, pa.int32())
    return [pa.ListArray.from_arrays(offsets, flat)]
