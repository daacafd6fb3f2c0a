"""The durable record of a batch run: what it scores, and which batches are done.

The work directory (next to the output, so renames stay on one file system)
holds ``progress.json`` (the run's identity: the input file's size, mtime and
a hash of its first and last MiB; the model's verified digest; every setting
that changes the output) and one part file per finished input batch
(``part-<k>.arrow``, with ``rejects-<k>.jsonl`` before it when rows were set
aside). Each file is written to a temporary name, fsynced and renamed, so a
part exists whole or not at all; the parts present from 0 up are the batches
done. A re-run with a different identity starts over.
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
RECORD_FORMAT = 1
_MIB = 1 << 20
_OURS = re.compile(r"(part-\d{8}\.arrow|rejects-\d{8}\.jsonl|progress\.json)(\.tmp)?\Z")


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


def part_name(index: int) -> str:
    return f"part-{index:08d}.arrow"


def rejects_name(index: int) -> str:
    return f"rejects-{index:08d}.jsonl"


class WorkDir:
    def __init__(self, path: Path) -> None:
        self.path = path

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
        done = 0
        while (self.path / part_name(done)).exists():
            done += 1
        for name in os.listdir(self.path):  # leftovers of an interrupted write
            m = re.fullmatch(r"(?:part|rejects)-(\d{8})\.\w+(\.tmp)?", name)
            if m and (m.group(2) or int(m.group(1)) >= done):
                os.unlink(self.path / name)
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
        if rejects:
            lines = []
            for r in rejects:
                entry: dict[str, Any] = {"row": r.row, "column": r.column, "error": r.reason}
                if r.text:
                    entry["text"] = r.text
                if r.row is not None and r.row in rows:
                    entry["values"] = rows[r.row]
                lines.append(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            write_atomically(self.path / rejects_name(index), "".join(lines).encode())
        tmp = self.path / (part_name(index) + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / part_name(index))
        fsync_dir(self.path)

    def parts(self, count: int) -> list[Path]:
        return [self.path / part_name(i) for i in range(count)]

    def rejects(self, count: int) -> list[Path]:
        return [p for i in range(count) if (p := self.path / rejects_name(i)).exists()]

    def remove(self) -> None:
        for name in os.listdir(self.path):
            if _OURS.fullmatch(name):
                os.unlink(self.path / name)
        with contextlib.suppress(OSError):
            self.path.rmdir()
