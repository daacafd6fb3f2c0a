"""Drift statistics: reference profiles and per-window comparisons against them.

Pure: NumPy in, dataclasses and plain dicts out; no I/O, no clock, no threads.

A *reference profile* describes a model version's inputs and outputs on a
reference data set, per feature (one column of a tensor, or a whole tensor
pooled when it has too many elements per sample to profile column by column):

* numeric features: quantile bin edges, the reference proportions in those
  bins, mean, std, min, max and the missing (non-finite) rate. Two binnings are
  kept: ``bins`` coarse quantile bins (deciles by default) for PSI and the
  Jensen-Shannon distance, and ``fine_bins`` (percentiles by default) for the
  KS statistic and Wasserstein-1. Every coarse edge is also a fine edge, so a
  window needs only the fine histogram.
* categorical features (strings, booleans, integers with few distinct values):
  the frequencies of the most common categories, the share of all the others
  and the missing (empty string) rate.

A *window* accumulates live values against the pinned reference bins. Its
memory is fixed by the profile (a few hundred integers per feature), whatever
the traffic. Per window and feature:

* PSI = sum((a - e) * ln(a / e)) over the coarse bins, both shares floored at
  ``PSI_EPSILON`` (1e-4) so an empty bin does not make it infinite; values
  outside the reference range fall into the outermost bins.
* Jensen-Shannon *distance* (the square root of the divergence), base 2, so it
  lies in [0, 1]; over the same bins as PSI. This is exactly what
  ``scipy.spatial.distance.jensenshannon(p, q, base=2)`` returns for them.
* KS statistic from the binned CDFs: the largest CDF difference at the fine
  bin edges (the ``fine_bins`` quantiles plus the 0.1/0.2/0.5% and
  99.5/99.8/99.9% ones, and the reference min and max). The exact two-sample
  statistic can differ only by what happens *inside* a fine bin, so
  ``|KS_binned - KS_exact| <= max over bins of max(ref share, live share)``
  (about 0.01 with percentile bins when the live data is not piled into one
  bin; in practice under 0.01); see :func:`ks_binning_bound`.
* Wasserstein-1 between the reference and the window divided by the
  reference std. Within each fine bin the signed area between the two CDFs is
  exact (the profile keeps each bin's reference mean, the window each bin's
  live sum), and so is everything outside the reference range; only where the
  CDFs cross inside a bin is the area estimated. The error against the exact
  W1 of the samples is at most ``sum(width * (ref share + live share))`` over
  the fine bins (:func:`wasserstein_binning_bound`); in practice, within 0.5%
  of the reference std plus 1% of the distance (``tests/test_drift_stats.py``).
* missing rate (NaN or infinite, or an empty string) and out-of-range rate
  (below the reference min or above its max; unseen categories for
  categorical features).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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
_SEVERITY: dict[str, int] = {"insufficient_data": -1, "ok": 0, "warn": 1, "drift": 2}

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


def cell_counts(edges: FloatArray, values: FloatArray) -> IntArray:
    """Histogram of finite ``values`` over the cells of :func:`cell_index`."""
    idx = cell_index(edges, values)
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


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


def _is_text(values: npt.NDArray[Any]) -> bool:
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
    if _is_text(values):
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
    if datatype in ("BYTES", "BOOL") or _is_text(values) or values.dtype.kind == "b":
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


# -- live windows ------------------------------------------------------------------------


class NumericWindow:
    """Live values of one numeric feature against its pinned fine bins."""

    __slots__ = (
        "above_sum", "below_sum", "cell_sums", "counts", "missing", "ref", "sq_sum", "sum"
    )

    def __init__(self, ref: NumericReference) -> None:
        self.ref = ref
        self.counts = np.zeros(len(ref.fine_edges) + 1, dtype=np.int64)
        self.cell_sums = np.zeros(len(ref.fine_edges) + 1, dtype=np.float64)
        self.missing = 0
        self.below_sum = 0.0  # sum of (min - x) over values below the reference min
        self.above_sum = 0.0  # sum of (x - max) over values above the reference max
        self.sum = 0.0
        self.sq_sum = 0.0

    def add(self, values: npt.NDArray[Any]) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            self.missing += int(x.size - np.count_nonzero(finite))
            x = x[finite]
        if x.size == 0:
            return
        edges = self.ref.fine_edges
        idx = cell_index(edges, x)
        cells = len(edges) + 1
        self.counts += np.bincount(idx, minlength=cells)
        self.cell_sums += np.bincount(idx, weights=x, minlength=cells)
        lo, hi = edges[0], edges[-1]
        below = x[x < lo]
        if below.size:
            self.below_sum += float((lo - below).sum())
        above = x[x > hi]
        if above.size:
            self.above_sum += float((above - hi).sum())
        self.sum += float(x.sum())
        self.sq_sum += float(np.dot(x, x))

    @property
    def count(self) -> int:
        return int(self.counts.sum())


class CategoricalWindow:
    __slots__ = ("counts", "missing", "ref")

    def __init__(self, ref: CategoricalReference) -> None:
        self.ref = ref
        self.counts = np.zeros(len(ref.categories) + 1, dtype=np.int64)
        self.missing = 0

    def add(self, values: npt.NDArray[Any]) -> None:
        flat = values.reshape(-1)
        if flat.size == 0:
            return
        lookup = self.ref.lookup
        other = len(self.ref.categories)
        if _is_text(flat):
            uniq, counts = np.unique(flat.astype(object), return_counts=True)
        else:
            uniq, counts = np.unique(flat, return_counts=True)
        for u, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            key = category_key(u)
            if key == "" and _is_text(flat):
                self.missing += int(c)
                continue
            self.counts[lookup.get(key, other)] += int(c)

    @property
    def count(self) -> int:
        return int(self.counts.sum())


FeatureWindow = NumericWindow | CategoricalWindow


class DriftWindow:
    """All features of one model version for one window. Memory is fixed by the profile."""

    def __init__(self, profile: ReferenceProfile) -> None:
        self.profile = profile
        self.requests = 0
        self.shape_mismatches = 0  # tensors whose per-sample size did not fit the profile
        self.tensors: list[tuple[TensorReference, list[FeatureWindow]]] = []
        for t in profile.tensors:
            windows: list[FeatureWindow] = [
                NumericWindow(f) if isinstance(f, NumericReference) else CategoricalWindow(f)
                for f in t.features
            ]
            self.tensors.append((t, windows))
        self._by_key: dict[tuple[str, str], int] = {
            (t.role, t.name): i for i, (t, _) in enumerate(self.tensors)
        }

    def add(
        self,
        inputs: Sequence[Mapping[str, npt.NDArray[Any]]],
        outputs: Sequence[Mapping[str, npt.NDArray[Any]]],
    ) -> None:
        """Add requests' tensors (each array has the batch axis first, or is one sample)."""
        self.requests += max(len(inputs), len(outputs))
        for role, group in (("input", inputs), ("output", outputs)):
            if not group:
                continue
            for name in group[0]:
                slot = self._by_key.get((role, name))
                if slot is None:
                    continue
                ref, windows = self.tensors[slot]
                arrays = [g[name] for g in group if name in g]
                self._add_tensor(ref, windows, arrays)

    def _add_tensor(
        self, ref: TensorReference, windows: list[FeatureWindow], arrays: list[npt.NDArray[Any]]
    ) -> None:
        limit = self.profile.options.max_pooled_values
        if ref.pooled:
            for a in arrays:
                flat = a.reshape(-1)
                step = max(1, math.ceil(flat.size / limit))
                windows[0].add(flat[::step])
            return
        size = ref.sample_size
        rows_list = []
        for a in arrays:
            if size == 0 or a.size % size:
                self.shape_mismatches += 1
                continue
            rows_list.append(a.reshape(-1, size))
        if not rows_list:
            return
        rows = rows_list[0] if len(rows_list) == 1 else np.concatenate(rows_list)
        for w in windows:
            index = w.ref.index
            assert index is not None
            w.add(rows[:, index])


