"""Reference profiles: what a model version's inputs and outputs looked like.

Pure: NumPy in, dataclasses and plain dicts out; no I/O, no clock, no threads.
A profile describes each feature (one column of a tensor, or a whole tensor
pooled when it has too many elements per sample to profile column by column):
numeric features by quantile bin edges (a coarse binning for PSI and the
Jensen-Shannon distance, a fine one for KS and Wasserstein-1; every coarse edge
is also a fine edge), proportions, mean, std, min, max and missing rate;
categorical features by the frequencies of their most common categories.
:mod:`agent.telemetry.drift.statistics` compares live windows against them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

PROFILE_SCHEMA = "edge.drift_profile"
PROFILE_VERSION = 1
PSI_EPSILON = 1e-4
# Extra fine edges in the tails, where equal-mass bins are widest: they keep the
# binned Wasserstein-1 close to the exact one for long-tailed data.
TAIL_QUANTILES = (0.001, 0.002, 0.005, 0.995, 0.998, 0.999)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Status = Literal["ok", "warn", "drift", "insufficient_data"]
SEVERITY_RANK: dict[str, int] = {"insufficient_data": -1, "ok": 0, "warn": 1, "drift": 2}

# Limits when reading a profile (it is signed, but a wrong one must not exhaust memory).
MAX_TENSORS = 256
MAX_FEATURES = 4096
MAX_EDGES = 10_001
MAX_CATEGORIES = 10_000


class ProfileError(ValueError):
    """A reference profile (or the data to build one) is malformed; the message says where."""


# -- options and thresholds ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    bins: int = 10  # coarse quantile bins (PSI, Jensen-Shannon)
    fine_bins: int = 100  # fine quantile bins (KS, Wasserstein); a multiple of ``bins``
    max_categories: int = 50  # categories kept per categorical feature; the rest are "other"
    categorical_max_distinct: int = 20  # integer features with at most this many values
    max_features_per_tensor: int = 64  # above this many elements per sample: pooled
    max_pooled_values: int = 4096  # pooled tensors: elements taken per sample (strided)

    def __post_init__(self) -> None:
        if self.bins < 1 or self.fine_bins < self.bins or self.fine_bins % self.bins:
            raise ProfileError(
                f"fine_bins ({self.fine_bins}) must be a positive multiple of bins ({self.bins})"
            )
        if self.fine_bins > MAX_EDGES - 1:
            raise ProfileError(f"fine_bins must be at most {MAX_EDGES - 1}")
        if not 1 <= self.max_categories <= MAX_CATEGORIES:
            raise ProfileError(f"max_categories must be in 1..{MAX_CATEGORIES}")
        if self.categorical_max_distinct < 0 or self.max_features_per_tensor < 1:
            raise ProfileError("categorical_max_distinct >= 0 and max_features_per_tensor >= 1")
        if self.max_pooled_values < 1:
            raise ProfileError("max_pooled_values must be at least 1")


@dataclass(frozen=True, slots=True)
class Band:
    """A metric at or above ``warn`` is a warning, at or above ``drift`` is drift."""

    warn: float
    drift: float

    def __post_init__(self) -> None:
        if not (0 <= self.warn <= self.drift) or not math.isfinite(self.drift):
            raise ValueError(f"thresholds need 0 <= warn <= drift (got {self.warn}, {self.drift})")

    def level(self, value: float | None) -> int:
        if value is None:
            return 0
        if value >= self.drift:
            return 2
        if value >= self.warn:
            return 1
        return 0


METRICS = ("psi", "js", "ks", "wasserstein", "missing_rate", "out_of_range")


@dataclass(frozen=True, slots=True)
class DriftThresholds:
    """Per-metric bands (``None``: reported, never flagged) and the smallest window judged.

    ``missing_rate`` applies to the *increase* of the missing rate over the
    reference's; ``wasserstein`` to W1 divided by the reference std.
    """

    psi: Band | None = Band(0.1, 0.2)
    js: Band | None = Band(0.1, 0.2)
    ks: Band | None = Band(0.1, 0.2)
    wasserstein: Band | None = Band(0.1, 0.2)
    missing_rate: Band | None = Band(0.05, 0.1)
    out_of_range: Band | None = Band(0.05, 0.1)
    min_samples: int = 500

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min_samples": self.min_samples}
        for name in METRICS:
            band: Band | None = getattr(self, name)
            out[name] = None if band is None else [band.warn, band.drift]
        return out


# -- reference profile -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NumericReference:
    name: str
    index: int | None  # column within the sample; None: pooled over the whole tensor
    count: int  # finite reference values
    missing_rate: float
    mean: float
    std: float
    min: float
    max: float
    edges: FloatArray  # coarse quantile edges, strictly increasing (or [v, v])
    proportions: FloatArray  # len(edges) - 1
    fine_edges: FloatArray
    fine_proportions: FloatArray  # len(fine_edges) - 1
    fine_means: FloatArray  # mean of the reference values in each fine bin (midpoint if empty)
    coarse_of_fine: IntArray = field(repr=False, compare=False)  # fine cell -> coarse bin

    kind: Literal["numeric"] = "numeric"


@dataclass(frozen=True, slots=True)
class CategoricalReference:
    name: str
    index: int | None
    count: int  # non-missing reference values
    missing_rate: float
    categories: tuple[str, ...]
    frequencies: FloatArray  # len(categories) + 1: the last entry is every other value
    lookup: dict[str, int] = field(repr=False, compare=False)

    kind: Literal["categorical"] = "categorical"


FeatureReference = NumericReference | CategoricalReference


@dataclass(frozen=True, slots=True)
class TensorReference:
    name: str
    role: Literal["input", "output"]
    datatype: str
    sample_size: int  # elements per sample (0: variable)
    pooled: bool  # one feature over all of a sample's elements
    features: tuple[FeatureReference, ...]


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    model: str
    model_version: str
    samples: int
    created_at: float
    options: ProfileOptions
    tensors: tuple[TensorReference, ...]

    def tensor(self, name: str, role: str) -> TensorReference | None:
        for t in self.tensors:
            if t.name == name and t.role == role:
                return t
        return None


# -- binning -----------------------------------------------------------------------


def cell_index(edges: FloatArray, values: FloatArray) -> IntArray:
    """The cell of each finite value, out of len(edges) + 1 cells.

    Cell 0 holds values below ``edges[0]``; cell i (1 <= i < len(edges)) holds
    ``[edges[i-1], edges[i])`` with the last one closed; cell len(edges) holds
    values above ``edges[-1]``.
    """
    idx = np.searchsorted(edges, values, side="right")
    idx[values == edges[-1]] = len(edges) - 1
    return idx.astype(np.int64)


def _coarse_map(fine: FloatArray, coarse: FloatArray) -> IntArray:
    # Fine cell i (1..n-1) spans [fine[i-1], fine[i]); the coarse bin holding it
    # is the one whose left edge is the last coarse edge <= fine[i-1].
    kc = len(coarse) - 1
    interior = np.searchsorted(coarse, fine[:-1], side="right") - 1
    interior = np.clip(interior, 0, kc - 1)
    out = np.empty(len(fine) + 1, dtype=np.int64)
    out[0] = 0  # below the reference range: the first bin
    out[1:-1] = interior
    out[-1] = kc - 1  # above it: the last bin
    return out


def _unique_edges(q: FloatArray) -> FloatArray:
    edges = np.unique(q)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]], dtype=np.float64)
    return edges.astype(np.float64)


# -- building a profile ----------------------------------------------------------------


def is_text(values: npt.NDArray[Any]) -> bool:
    return values.dtype.kind in "OUS"


def category_key(value: Any) -> str:
    """The category name of one value: text as text, bytes as UTF-8, numbers by ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.bool_ | bool):
        return "true" if bool(value) else "false"
    if isinstance(value, np.integer | int):
        return str(int(value))
    return str(value)


