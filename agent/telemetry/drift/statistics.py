"""Drift statistics: live windows compared against a reference profile.

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
  ``|KS_binned - KS_exact| <= max over bins of max(ref share, live share)``;
  see :func:`ks_binning_bound`.
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.telemetry.drift.profiles import (
    PSI_EPSILON,
    SEVERITY_RANK,
    Band,
    CategoricalReference,
    DriftThresholds,
    FloatArray,
    NumericReference,
    ReferenceProfile,
    Status,
    TensorReference,
    category_key,
    cell_index,
    is_text,
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
        if is_text(flat):
            uniq, counts = np.unique(flat.astype(object), return_counts=True)
        else:
            uniq, counts = np.unique(flat, return_counts=True)
        for u, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            key = category_key(u)
            if key == "" and is_text(flat):
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
        if SEVERITY_RANK[s] > SEVERITY_RANK[best]:
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
    return SEVERITY_RANK.get(status, -1)


def is_crossing(previous: str | None, current: str) -> bool:
    """Whether going from ``previous`` to ``current`` is a threshold crossing worth an event.

    Windows without enough data change nothing: the last judged status stands.
    """
    if current == "insufficient_data":
        return False
    before = "ok" if previous in (None, "insufficient_data") else previous
    return before != current