# -- statistics --------------------------------------------------------------------------


def psi(expected: FloatArray, actual: FloatArray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` shares (same bins)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(p: FloatArray, q: FloatArray) -> float:
    """Jensen-Shannon distance, base 2 (in [0, 1]); inputs are normalised first."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return 0.0
    p = p / ps
    q = q / qs
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0)
    div = max(0.0, float((kl_p.sum() + kl_q.sum()) / 2))
    return math.sqrt(min(div, 1.0))


def _ref_cells(ref: NumericReference) -> FloatArray:
    out = np.zeros(len(ref.fine_edges) + 1, dtype=np.float64)
    out[1:-1] = ref.fine_proportions
    return out


def ks_binned(ref: NumericReference, window: NumericWindow) -> float:
    n = window.count
    if n == 0:
        return 0.0
    ref_cdf = np.cumsum(_ref_cells(ref))
    live_cdf = np.cumsum(window.counts) / n
    return float(np.max(np.abs(ref_cdf - live_cdf)))


def ks_binning_bound(ref: NumericReference, window: NumericWindow) -> float:
    """The most the binned KS statistic can differ from the exact one for these data."""
    n = window.count
    if n == 0:
        return 0.0
    live = window.counts[1:-1] / n
    return float(max(np.max(ref.fine_proportions), np.max(live)))


def wasserstein_binned(ref: NumericReference, window: NumericWindow) -> float:
    """W1 = integral of |F_ref - F_live| over x, from the binned data.

    Inside a fine bin [a, b] the signed integral of F_ref - F_live is exact: for
    an empirical CDF, the integral of F over [a, b] is ``(b - a) F(a-) + (count * b
    - sum) / n`` over the values in the bin, and the profile keeps each bin's
    reference mean while the window keeps each bin's live sum. When F_ref - F_live
    has the same sign at both ends of the bin, its absolute integral is taken as
    the absolute signed integral (exact unless the curves cross twice inside);
    when the sign changes, as the larger of that and the crossing of the two CDFs
    taken linear. Outside the reference range the integral is exact.
    """
    n = window.count
    if n == 0:
        return 0.0
    edges = ref.fine_edges
    ref_cdf = np.cumsum(_ref_cells(ref))  # F at the right end of each cell
    live_cdf = np.cumsum(window.counts) / n
    a, b = edges[:-1], edges[1:]
    width = b - a
    # Interior cell i (1..len(edges)-1) spans [edges[i-1], edges[i]]; the CDFs at its
    # ends are the cumulative shares up to cell i-1 and up to cell i.
    r0, l0 = ref_cdf[:-2], live_cdf[:-2]
    d0 = r0 - l0
    d1 = ref_cdf[1:-1] - live_cdf[1:-1]
    ref_int = width * r0 + ref.fine_proportions * (b - ref.fine_means)
    live_int = width * l0 + (window.counts[1:-1] * b - window.cell_sums[1:-1]) / n
    signed = np.abs(ref_int - live_int)
    a0, a1 = np.abs(d0), np.abs(d1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.where(a0 + a1 > 0, width * (a0 * a0 + a1 * a1) / (2 * (a0 + a1)), 0.0)
    area = np.where(d0 * d1 >= 0, signed, np.maximum(signed, crossing))
    return float(area.sum() + (window.below_sum + window.above_sum) / n)


def wasserstein_binning_bound(ref: NumericReference, window: NumericWindow) -> float:
    n = window.count
    if n == 0:
        return 0.0
    live = window.counts[1:-1] / n
    return float(np.sum(np.diff(ref.fine_edges) * (ref.fine_proportions + live)))


# -- per-window results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    name: str
    tensor: str
    role: str
    kind: str
    count: int  # live values compared (non-missing)
    missing_rate: float
    out_of_range_rate: float
    psi: float | None
    js: float | None
    ks: float | None
    wasserstein: float | None  # W1 / reference std
    mean: float | None
    std: float | None
    status: Status
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "tensor": self.tensor, "role": self.role, "kind": self.kind,
            "count": self.count, "status": self.status, "reasons": list(self.reasons),
            "missing_rate": _round(self.missing_rate),
            "out_of_range_rate": _round(self.out_of_range_rate),
            "psi": _round(self.psi), "js": _round(self.js), "ks": _round(self.ks),
            "wasserstein": _round(self.wasserstein),
            "mean": _round(self.mean), "std": _round(self.std),
        }


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


@dataclass(frozen=True, slots=True)
class WindowResult:
    status: Status
    requests: int
    features: tuple[FeatureDrift, ...]
    shape_mismatches: int

    @property
    def drifting(self) -> list[str]:
        return [f.name for f in self.features if f.status == "drift"]

    @property
    def warning(self) -> list[str]:
        return [f.name for f in self.features if f.status == "warn"]


def _judge(
    values: Mapping[str, float | None], thresholds: DriftThresholds
) -> tuple[Status, tuple[str, ...]]:
    level = 0
    reasons: list[str] = []
    for metric, value in values.items():
        band: Band | None = getattr(thresholds, metric)
        if band is None or value is None:
            continue
        lv = band.level(value)
        if lv:
            bound = band.drift if lv == 2 else band.warn
            reasons.append(f"{metric}>={bound:g}")
        level = max(level, lv)
    status: Status = "drift" if level == 2 else "warn" if level == 1 else "ok"
    return status, tuple(reasons)


def compare_feature(
    tensor: TensorReference, window: FeatureWindow, thresholds: DriftThresholds
) -> FeatureDrift:
    n = window.count
    seen = n + window.missing
    missing_rate = window.missing / seen if seen else 0.0
    if isinstance(window, NumericWindow):
        ref_n = window.ref
        out_of_range = int(window.counts[0] + window.counts[-1])
        oor = out_of_range / n if n else 0.0
        if n and ref_n.count:
            live_coarse = np.bincount(
                ref_n.coarse_of_fine, weights=window.counts, minlength=len(ref_n.proportions)
            ) / n
            p = psi(ref_n.proportions, live_coarse)
            j = js_distance(ref_n.proportions, live_coarse)
            k: float | None = ks_binned(ref_n, window)
            w1 = wasserstein_binned(ref_n, window)
            w: float | None = w1 / ref_n.std if ref_n.std > 0 else None
            mean: float | None = window.sum / n
            var = max(0.0, window.sq_sum / n - (window.sum / n) ** 2)
            std: float | None = math.sqrt(var)
        else:
            p = j = 0.0
            k = w = mean = std = None
        kind = "numeric"
    else:
        ref_c = window.ref
        oor = float(window.counts[-1] / n) if n else 0.0
        if ref_c.frequencies[-1] > 0:
            oor = 0.0  # "other" was seen in the reference: unseen values are not out of range
        if n and ref_c.count:
            live = window.counts / n
            p = psi(ref_c.frequencies, live)
            j = js_distance(ref_c.frequencies, live)
        else:
            p = j = 0.0
        k = w = mean = std = None
        kind = "categorical"
    name = window.ref.name
    if n + window.missing < thresholds.min_samples:
        status: Status = "insufficient_data"
        reasons: tuple[str, ...] = ()
    else:
        status, reasons = _judge(
            {
                "psi": p if n else None,
                "js": j if n else None,
                "ks": k,
                "wasserstein": w,
                "missing_rate": missing_rate - window.ref.missing_rate,
                "out_of_range": oor,
            },
            thresholds,
        )
    return FeatureDrift(
        name, tensor.name, tensor.role, kind, n, missing_rate, oor,
        p if n else None, j if n else None, k, w, mean, std, status, reasons,
    )


def worst(statuses: Iterable[str]) -> Status:
    best: Status = "insufficient_data"
    for s in statuses:
        if _SEVERITY[s] > _SEVERITY[best]:
            best = s  # type: ignore[assignment]
    return best


def compare_window(window: DriftWindow, thresholds: DriftThresholds) -> WindowResult:
    features = tuple(
        compare_feature(t, w, thresholds) for t, windows in window.tensors for w in windows
    )
    return WindowResult(
        worst(f.status for f in features), window.requests, features, window.shape_mismatches
    )


def severity(status: str) -> int:
    return _SEVERITY.get(status, -1)


def is_crossing(previous: str | None, current: str) -> bool:
    """Whether going from ``previous`` to ``current`` is a threshold crossing worth an event.

    Windows without enough data change nothing: the last judged status stands.
    """
    if current == "insufficient_data":
        return False
    before = "ok" if previous in (None, "insufficient_data") else previous
    return before != current
