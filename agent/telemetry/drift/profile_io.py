"""Reference data sets in, ``drift_profile.json`` out (and back in).

Reads NumPy ``.npy`` / ``.npz`` and CSV files into per-tensor arrays (samples
first), and writes a profile into a model version directory atomically (temp
file, fsync, rename, fsync of the directory). The profile is a file of the
version directory, so the version's OMS signature covers it: sign the version
*after* profiling it. The agent reads it back through the same verified
reader it loads the model with (:func:`parse_profile`).

No protobuf, no onnxruntime: tensors are described by :class:`TensorInfo`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.telemetry.drift.profiles import (
    ProfileError,
    ReferenceProfile,
    profile_from_dict,
    profile_to_dict,
)

PROFILE_FILENAME = "drift_profile.json"
MAX_PROFILE_BYTES = 16 * 1024 * 1024

_NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
_COLUMN = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]\Z")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A model input or output: protocol datatype and per-sample dims (-1: dynamic)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(_NUMPY_DTYPES[self.datatype])

    @property
    def sample_size(self) -> int | None:
        return None if any(d < 0 for d in self.dims) else math.prod(self.dims)


# -- reading reference data -------------------------------------------------------------


def read_reference_data(
    path: Path, tensors: Sequence[TensorInfo], max_rows: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Arrays for the ``tensors`` found in ``path`` (samples first, cast to the tensor's dtype).

    * ``.npz``: one array per tensor, keyed by tensor name (others are ignored).
    * ``.npy``: one array; only for a single tensor.
    * ``.csv``: a header row; a column per tensor (``name``) or per element
      (``name[i]``, ``i`` the flat index within a sample); a single tensor may also
      take every column in order. Empty cells are missing (NaN for floats).
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            raw = _read_npz(path, tensors)
        elif suffix == ".npy":
            if len(tensors) != 1:
                names = ", ".join(t.name for t in tensors)
                raise ProfileError(
                    f"{path}: a .npy file holds one array but the model has {len(tensors)} "
                    f"inputs ({names}); use .npz with one array per input, or CSV"
                )
            raw = {tensors[0].name: np.load(path, allow_pickle=False)}
        elif suffix in (".csv", ".tsv", ".txt"):
            raw = _read_csv(path, tensors, "\t" if suffix == ".tsv" else ",")
        else:
            raise ProfileError(f"{path}: unknown data format (use .npy, .npz or .csv)")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    out: dict[str, npt.NDArray[Any]] = {}
    rows = None
    for t in tensors:
        if t.name not in raw:
            continue
        arr = _shape_samples(t, raw[t.name], path)
        if max_rows is not None:
            arr = arr[:max_rows]
        if rows is not None and arr.shape[0] != rows:
            raise ProfileError(
                f"{path}: tensor '{t.name}' has {arr.shape[0]} samples, others have {rows}"
            )
        rows = arr.shape[0]
        out[t.name] = arr
    return out


def _read_npz(path: Path, tensors: Sequence[TensorInfo]) -> dict[str, npt.NDArray[Any]]:
    with np.load(path, allow_pickle=False) as npz:
        wanted = {t.name for t in tensors}
        found = {k: np.asarray(npz[k]) for k in npz.files if k in wanted}
        if not found and len(tensors) == 1 and len(npz.files) == 1:
            found = {tensors[0].name: np.asarray(npz[npz.files[0]])}
        return found


def _shape_samples(t: TensorInfo, arr: npt.NDArray[Any], path: Path) -> npt.NDArray[Any]:
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ProfileError(f"{path}: tensor '{t.name}' has no samples")
    if t.datatype == "BYTES":
        arr = np.array(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
             for v in arr.reshape(-1).tolist()],
            dtype=object,
        ).reshape(arr.shape)
    else:
        try:
            arr = arr.astype(t.numpy_dtype, casting="unsafe")
        except (TypeError, ValueError) as exc:
            raise ProfileError(
                f"{path}: tensor '{t.name}': cannot make {t.datatype}: {exc}"
            ) from exc
    size = t.sample_size
    if size is not None:
        per_sample = math.prod(arr.shape[1:])
        if per_sample != size:
            raise ProfileError(
                f"{path}: tensor '{t.name}' needs {size} element(s) per sample "
                f"(dims {list(t.dims)}), the data has {per_sample} (shape {list(arr.shape)})"
            )
        arr = arr.reshape((arr.shape[0], *t.dims))
    return arr


def _read_csv(
    path: Path, tensors: Sequence[TensorInfo], delimiter: str
) -> dict[str, npt.NDArray[Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ProfileError(f"{path}: empty file") from None
        rows = [r for r in reader if r]
    if not rows:
        raise ProfileError(f"{path}: a header but no rows")
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ProfileError(f"{path}: row {i + 2} has {len(r)} cells, the header {len(header)}")
    columns = {h: j for j, h in enumerate(header)}
    out: dict[str, npt.NDArray[Any]] = {}
    for t in tensors:
        size = t.sample_size
        if t.name in columns and (size in (None, 1)):
            picks = [columns[t.name]]
        else:
            indexed = {
                int(m["index"]): j
                for j, h in enumerate(header)
                if (m := _COLUMN.match(h)) and m["name"] == t.name
            }
            if indexed:
                if size is None or sorted(indexed) != list(range(size)):
                    raise ProfileError(
                        f"{path}: columns {t.name}[i] must cover 0..{(size or 0) - 1} exactly"
                    )
                picks = [indexed[i] for i in range(size)]
            elif len(tensors) == 1 and (size is None or size == len(header)):
                picks = list(range(len(header)))
            else:
                continue
        cells = [[r[j] for j in picks] for r in rows]
        out[t.name] = _convert_cells(t, cells, path)
    if not out:
        names = ", ".join(t.name for t in tensors)
        raise ProfileError(f"{path}: no column matches a tensor ({names}); header: {header}")
    return out


def _convert_cells(t: TensorInfo, cells: list[list[str]], path: Path) -> npt.NDArray[Any]:
    if t.datatype == "BYTES":
        return np.array(cells, dtype=object)
    kind = t.numpy_dtype.kind
    try:
        if kind == "f":
            return np.array(
                [[float(c) if c.strip() else math.nan for c in r] for r in cells],
                dtype=np.float64,
            )
        if kind == "b":
            truthy = {"1", "true", "yes", "t", "y"}
            return np.array([[c.strip().lower() in truthy for c in r] for r in cells])
        return np.array([[int(c) for c in r] for r in cells], dtype=np.int64)
    except ValueError as exc:
        raise ProfileError(f"{path}: tensor '{t.name}' ({t.datatype}): {exc}") from None


# -- the profile file --------------------------------------------------------------------


def encode_profile(profile: ReferenceProfile) -> bytes:
    return json.dumps(profile_to_dict(profile), indent=1, allow_nan=False).encode() + b"\n"


def parse_profile(data: bytes, where: str = PROFILE_FILENAME) -> ReferenceProfile:
    """Validate and load profile bytes (as read, verified, from a version directory)."""
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{where}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProfileError(f"{where}: not UTF-8 JSON: {exc}") from None
    try:
        return profile_from_dict(raw)
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def write_profile(version_dir: Path, profile: ReferenceProfile) -> Path:
    """Write ``version_dir/drift_profile.json`` atomically and durably."""
    target = version_dir / PROFILE_FILENAME
    data = encode_profile(profile)
    fd, tmp = tempfile.mkstemp(prefix=".drift_profile.", suffix=".tmp", dir=version_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(version_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def read_profile(version_dir: Path) -> ReferenceProfile:
    """Read a version's profile without signature checks (tools and tests)."""
    path = version_dir / PROFILE_FILENAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror or exc}") from None
    return parse_profile(data, str(path))


