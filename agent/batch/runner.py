"""Drives one batch run: verified model, input batches, part files, the output.

Three threads share the work so that onnxruntime is never waiting on files: a
reader (read a batch, convert its columns to tensors, set bad rows aside), the
caller's thread (runs the model) and a writer (writes each batch's part
whole, by rename). Queues between them hold two batches each, so memory stays bounded
by a few batches whatever the size of the file.
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from agent.batch import formats
from agent.batch.convert import (
    Rejection,
    columns_of,
    from_output,
    output_fields,
    to_tensor,
)
from agent.batch.plan import InputBinding, OutputBinding, bind_inputs, bind_outputs, parse_maps
from agent.batch.progress import Progress
from agent.batch.resume import WorkDir, input_identity, part_rejects
from agent.common.buffers import FileBytes, as_bytes
from agent.common.durable import fsync_dir
from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError, InferenceFailedError, InvalidInputError
from agent.serving.model_config import parse_config_pbtxt
from agent.serving.model_manager import ModelReader
from agent.serving.onnx_runtime import OnnxSession, SessionOptions, runtime_version
from agent.serving.repository import read_model, select_versions
from agent.wire import model_config_pb2 as mc

_QUEUE = 2
_Array = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class BatchOptions:
    model: str
    input: Path
    output: Path
    version: int | None = None
    repository: Path | None = None
    input_format: str | None = None
    output_format: str | None = None
    maps: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    batch_size: int = 4096
    threads: int | None = None  # None: the config's runtime.intra_op_threads
    rejects: Path | None = None
    work_dir: Path | None = None
    allow_unsigned: bool = False
    progress: str = "auto"  # auto (bar on a terminal), bar, plain, none


@dataclass(frozen=True, slots=True)
class BatchResult:
    rows_in: int  # rows read in this run (not those done before it)
    rows_out: int
    rejected: int
    batches: int  # batches in the whole input
    resumed_at: int  # batches already done when this run started
    seconds: float
    interrupted: bool = False


class BatchInterrupted(AgentError):
    code = "interrupted"


@dataclass(slots=True)
class _Model:
    session: OnnxSession
    name: str
    version: int
    digest: str
    signed: bool


def _unsigned_reader(version_dir: Path, filename: str) -> bytes:
    return (version_dir / filename).read_bytes()


def load_model(options: BatchOptions, config: AgentConfig, threads: int) -> _Model:
    """The model version through the serving path: signature-verified bytes."""
    if options.allow_unsigned and not config.signing.allow_unsigned_models:
        raise ConfigError(
            "--allow-unsigned needs 'signing.allow_unsigned_models = true' in the agent config "
            f"({config.source}); without it only signed models are scored"
        )
    root = options.repository or Path(config.repository.path)
    entry = read_model(root, options.model)
    declared = (
        parse_config_pbtxt(entry.config_text, str(entry.path / "config.pbtxt"))
        if entry.config_text is not None else mc.ModelConfig()
    )
    if options.version is not None:
        if options.version not in entry.versions:
            raise ConfigError(f"model '{options.model}' has no version {options.version} "
                              f"(versions: {', '.join(map(str, entry.versions)) or 'none'})")
        version = options.version
    else:
        chosen = select_versions(declared.version_policy, entry.versions)
        if not chosen:
            raise ConfigError(f"model '{options.model}' has no version to score with")
        version = chosen[-1]
    reader: ModelReader
    if options.allow_unsigned:
        reader = _unsigned_reader
    else:
        from agent.serving.signed_reader import signed_reader

        reader = signed_reader(Path(config.signing.trust_dir))
    filename = declared.default_model_filename or "model.onnx"
    model_bytes: FileBytes = reader(entry.path / str(version), filename)
    digest = hashlib.sha256(as_bytes(model_bytes)).hexdigest()
    runtime = config.runtime
    session = OnnxSession(model_bytes, SessionOptions(
        intra_op_threads=threads, inter_op_threads=runtime.inter_op_threads,
        graph_optimization=runtime.graph_optimization,
        execution_providers=runtime.execution_providers,
    ))
    return _Model(session, options.model, version, digest, not options.allow_unsigned)


@dataclass(slots=True)
class _Scored:
    index: int
    batch: pa.RecordBatch
    rejects: list[Rejection]
    rows: dict[int, dict[str, Any]]
    rows_in: int


@dataclass(slots=True)
class _Prepared:
    index: int
    feeds: dict[str, _Array]
    kept: pa.RecordBatch
    rejects: list[Rejection]
    rows: dict[int, dict[str, Any]]  # rejected rows' values, for the rejects file
    rows_in: int


def _prepare(chunk: formats.Chunk, inputs: list[InputBinding], keep: tuple[str, ...],
             set_aside: bool) -> _Prepared:
    batch = chunk.batch
    rejects = list(chunk.unreadable)
    feeds: dict[str, _Array] = {}
    bad: dict[int, tuple[str, str]] = {}
    for binding in inputs:
        values, problems = to_tensor(batch, binding)
        feeds[binding.input] = values
        for row, column, reason in problems:
            bad.setdefault(row, (column, f"{reason} (input '{binding.input}')"))
    for r in rejects:
        if r.row is not None:  # a JSON line that did not parse: null in every column
            bad.pop(r.row - chunk.first_row, None)
    unreadable_rows = {r.row - chunk.first_row for r in rejects if r.row is not None}
    drop = sorted(set(bad) | unreadable_rows)
    rows: dict[int, dict[str, Any]] = {}
    for i in sorted(bad):
        rejects.append(Rejection(chunk.first_row + i, bad[i][0], bad[i][1]))
    rejects.sort(key=lambda r: (-1 if r.row is None else r.row))
    if rejects and not set_aside:
        raise InvalidInputError(
            rejects[0].message() + " (give --rejects FILE to set bad rows aside and go on)"
        )
    if drop:
        for i in bad:
            rows[chunk.first_row + i] = batch.slice(i, 1).to_pylist()[0]
        mask = np.ones(batch.num_rows, dtype=bool)
        mask[drop] = False
        feeds = {k: v[mask] for k, v in feeds.items()}
        batch = batch.filter(pa.array(mask))
    kept = batch.select(list(keep))
    return _Prepared(chunk.index, feeds, kept, rejects, rows, chunk.batch.num_rows)


def _score(
    model: _Model, prepared: _Prepared, outputs: list[OutputBinding], schema: pa.Schema
) -> pa.RecordBatch:
    rows = prepared.kept.num_rows
    if rows == 0:
        return pa.RecordBatch.from_pylist([], schema)
    names = [o.output for o in outputs]
    try:
        results = model.session.run(names, prepared.feeds)
    except Exception as exc:  # onnxruntime's own untyped errors
        first = prepared.index
        raise InferenceFailedError(
            f"the model failed on input batch {first} ({rows} rows): {exc}"
        ) from exc
    arrays: list[pa.Array] = list(prepared.kept.columns)
    for binding, values in zip(outputs, results, strict=True):
        arrays.extend(from_output(np.asarray(values), binding))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class _Stage(threading.Thread):
    """A daemon thread running ``work``; its failure is kept for the caller."""

    def __init__(self, name: str, work: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:
            self.error = exc


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def run(options: BatchOptions, config: AgentConfig, err: TextIO = sys.stderr) -> BatchResult:
    started = time.monotonic()
    if options.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    threads = options.threads if options.threads is not None else config.runtime.intra_op_threads
    in_fmt = formats.detect_format(options.input, options.input_format)
    out_fmt = formats.detect_format(options.output, options.output_format, default="parquet")
    model = load_model(options, config, threads)
    session = model.session
    single = session.inputs[0].name if len(session.inputs) == 1 else "array"
    source = formats.open_source(options.input, in_fmt, single)
    try:
        columns = columns_of(source.schema)
        inputs = bind_inputs(session.inputs, columns, parse_maps(options.maps))
        missing = [k for k in options.keep if k not in columns]
        if missing:
            raise InvalidInputError(f"--keep: column '{missing[0]}' is not in the input file")
        outputs = bind_outputs(session.outputs, options.outputs, out_fmt == "csv", options.keep)
        schema = pa.schema([source.schema.field(k) for k in options.keep]
                           + output_fields(outputs))
        formats.check_output(out_fmt, schema)
        needed = list(dict.fromkeys([*options.keep, *(c for b in inputs for c in b.columns)]))
        identity = {
            "input": {**input_identity(options.input), "format": in_fmt},
            "model": {"name": model.name, "version": model.version, "sha256": model.digest,
                      "signed": model.signed},
            "onnxruntime": runtime_version(),
            "settings": {
                "batch_size": options.batch_size, "threads": threads,
                "inputs": {b.input: list(b.columns) for b in inputs},
                "outputs": [o.output for o in outputs], "keep": list(options.keep),
                "output_format": out_fmt, "output": str(options.output.resolve()),
                "rejects": str(options.rejects.resolve()) if options.rejects else None,
            },
        }
        work = WorkDir(options.work_dir or options.output.parent / f".{options.output.name}.batch")
        done, cleared = work.open(identity)
        progress = Progress(err, source.total_rows, options.progress)
        if cleared:
            progress.message(f"{work.path} held another run's parts (input, model or settings "
                             "changed): starting over")
        if done:
            progress.message(f"resuming after {done} finished batch(es) "
                             f"({done * options.batch_size:,} rows)")
        progress.begin(done * options.batch_size if source.total_rows is not None else 0)
        result = _pipeline(model, source, options, inputs, outputs, schema, needed, work, done,
                           progress)
        if result.interrupted:
            progress.message(f"interrupted after batch {result.batches - 1}; run the same "
                             "command again to resume")
            return BatchResult(result.rows_in, result.rows_out, result.rejected, result.batches,
                               done, time.monotonic() - started, True)
        _finalize(work, result.batches, out_fmt, options, schema)
        return BatchResult(result.rows_in, result.rows_out, result.rejected, result.batches, done,
                           time.monotonic() - started)
    finally:
        source.close()


def _pipeline(
    model: _Model, source: formats.Source, options: BatchOptions, inputs: list[InputBinding],
    outputs: list[OutputBinding], schema: pa.Schema, needed: list[str], work: WorkDir,
    done: int, progress: Progress,
) -> BatchResult:
    stop = threading.Event()
    prepared_q: queue.Queue[_Prepared | None] = queue.Queue(_QUEUE)
    scored_q: queue.Queue[_Scored | None] = queue.Queue(_QUEUE)
    counts = {"rows_in": 0, "rows_out": 0, "rejected": 0, "next": done}
    base_rows = done * options.batch_size if source.total_rows is not None else 0

    def read() -> None:
        try:
            for chunk in source.batches(options.batch_size, done, needed):
                item = _prepare(chunk, inputs, options.keep, options.rejects is not None)
                if not _put(prepared_q, item, stop):
                    return
        finally:
            _put(prepared_q, None, stop)

    def write() -> None:
        while True:
            item = scored_q.get()
            if item is None:
                return
            work.write_part(item.index, item.batch, item.rejects, item.rows)
            counts["rows_in"] += item.rows_in
            counts["rows_out"] += item.batch.num_rows
            counts["rejected"] += len(item.rejects)
            counts["next"] = item.index + 1
            progress.update(base_rows + counts["rows_in"], source.fraction())

    reader = _Stage("batch-read", read)
    writer = _Stage("batch-write", write)
    reader.start()
    writer.start()
    interrupted = False
    try:
        while writer.is_alive():
            try:
                item = prepared_q.get(timeout=0.2)
            except queue.Empty:
                if not reader.is_alive() and prepared_q.empty():
                    break
                continue
            if item is None:
                break
            scored = _Scored(item.index, _score(model, item, outputs, schema), item.rejects,
                             item.rows, item.rows_in)
            scored_q.put(scored)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        # The writer finishes what was scored (each part is whole or absent anyway).
        scored_q.put(None)
        try:
            writer.join()
        except KeyboardInterrupt:
            interrupted = True
            writer.join()
        reader.join(timeout=5)
    for stage in (reader, writer):
        if stage.error is not None and not interrupted:
            raise stage.error
    progress.update(base_rows + counts["rows_in"], source.fraction(), final=True)
    return BatchResult(counts["rows_in"], counts["rows_out"], counts["rejected"], counts["next"],
                       done, 0.0, interrupted)


def _finalize(work: WorkDir, batches: int, fmt: str, options: BatchOptions,
              schema: pa.Schema) -> None:
    """Parts -> output file (and rejects file), each atomically; then the parts go."""
    parts = work.parts(batches)
    rows = 0
    if fmt in ("npy", "npz"):
        rows = sum(formats.read_part(p).num_rows for p in parts)
    if options.rejects is not None:
        _atomic(options.rejects, lambda tmp: _concat(parts, tmp))
    _atomic(options.output, lambda tmp: formats.write_output(fmt, tmp, schema, parts, rows))
    work.remove()


def _concat(parts: list[Path], dest: Path) -> None:
    with dest.open("wb") as out:
        for part in parts:
            out.write(part_rejects(part))
        out.flush()
        os.fsync(out.fileno())


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
