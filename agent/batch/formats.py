"""Reading input files in fixed-size record batches, and writing the output file.

Every source yields batches of exactly ``size`` rows (the last one shorter),
whatever the file's own row groups or blocks are: batch ``k`` always holds the
same rows, which is what makes a resumed run write the same parts. Sources
start at any batch, skipping what is done cheaply where the format allows
(Parquet row groups, Arrow IPC record batches, NPY slices).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from agent.batch.convert import Rejection
from agent.errors import ConfigError, InvalidInputError

FORMATS = ("parquet", "csv", "arrow", "npy", "npz", "jsonl")
_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "arrow",
    ".feather": "arrow", ".ipc": "arrow", ".npy": "npy", ".npz": "npz", ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def detect_format(path: Path, given: str | None, default: str | None = None) -> str:
    if given:
        return "arrow" if given == "feather" else given
    found = _SUFFIXES.get(path.suffix.lower())
    if found is not None:
        return found
    if default is not None:
        return default
    raise ConfigError(
        f"cannot tell the format of {path} from its name: give --input-format "
        f"({', '.join(FORMATS)})"
    )


@dataclass
class Chunk:
    index: int  # batch number
    first_row: int  # input row number (from 0) of the batch's first row
    batch: pa.RecordBatch
    unreadable: list[Rejection] = field(default_factory=list)


class Source:
    """An input file: its schema, row count (if known) and batches."""

    schema: pa.Schema
    total_rows: int | None = None

    def fraction(self) -> float | None:
        """How much of the file was read (when the row count is unknown)."""
        return None

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _take(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


def rechunk(
    pieces: Iterable[tuple[pa.RecordBatch, list[Rejection]]],
    schema: pa.Schema,
    size: int,
    first_index: int,
) -> Iterator[Chunk]:
    """Batches of exactly ``size`` rows from ``pieces`` of any size; rows the reader
    could not read go with the next batch out (or a last, empty one)."""
    buffer: list[pa.RecordBatch] = []
    held = 0
    pending: list[Rejection] = []
    index = first_index
    for batch, unreadable in pieces:
        pending.extend(unreadable)
        if batch.num_rows:
            buffer.append(batch)
            held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(buffer, schema)
            yield Chunk(index, index * size, _one(table.slice(0, size), schema), pending)
            pending = []
            index += 1
            rest = table.slice(size)
            buffer = [b for b in rest.to_batches() if b.num_rows]
            held -= size
    if held or pending:
        table = pa.Table.from_batches(buffer, schema)
        yield Chunk(index, index * size, _one(table, schema), pending)


def _one(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    if not batches:
        return pa.RecordBatch.from_pylist([], schema)
    return batches[0]


class ParquetSource(Source):
    def __init__(self, path: Path) -> None:
        # No pre-buffering: it would read every requested row group up front, the
        # whole file, when memory must stay bounded by a few batches.
        self._file = pq.ParquetFile(path, memory_map=False, pre_buffer=False)
        self.schema = self._file.schema_arrow
        self.total_rows = self._file.metadata.num_rows

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        meta = self._file.metadata
        first_row = start * size
        group, group_start = 0, 0
        while group < meta.num_row_groups:
            rows = meta.row_group(group).num_rows
            if group_start + rows > first_row:
                break
            group_start += rows
            group += 1
        schema = _take(self.schema, columns)
        if group >= meta.num_row_groups:
            return
        to_skip = first_row - group_start

        def pieces() -> Iterator[tuple[pa.RecordBatch, list[Rejection]]]:
            nonlocal to_skip
            for g in range(group, meta.num_row_groups):  # one row group in memory at a time
                for b in self._file.iter_batches(
                    batch_size=size, row_groups=[g], columns=list(columns), use_threads=False,
                ):
                    if to_skip:
                        cut = min(to_skip, b.num_rows)
                        b = b.slice(cut)
                        to_skip -= cut
                    yield b, []

        yield from rechunk(pieces(), schema, size, start)

    def close(self) -> None:
        self._file.close()


class ArrowSource(Source):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._mm = pa.memory_map(str(path))
        try:
            self._reader: Any = ipc.open_file(self._mm)
            self._random = True
            self.total_rows = sum(
                self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)
            )
        except pa.ArrowInvalid:
            self._mm.seek(0)
            self._reader = ipc.open_stream(self._mm)
            self._random = False
        self.schema = self._reader.schema

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        schema = _take(self.schema, columns)
        to_skip = start * size

        def pieces() -> Iterator[tuple[pa.RecordBatch, list[Rejection]]]:
            nonlocal to_skip
            if self._random:
                stream: Iterable[pa.RecordBatch] = (
                    self._reader.get_batch(i) for i in range(self._reader.num_record_batches)
                )
            else:
                self._mm.seek(0)
                stream = ipc.open_stream(self._mm)
            for b in stream:
                if to_skip >= b.num_rows:
                    to_skip -= b.num_rows
                    continue
                b = b.slice(to_skip)
                to_skip = 0
                yield b.select(list(columns)), []

        yield from rechunk(pieces(), schema, size, start)

    def close(self) -> None:
        self._mm.close()


class CsvSource(Source):
    """CSV: every column is read as text and converted to the input's datatype (so a
    bad value is a bad row, not a failed file); kept columns stay text."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._size = max(path.stat().st_size, 1)
        self._file: IO[bytes] | None = None
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            names = next(csv.reader(f), [])
        if not names:
            raise InvalidInputError(f"{path}: no header line (CSV input needs column names)")
        self.schema = pa.schema([pa.field(n, pa.string()) for n in names])

    def fraction(self) -> float | None:
        if self._file is None or self._file.closed:
            return None
        return min(self._file.tell() / self._size, 1.0)

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        unreadable: list[Rejection] = []

        def invalid(row: Any) -> str:
            unreadable.append(Rejection(
                None, "", f"expected {row.expected_columns} fields, found {row.actual_columns}",
                row.text,
            ))
            return "skip"

        self._file = self._path.open("rb")
        reader = pacsv.open_csv(
            self._file,
            read_options=pacsv.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in self.schema.names},
                include_columns=list(columns), strings_can_be_null=False,
            ),
        )
        schema = _take(self.schema, columns)

        def pieces() -> Iterator[tuple[pa.RecordBatch, list[Rejection]]]:
            for b in reader:
                found = list(unreadable)
                unreadable.clear()
                yield b, found
            if unreadable:
                yield pa.RecordBatch.from_pylist([], schema), list(unreadable)

        # CSV cannot seek to a row: batches before ``start`` are read and dropped.
        for chunk in rechunk(pieces(), schema, size, 0):
            if chunk.index >= start:
                yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class JsonLinesSource(Source):
    """JSON Lines, one object a row (blank lines are no rows). The columns are the
    first row's keys; a line that is not a JSON object is an unreadable row."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._size = max(path.stat().st_size, 1)
        self._file: IO[bytes] | None = None
        first: dict[str, Any] | None = None
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    try:
                        value = json.loads(line)
                    except ValueError as exc:
                        raise InvalidInputError(f"row 0: not valid JSON: {exc}") from None
                    if isinstance(value, dict):
                        first = value
                    break
        fields = []
        for key, value in (first or {}).items():
            try:
                t = pa.array([value]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                t = pa.string()
            if pa.types.is_null(t):
                t = pa.string()
            fields.append(pa.field(key, t))
        self.schema = pa.schema(fields)

    def fraction(self) -> float | None:
        if self._file is None or self._file.closed:
            return None
        return min(self._file.tell() / self._size, 1.0)

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        schema = _take(self.schema, columns)
        self._file = self._path.open("rb")
        row = 0
        index = start
        lines: list[bytes] = []
        for line in self._file:
            if not line.strip():
                continue
            if row < start * size:
                row += 1  # done before: counted, not parsed
                continue
            lines.append(line)
            row += 1
            if len(lines) == size:
                yield self._chunk(lines, index, size, schema)
                lines = []
                index += 1
        if lines:
            yield self._chunk(lines, index, size, schema)

    def _chunk(self, lines: list[bytes], index: int, size: int, schema: pa.Schema) -> Chunk:
        first_row = index * size
        rejected: list[Rejection] = []
        rows: list[dict[str, Any] | None] = []
        for offset, line in enumerate(lines):
            try:
                value = json.loads(line)
            except ValueError as exc:
                value = exc
            if not isinstance(value, dict):
                why = f"not valid JSON: {value}" if isinstance(value, ValueError) else (
                    "not a JSON object")
                rejected.append(Rejection(first_row + offset, "", why,
                                          line.decode("utf-8", "replace").rstrip("\n")))
                rows.append(None)
                continue
            rows.append(value)
        arrays = []
        for f in schema:
            values = [r.get(f.name) if r is not None else None for r in rows]
            try:
                arrays.append(pa.array(values, f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                # Find the values that do not fit the column's type (as of the first row).
                fixed = []
                for offset, v in enumerate(values):
                    try:
                        pa.array([v], f.type)
                        fixed.append(v)
                    except (pa.ArrowInvalid, pa.ArrowTypeError):
                        rejected.append(Rejection(
                            first_row + offset, f.name,
                            f"{v!r:.60} does not fit the column's type {f.type} (from row 0)",
                        ))
                        fixed.append(None)
                arrays.append(pa.array(fixed, f.type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
        return Chunk(index, first_row, batch, rejected)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _array_column(values: np.ndarray[Any, Any]) -> pa.Array:
    rows = values.shape[0]
    if values.ndim == 1:
        return pa.array(values)
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), flat.size // rows if rows else
                                             int(np.prod(values.shape[1:])))


class NumpySource(Source):
    """NPY (memory-mapped: read a slice at a time) or NPZ (each array a column; an
    NPZ member is read whole, zip members cannot be mapped). A 2-D or larger
    array is a list column of each row's values, row-major."""

    def __init__(self, path: Path, npz: bool, single_name: str) -> None:
        if npz:
            with np.load(path, allow_pickle=False) as z:
                self._arrays = {k: z[k] for k in z.files}
        else:
            self._arrays = {single_name: np.load(path, mmap_mode="r", allow_pickle=False)}
        counts = {k: (a.shape[0] if a.ndim else 1) for k, a in self._arrays.items()}
        if len(set(counts.values())) > 1:
            raise InvalidInputError(
                f"{path}: the arrays have different row counts: "
                + ", ".join(f"{k}: {n}" for k, n in counts.items())
            )
        self.total_rows = next(iter(counts.values()), 0)
        fields = []
        for k, a in self._arrays.items():
            if a.dtype.kind in "OV":
                raise InvalidInputError(f"{path}: array '{k}' has dtype {a.dtype}, not numbers")
            fields.append(pa.field(k, _array_column(a[:0].reshape(0, *a.shape[1:])).type))
        self.schema = pa.schema(fields)

    def batches(self, size: int, start: int, columns: Sequence[str]) -> Iterator[Chunk]:
        schema = _take(self.schema, columns)
        total = self.total_rows or 0
        index = start
        while index * size < total:
            lo, hi = index * size, min((index + 1) * size, total)
            arrays = [_array_column(np.asarray(self._arrays[c][lo:hi])) for c in columns]
            yield Chunk(index, lo, pa.RecordBatch.from_arrays(arrays, schema=schema))
            index += 1


