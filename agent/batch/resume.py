"""The durable record of a batch run: what it scores, and which batches are done.

The work directory (next to the output, so renames stay on one file system)
holds ``progress.json`` (the run's identity: the input file's size, mtime and
a hash of its first and last MiB; the model's verified digest; every setting
that changes the output) and one part file per finished input batch,
``part-<k>-<sha256>.arrow``: an Arrow IPC stream of the batch's output rows
whose schema metadata carries the rows set aside (``--rejects``), named with
the SHA-256 of its own bytes.

Parts are renamed into place whole but not fsynced: they only save work. A
SIGKILL loses nothing renamed (the page cache survives the process); after a
power cut, a part that did not reach the disk whole is found by its name's
digest not matching its bytes, and it and every later part are scored again.
The parts present and sound from 0 up are the batches done. The output and
the rejects file are fsynced before they are renamed into place.
A re-run with a different identity starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from agent.batch.convert import Rejection
from agent.common.durable import fsync_dir, remove_temporaries, write_atomically
from agent.errors import ConfigError

RECORD = "progress.json"
RECORD_FORMAT = 2
REJECTS_KEY = b"edge_agent.rejects"
_MIB = 1 << 20
_PART = re.compile(r"part-(\d{8})-([0-9a-f]{64})\.arrow\Z")
_OURS = re.compile(r"(part-\d{8}-[0-9a-f]{64}\.arrow|progress\.json|\.part-\d{8}\.tmp)\Z")


def input_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(st.st_size - _MIB, _MIB))
            digest.update(f.read(_MIB))
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head_tail_sha256": digest.hexdigest(),
    }


def _rejects_jsonl(rejects: list[Rejection], rows: Mapping[int, dict[str, Any]]) -> bytes:
    lines = []
    for r in rejects:
        entry: dict[str, Any] = {"row": r.row, "column": r.column, "error": r.reason}
        if r.text:
            entry["text"] = r.text
        if r.row is not None and r.row in rows:
            entry["values"] = rows[r.row]
        lines.append(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    return "".join(lines).encode()


def part_rejects(path: Path) -> bytes:
    """The rejected rows' JSON lines a part carries."""
    with pa.memory_map(str(path)) as source:
        metadata = ipc.open_stream(source).schema.metadata or {}
    return bytes(metadata.get(REJECTS_KEY, b""))


class WorkDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._parts: dict[int, Path] = {}

    def open(self, identity: Mapping[str, Any]) -> tuple[int, bool]:
        """Make the directory ready for a run with ``identity``: (batches done, whether
        the record was another run's and was cleared)."""
        record = {"format": RECORD_FORMAT, **identity}
        self.path.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.path)
        existing = self._read_record()
        cleared = existing is not None and existing != record
        if existing != record:
            self._clear()
            write_atomically(self.path / RECORD, json.dumps(record, sort_keys=True).encode())
            return 0, cleared
        found: dict[int, tuple[str, str]] = {}
        for name in os.listdir(self.path):
            m = _PART.fullmatch(name)
            if m:
                found[int(m.group(1))] = (name, m.group(2))
            elif name.endswith(".tmp"):
                os.unlink(self.path / name)  # a part being written when the run stopped
        done = 0
        while done in found:
            name, digest = found[done]
            if hashlib.sha256((self.path / name).read_bytes()).hexdigest() != digest:
                break  # never reached the disk whole (power cut): score it again
            self._parts[done] = self.path / name
            done += 1
        for index, (name, _) in found.items():
            if index >= done:
                os.unlink(self.path / name)
        fsync_dir(self.path)
        return done, False

    def _read_record(self) -> dict[str, Any] | None:
        try:
            value = json.loads((self.path / RECORD).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _clear(self) -> None:
        for name in os.listdir(self.path):
            if _OURS.fullmatch(name):
                os.unlink(self.path / name)
            else:
                raise ConfigError(
                    f"work directory {self.path} holds '{name}', which is not a batch part: "
                    "give another --work-dir"
                )

    def write_part(self, index: int, batch: pa.RecordBatch, rejects: list[Rejection],
                   rows: Mapping[int, dict[str, Any]]) -> None:
        schema = batch.schema
        if rejects:
            schema = schema.with_metadata({REJECTS_KEY: _rejects_jsonl(rejects, rows)})
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch.replace_schema_metadata(schema.metadata))
        data = sink.getvalue().to_pybytes()
        final = self.path / f"part-{index:08d}-{hashlib.sha256(data).hexdigest()}.arrow"
        tmp = self.path / f".part-{index:08d}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._parts[index] = final

    def parts(self, count: int) -> list[Path]:
        return [self._parts[i] for i in range(count)]

    def remove(self) -> None:
        for name in os.listdir(self.path):
            if _OURS.fullmatch(name):
                os.unlink(self.path / name)
        with contextlib.suppress(OSError):
            self.path.rmdir()