def _text_values(values: npt.NDArray[Any]) -> tuple[list[str], int]:
    """(non-missing values as text, number missing) of a text column."""
    keys = [category_key(v) for v in values.reshape(-1).tolist()]
    present = [k for k in keys if k != ""]
    return present, len(keys) - len(present)


def build_numeric_reference(
    name: str, index: int | None, values: npt.NDArray[Any], options: ProfileOptions
) -> NumericReference:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(x)
    v = x[finite]
    total = int(x.size)
    missing_rate = 1.0 - v.size / total if total else 0.0
    if v.size == 0:
        edges = np.array([0.0, 0.0])
        one = np.array([1.0])
        return NumericReference(
            name, index, 0, missing_rate, 0.0, 0.0, 0.0, 0.0, edges, one,
            edges, one, np.array([0.0]), _coarse_map(edges, edges),
        )
    grid = np.linspace(0.0, 1.0, options.fine_bins + 1)
    probs = np.union1d(grid, TAIL_QUANTILES)
    q = np.quantile(v, probs)
    q[0], q[-1] = v.min(), v.max()
    fine = _unique_edges(q)
    coarse = _unique_edges(q[np.searchsorted(probs, grid[:: options.fine_bins // options.bins])])
    idx = cell_index(fine, v)
    counts = np.bincount(idx, minlength=len(fine) + 1).astype(np.int64)
    sums = np.bincount(idx, weights=v, minlength=len(fine) + 1)
    fine_props = counts[1:-1] / v.size
    mids = (fine[:-1] + fine[1:]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(counts[1:-1] > 0, sums[1:-1] / counts[1:-1], mids)
    means = np.clip(means, fine[:-1], fine[1:])  # rounding must not leave the bin
    mapping = _coarse_map(fine, coarse)
    coarse_props = np.bincount(mapping, weights=counts, minlength=len(coarse) - 1) / v.size
    return NumericReference(
        name=name,
        index=index,
        count=int(v.size),
        missing_rate=float(missing_rate),
        mean=float(v.mean()),
        std=float(v.std()),
        min=float(v.min()),
        max=float(v.max()),
        edges=coarse,
        proportions=coarse_props.astype(np.float64),
        fine_edges=fine,
        fine_proportions=fine_props.astype(np.float64),
        fine_means=means.astype(np.float64),
        coarse_of_fine=mapping,
    )


def build_categorical_reference(
    name: str, index: int | None, values: npt.NDArray[Any], options: ProfileOptions
) -> CategoricalReference:
    if is_text(values):
        present, missing = _text_values(values)
        uniq, counts = np.unique(np.array(present, dtype=object), return_counts=True)
        keys = [str(u) for u in uniq.tolist()]
    else:
        flat = values.reshape(-1)
        missing = 0
        uniq, counts = np.unique(flat, return_counts=True)
        keys = [category_key(u) for u in uniq]
    total_present = int(counts.sum()) if len(counts) else 0
    order = sorted(range(len(keys)), key=lambda i: (-int(counts[i]), keys[i]))
    kept = order[: options.max_categories]
    categories = tuple(keys[i] for i in kept)
    freqs = np.zeros(len(categories) + 1, dtype=np.float64)
    if total_present:
        for j, i in enumerate(kept):
            freqs[j] = counts[i] / total_present
        freqs[-1] = max(0.0, 1.0 - float(freqs[:-1].sum()))
    total = total_present + missing
    return CategoricalReference(
        name=name,
        index=index,
        count=total_present,
        missing_rate=missing / total if total else 0.0,
        categories=categories,
        frequencies=freqs,
        lookup={c: j for j, c in enumerate(categories)},
    )


def _is_categorical(datatype: str, values: npt.NDArray[Any], options: ProfileOptions) -> bool:
    if datatype in ("BYTES", "BOOL") or is_text(values) or values.dtype.kind == "b":
        return True
    if values.dtype.kind in "iu":
        return int(np.unique(values).size) <= options.categorical_max_distinct
    return False


def build_tensor_reference(
    name: str,
    role: Literal["input", "output"],
    datatype: str,
    data: npt.NDArray[Any],
    options: ProfileOptions,
) -> TensorReference:
    """Profile one tensor; ``data``'s first axis is the sample axis."""
    if data.ndim == 0 or data.shape[0] == 0:
        raise ProfileError(f"tensor '{name}': no samples")
    n = data.shape[0]
    sample_size = int(math.prod(data.shape[1:]))
    if sample_size == 0:
        raise ProfileError(f"tensor '{name}': samples have no elements")
    pooled = sample_size > options.max_features_per_tensor
    if pooled:
        columns: list[tuple[str, int | None, npt.NDArray[Any]]] = [
            (name, None, _pool(data.reshape(n, -1), options.max_pooled_values))
        ]
    else:
        rows = data.reshape(n, sample_size)
        columns = [
            (name if sample_size == 1 else f"{name}[{i}]", i, rows[:, i])
            for i in range(sample_size)
        ]
    features: list[FeatureReference] = []
    for feature_name, index, column in columns:
        if _is_categorical(datatype, column, options):
            features.append(build_categorical_reference(feature_name, index, column, options))
        else:
            features.append(build_numeric_reference(feature_name, index, column, options))
    return TensorReference(name, role, datatype, sample_size, pooled, tuple(features))


def _pool(rows: npt.NDArray[Any], limit: int) -> npt.NDArray[Any]:
    step = max(1, math.ceil(rows.shape[1] / limit))
    return rows[:, ::step].reshape(-1)


def build_profile(
    model: str,
    model_version: str,
    inputs: Mapping[str, tuple[str, npt.NDArray[Any]]],
    outputs: Mapping[str, tuple[str, npt.NDArray[Any]]],
    created_at: float,
    options: ProfileOptions | None = None,
) -> ReferenceProfile:
    """``inputs``/``outputs``: tensor name -> (protocol datatype, array with samples first)."""
    opts = options or ProfileOptions()
    tensors: list[TensorReference] = []
    samples = 0
    for role, group in (("input", inputs), ("output", outputs)):
        for name, (datatype, data) in group.items():
            t = build_tensor_reference(name, role, datatype, data, opts)  # type: ignore[arg-type]
            samples = max(samples, int(data.shape[0]))
            tensors.append(t)
    if not tensors:
        raise ProfileError("no tensors to profile")
    return ReferenceProfile(model, model_version, samples, created_at, opts, tuple(tensors))


# -- (de)serialising ---------------------------------------------------------------------


def _floats(values: FloatArray) -> list[float]:
    return [float(v) for v in values.tolist()]


def profile_to_dict(profile: ReferenceProfile) -> dict[str, Any]:
    o = profile.options
    tensors: list[dict[str, Any]] = []
    for t in profile.tensors:
        feats: list[dict[str, Any]] = []
        for f in t.features:
            if isinstance(f, NumericReference):
                feats.append({
                    "name": f.name, "index": f.index, "kind": "numeric", "count": f.count,
                    "missing_rate": f.missing_rate, "mean": f.mean, "std": f.std,
                    "min": f.min, "max": f.max,
                    "edges": _floats(f.edges), "proportions": _floats(f.proportions),
                    "fine_edges": _floats(f.fine_edges),
                    "fine_proportions": _floats(f.fine_proportions),
                    "fine_means": _floats(f.fine_means),
                })
            else:
                feats.append({
                    "name": f.name, "index": f.index, "kind": "categorical", "count": f.count,
                    "missing_rate": f.missing_rate,
                    "categories": dict(zip(f.categories, _floats(f.frequencies[:-1]), strict=True)),
                    "other": float(f.frequencies[-1]),
                })
        tensors.append({
            "name": t.name, "role": t.role, "datatype": t.datatype,
            "sample_size": t.sample_size, "pooled": t.pooled, "features": feats,
        })
    return {
        "schema": PROFILE_SCHEMA,
        "version": PROFILE_VERSION,
        "model": profile.model,
        "model_version": profile.model_version,
        "samples": profile.samples,
        "created_at": profile.created_at,
        "options": {
            "bins": o.bins, "fine_bins": o.fine_bins, "max_categories": o.max_categories,
            "categorical_max_distinct": o.categorical_max_distinct,
            "max_features_per_tensor": o.max_features_per_tensor,
            "max_pooled_values": o.max_pooled_values,
        },
        "tensors": tensors,
    }


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ProfileError(f"{where}: missing '{key}'")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool and bool not in (
        kind if isinstance(kind, tuple) else (kind,)
    ):
        raise ProfileError(f"{where}.{key}: expected {kind}, got a boolean")
    if not isinstance(value, kind):
        raise ProfileError(f"{where}.{key}: expected {kind}, got {type(value).__name__}")
    return value


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = float(_get(obj, key, (int, float), where))
    if not math.isfinite(value):
        raise ProfileError(f"{where}.{key}: not finite")
    return value


def _rate(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = _number(obj, key, where)
    if not 0.0 <= value <= 1.0:
        raise ProfileError(f"{where}.{key}: {value} is not in [0, 1]")
    return value


def _float_list(obj: Mapping[str, Any], key: str, where: str, limit: int) -> FloatArray:
    raw = _get(obj, key, list, where)
    if not 1 <= len(raw) <= limit:
        raise ProfileError(f"{where}.{key}: needs 1..{limit} entries, has {len(raw)}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
        raise ProfileError(f"{where}.{key}: entries must be numbers")
    arr = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ProfileError(f"{where}.{key}: entries must be finite")
    return arr


def _edges(obj: Mapping[str, Any], key: str, where: str) -> FloatArray:
    edges = _float_list(obj, key, where, MAX_EDGES)
    if len(edges) < 2:
        raise ProfileError(f"{where}.{key}: needs at least 2 edges")
    if not (np.all(np.diff(edges) > 0) or (len(edges) == 2 and edges[0] == edges[1])):
        raise ProfileError(f"{where}.{key}: edges must be strictly increasing")
    return edges


def _proportions(obj: Mapping[str, Any], key: str, where: str, n: int) -> FloatArray:
    props = _float_list(obj, key, where, MAX_EDGES)
    if len(props) != n:
        raise ProfileError(f"{where}.{key}: expected {n} entries, got {len(props)}")
    if np.any(props < 0) or abs(float(props.sum()) - 1.0) > 1e-6:
        raise ProfileError(f"{where}.{key}: must be non-negative and sum to 1")
    return props


def _bin_means(obj: Mapping[str, Any], where: str, edges: FloatArray) -> FloatArray:
    means = _float_list(obj, "fine_means", where, MAX_EDGES)
    if len(means) != len(edges) - 1:
        raise ProfileError(f"{where}.fine_means: expected {len(edges) - 1} entries")
    if np.any(means < edges[:-1]) or np.any(means > edges[1:]):
        raise ProfileError(f"{where}.fine_means: a bin's mean lies outside the bin")
    return means


def _index(obj: Mapping[str, Any], where: str, sample_size: int) -> int | None:
    index = obj.get("index")
    if index is None:
        return None
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < sample_size:
        raise ProfileError(f"{where}.index: must be an integer in 0..{sample_size - 1} or null")
    return index


def _feature_from_dict(raw: Any, where: str, sample_size: int) -> FeatureReference:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected an object")
    name = _get(raw, "name", str, where)
    index = _index(raw, where, sample_size)
    kind = _get(raw, "kind", str, where)
    count = _get(raw, "count", int, where)
    missing = _rate(raw, "missing_rate", where)
    if kind == "numeric":
        edges = _edges(raw, "edges", where)
        fine = _edges(raw, "fine_edges", where)
        if not set(edges.tolist()) <= set(fine.tolist()):
            raise ProfileError(f"{where}: every coarse edge must be a fine edge")
        return NumericReference(
            name=name,
            index=index,
            count=count,
            missing_rate=missing,
            mean=_number(raw, "mean", where),
            std=_number(raw, "std", where),
            min=_number(raw, "min", where),
            max=_number(raw, "max", where),
            edges=edges,
            proportions=_proportions(raw, "proportions", where, len(edges) - 1),
            fine_edges=fine,
            fine_proportions=_proportions(raw, "fine_proportions", where, len(fine) - 1),
            fine_means=_bin_means(raw, where, fine),
            coarse_of_fine=_coarse_map(fine, edges),
        )
    if kind == "categorical":
        cats = _get(raw, "categories", dict, where)
        if len(cats) > MAX_CATEGORIES:
            raise ProfileError(f"{where}.categories: more than {MAX_CATEGORIES}")
        names = tuple(cats)
        freqs = np.array([*cats.values(), _number(raw, "other", where)], dtype=object)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in freqs):
            raise ProfileError(f"{where}.categories: frequencies must be numbers")
        f = freqs.astype(np.float64)
        if not np.all(np.isfinite(f)) or np.any(f < 0):
            raise ProfileError(f"{where}.categories: frequencies must be finite, >= 0")
        if count and abs(float(f.sum()) - 1.0) > 1e-6:
            raise ProfileError(f"{where}.categories: frequencies and other must sum to 1")
        return CategoricalReference(
            name, index, count, missing, names, f, {c: j for j, c in enumerate(names)}
        )
    raise ProfileError(f"{where}.kind: {kind!r} is not 'numeric' or 'categorical'")


def profile_from_dict(raw: Any) -> ReferenceProfile:
    """Validate and load a profile document (as parsed from JSON)."""
    if not isinstance(raw, dict):
        raise ProfileError("profile: expected a JSON object")
    if raw.get("schema") != PROFILE_SCHEMA:
        raise ProfileError(f"profile: schema is {raw.get('schema')!r}, not {PROFILE_SCHEMA!r}")
    if raw.get("version") != PROFILE_VERSION:
        raise ProfileError(f"profile: unsupported version {raw.get('version')!r}")
    where = "profile"
    opts_raw = _get(raw, "options", dict, where)
    try:
        options = ProfileOptions(**{
            k: _get(opts_raw, k, int, f"{where}.options")
            for k in ("bins", "fine_bins", "max_categories", "categorical_max_distinct",
                      "max_features_per_tensor", "max_pooled_values")
        })
    except TypeError as exc:
        raise ProfileError(f"{where}.options: {exc}") from None
    tensors_raw = _get(raw, "tensors", list, where)
    if not 1 <= len(tensors_raw) <= MAX_TENSORS:
        raise ProfileError(f"{where}.tensors: needs 1..{MAX_TENSORS} tensors")
    tensors: list[TensorReference] = []
    n_features = 0
    for i, t in enumerate(tensors_raw):
        tw = f"{where}.tensors[{i}]"
        if not isinstance(t, dict):
            raise ProfileError(f"{tw}: expected an object")
        role = _get(t, "role", str, tw)
        if role not in ("input", "output"):
            raise ProfileError(f"{tw}.role: {role!r} is not 'input' or 'output'")
        sample_size = _get(t, "sample_size", int, tw)
        pooled = _get(t, "pooled", bool, tw)
        if sample_size < 0:
            raise ProfileError(f"{tw}.sample_size: negative")
        feats_raw = _get(t, "features", list, tw)
        n_features += len(feats_raw)
        if not feats_raw or n_features > MAX_FEATURES:
            raise ProfileError(f"{tw}.features: needs 1 feature and at most {MAX_FEATURES} in all")
        if pooled and len(feats_raw) != 1:
            raise ProfileError(f"{tw}: a pooled tensor has exactly one feature")
        if not pooled and len(feats_raw) > sample_size:
            raise ProfileError(f"{tw}: more features than elements per sample")
        feats = tuple(
            _feature_from_dict(f, f"{tw}.features[{j}]", max(sample_size, 1))
            for j, f in enumerate(feats_raw)
        )
        if not pooled and any(f.index is None for f in feats):
            raise ProfileError(f"{tw}: features of a non-pooled tensor need an index")
        tensors.append(TensorReference(
            _get(t, "name", str, tw), role, _get(t, "datatype", str, tw),
            sample_size, pooled, feats,
        ))
    return ReferenceProfile(
        model=_get(raw, "model", str, where),
        model_version=str(_get(raw, "model_version", (str, int), where)),
        samples=_get(raw, "samples", int, where),
        created_at=_number(raw, "created_at", where),
        options=options,
        tensors=tuple(tensors),
    )