def open_source(path: Path, fmt: str, single_name: str) -> Source:
    try:
        if fmt == "parquet":
            return ParquetSource(path)
        if fmt == "arrow":
            return ArrowSource(path)
        if fmt == "csv":
            return CsvSource(path)
        if fmt == "jsonl":
            return JsonLinesSource(path)
        if fmt in ("npy", "npz"):
            return NumpySource(path, fmt == "npz", single_name)
    except FileNotFoundError:
        raise ConfigError(f"input file {path} does not exist") from None
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise InvalidInputError(f"{path}: cannot be read as {fmt}: {exc}") from None
    raise ConfigError(f"unknown input format '{fmt}' ({', '.join(FORMATS)})")


# --------------------------------------------------------------------------- output


def check_output(fmt: str, schema: pa.Schema) -> None:
    """Refuse now what the output format cannot hold (not after scoring everything)."""
    for f in schema:
        nested = pa.types.is_nested(f.type)
        if fmt == "csv" and nested:
            raise ConfigError(f"CSV output cannot hold column '{f.name}' ({f.type}): "
                              "choose parquet, arrow or jsonl")
        if fmt in ("npy", "npz") and (pa.types.is_string(f.type) or (
                nested and not pa.types.is_fixed_size_list(f.type))):
            raise ConfigError(f"{fmt.upper()} output cannot hold column '{f.name}' ({f.type})")
    if fmt == "npy" and len(schema) != 1:
        raise ConfigError(
            f"NPY output holds one array; this run writes {len(schema)} columns "
            f"({', '.join(schema.names)}): choose one with --outputs, drop --keep, or use npz"
        )


def read_part(path: Path) -> pa.Table:
    """A part's rows (the schema metadata, rejected rows, is not output)."""
    with pa.memory_map(str(path)) as source:
        return ipc.open_stream(source).read_all().replace_schema_metadata(None)


def _numpy_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray[Any, Any]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False)).reshape(-1, size)
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _npy(out: IO[bytes], field_: pa.Field, parts: Sequence[Path], rows: int) -> None:
    t = field_.type
    inner = t.value_type if pa.types.is_fixed_size_list(t) else t
    dtype = np.dtype(inner.to_pandas_dtype())
    shape = (rows, t.list_size) if pa.types.is_fixed_size_list(t) else (rows,)
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape},
    )
    for part in parts:
        values = _numpy_column(read_part(part).column(field_.name))
        out.write(np.ascontiguousarray(values, dtype=dtype).tobytes())


_ROW_GROUP_ROWS = 1 << 16


def _is_floating(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return bool(pa.types.is_floating(t))


def _grouped(parts: Sequence[Path], rows: int) -> Iterator[pa.Table]:
    """The parts' rows in tables of ``rows`` (the last shorter): few, large row groups."""
    held: list[pa.Table] = []
    count = 0
    for part in parts:
        table = read_part(part)
        held.append(table)
        count += table.num_rows
        while count >= rows:
            joined = pa.concat_tables(held)
            yield joined.slice(0, rows)
            rest = joined.slice(rows)
            held, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(held)


def write_output(
    fmt: str, out_path: Path, schema: pa.Schema, parts: Sequence[Path], rows: int
) -> None:
    """Write ``parts`` (Arrow IPC streams, in order) to ``out_path`` as ``fmt``."""
    if fmt == "parquet":
        # Dictionary encoding costs much and saves nothing on model scores (floats).
        dictionary = [f.name for f in schema if not _is_floating(f.type)]
        with pq.ParquetWriter(str(out_path), schema, use_dictionary=dictionary) as writer:
            for table in _grouped(parts, _ROW_GROUP_ROWS):
                writer.write_table(table, row_group_size=_ROW_GROUP_ROWS)
    elif fmt == "arrow":
        with pa.OSFile(str(out_path), "wb") as sink, ipc.new_file(sink, schema) as writer:
            for part in parts:
                for b in read_part(part).to_batches():
                    writer.write_batch(b)
    elif fmt == "csv":
        with pa.OSFile(str(out_path), "wb") as sink, pacsv.CSVWriter(sink, schema) as writer:
            for part in parts:
                writer.write_table(read_part(part))
    elif fmt == "jsonl":
        with out_path.open("w", encoding="utf-8", newline="\n") as text:
            for part in parts:
                for row in read_part(part).to_pylist():
                    text.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
    elif fmt == "npy":
        with out_path.open("wb") as f:
            _npy(f, schema.field(0), parts, rows)
    elif fmt == "npz":
        with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for f_ in schema:
                info = zipfile.ZipInfo(f_.name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with z.open(info, "w", force_zip64=True) as member:
                    _npy(member, f_, parts, rows)
    else:
        raise ConfigError(f"unknown output format '{fmt}' ({', '.join(FORMATS)})")
    with out_path.open("rb") as done:
        os.fsync(done.fileno())
