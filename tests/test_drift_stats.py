"""Drift statistics against independent implementations, on known distributions.

Stated tolerances (see agent/telemetry/drift/statistics.py for why):

* PSI: the formula, over the profile's decile bins with the outer bins open,
  shares floored at 1e-4: equal to 1e-12.
* Jensen-Shannon distance: ``scipy.spatial.distance.jensenshannon(base=2)`` on
  the same bins: equal to 1e-9.
* KS (binned CDFs): within ``ks_binning_bound`` of ``scipy.stats.ks_2samp``
  (a proof, checked on every case) and within 0.01 absolute on these
  distributions with percentile bins (measured: at most 0.007).
* Wasserstein-1 (binned, exact signed integral per bin): within
  ``wasserstein_binning_bound`` of ``scipy.stats.wasserstein_distance`` and
  within 0.5% of the reference std plus 1% of the exact distance (measured: at
  most 0.33% of the std).
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

from agent.telemetry.drift import profiles
from agent.telemetry.drift import statistics as drift
from agent.telemetry.drift.profiles import (
    CategoricalReference,
    DriftThresholds,
    NumericReference,
    ProfileError,
    build_categorical_reference,
    build_numeric_reference,
    build_profile,
    profile_from_dict,
    profile_to_dict,
)
from agent.telemetry.drift.statistics import (
    DriftWindow,
    NumericWindow,
    compare_window,
    ks_binned,
    ks_binning_bound,
    wasserstein_binned,
    wasserstein_binning_bound,
)

OPTIONS = profiles.ProfileOptions()
REF_N = 20_000
LIVE_N = 3_000

Sampler = Any


def _gen(kind: str, rng: np.random.Generator) -> Sampler:
    return {
        "normal": lambda shift, scale, n: rng.normal(shift, scale, n),
        "exponential": lambda shift, scale, n: rng.exponential(scale, n) + shift,
        "uniform": lambda shift, scale, n: rng.uniform(shift, shift + scale, n),
        "lognormal": lambda shift, scale, n: rng.lognormal(0.0, 0.5 * scale, n) + shift,
        "student_t": lambda shift, scale, n: rng.standard_t(5, n) * scale + shift,
    }[kind]


DISTRIBUTIONS = ("normal", "exponential", "uniform", "lognormal", "student_t")
CHANGES = ((0.0, 1.0), (0.1, 1.0), (0.5, 1.0), (2.0, 1.0), (0.0, 1.5), (0.0, 0.6))


def _numeric(ref: npt.NDArray[np.float64]) -> NumericReference:
    return build_numeric_reference("x", 0, ref, OPTIONS)


def _window(ref: NumericReference, live: npt.NDArray[np.float64]) -> NumericWindow:
    w = NumericWindow(ref)
    w.add(live)
    return w


def _psi_by_formula(ref: NumericReference, live: npt.NDArray[np.float64]) -> float:
    edges = ref.edges.copy()
    edges[0], edges[-1] = -np.inf, np.inf  # outside the reference range: the outer bins
    counts, _ = np.histogram(live, bins=edges)
    # np.histogram's last bin is closed; ours too; interior bins are [a, b) in both.
    actual = counts / counts.sum()
    e = np.maximum(ref.proportions, 1e-4)
    a = np.maximum(actual, 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def _live_coarse(ref: NumericReference, w: NumericWindow) -> npt.NDArray[np.float64]:
    return np.bincount(ref.coarse_of_fine, weights=w.counts, minlength=len(ref.proportions)) / (
        w.count
    )


# -- against independent implementations ---------------------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize(("shift", "scale"), CHANGES)
def test_statistics_match_reference_implementations(kind: str, shift: float, scale: float) -> None:
    # zlib.crc32, not hash(): str hashes change per process (PYTHONHASHSEED).
    rng = np.random.default_rng(zlib.crc32(repr((kind, shift, scale)).encode()))
    gen = _gen(kind, rng)
    ref_data = gen(0.0, 1.0, REF_N)
    live = gen(shift, scale, LIVE_N)
    ref = _numeric(ref_data)
    w = _window(ref, live)
    result = drift.compare_feature(
        profiles.TensorReference("x", "input", "FP64", 1, False, (ref,)), w, DriftThresholds()
    )

    assert result.psi == pytest.approx(_psi_by_formula(ref, live), abs=1e-12)

    live_props = _live_coarse(ref, w)
    assert result.js == pytest.approx(
        float(jensenshannon(ref.proportions, live_props, base=2)), abs=1e-9
    )

    exact_ks = float(ks_2samp(ref_data, live).statistic)
    binned_ks = ks_binned(ref, w)
    assert abs(binned_ks - exact_ks) <= ks_binning_bound(ref, w) + 1e-12
    assert binned_ks == pytest.approx(exact_ks, abs=0.01)

    exact_w1 = float(wasserstein_distance(ref_data, live))
    binned_w1 = wasserstein_binned(ref, w)
    assert abs(binned_w1 - exact_w1) <= wasserstein_binning_bound(ref, w) + 1e-12
    assert abs(binned_w1 - exact_w1) <= 0.005 * ref.std + 0.01 * exact_w1
    assert result.wasserstein == pytest.approx(binned_w1 / ref.std)


def test_categorical_psi_and_js_match_formula_and_scipy() -> None:
    rng = np.random.default_rng(11)
    cats = np.array(["red", "green", "blue", "black"], dtype=object)
    ref_data = rng.choice(cats, REF_N, p=[0.4, 0.3, 0.2, 0.1])
    live = rng.choice(cats, LIVE_N, p=[0.25, 0.25, 0.25, 0.25])
    ref = build_categorical_reference("c", 0, ref_data, OPTIONS)
    w = drift.CategoricalWindow(ref)
    w.add(live)
    result = drift.compare_feature(
        profiles.TensorReference("c", "input", "BYTES", 1, False, (ref,)), w, DriftThresholds()
    )
    expected = ref.frequencies
    actual = w.counts / w.count
    e, a = np.maximum(expected, 1e-4), np.maximum(actual, 1e-4)
    assert result.psi == pytest.approx(float(np.sum((a - e) * np.log(a / e))), abs=1e-12)
    assert result.js == pytest.approx(float(jensenshannon(expected, actual, base=2)), abs=1e-9)
    assert result.ks is None and result.wasserstein is None
    assert result.status == "drift"


# -- flagging ------------------------------------------------------------------------------


def _tabular(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, Any]:
    x = rng.normal(0.0, 1.0, (n, 4))
    x[:, 0] += shift
    label = (x[:, 0] + x[:, 1] > 0).astype(np.int64)[:, None]
    color = rng.choice(np.array(["red", "green", "blue"], dtype=object), (n, 1), p=[0.5, 0.3, 0.2])
    return {"x": x, "label": label, "color": color}


def _profile(rng: np.random.Generator) -> profiles.ReferenceProfile:
    d = _tabular(rng, REF_N)
    return build_profile(
        "m", "1",
        {"x": ("FP64", d["x"]), "color": ("BYTES", d["color"])},
        {"label": ("INT64", d["label"])},
        created_at=0.0,
    )


def _run_window(
    profile: profiles.ReferenceProfile, data: dict[str, Any], batch: int = 16
) -> drift.WindowResult:
    w = DriftWindow(profile)
    n = data["x"].shape[0]
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        w.add([{"x": data["x"][sl], "color": data["color"][sl]}], [{"label": data["label"][sl]}])
    return compare_window(w, DriftThresholds())


def test_unshifted_stream_is_not_flagged() -> None:
    rng = np.random.default_rng(5)
    profile = _profile(rng)
    for _ in range(10):
        result = _run_window(profile, _tabular(rng, 2000))
        assert result.status == "ok", [(f.name, f.reasons) for f in result.features if f.reasons]


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_shifted_stream_is_flagged(shift: float) -> None:
    rng = np.random.default_rng(6)
    profile = _profile(rng)
    result = _run_window(profile, _tabular(rng, 2000, shift=shift))
    assert result.status == "drift"
    flagged = set(result.drifting)
    assert "x[0]" in flagged
    # The prediction distribution moved with the input (P(label=1) 0.5 -> 0.64 or 0.76).
    assert "label" in flagged | set(result.warning)
    assert not {"x[2]", "x[3]", "color"} & (flagged | set(result.warning))
    x0 = next(f for f in result.features if f.name == "x[0]")
    assert x0.psi is not None and x0.psi >= 0.2
    assert "psi>=0.2" in x0.reasons


def test_small_shift_is_a_warning_by_psi() -> None:
    rng = np.random.default_rng(8)
    ref = rng.normal(0.0, 1.0, REF_N)
    profile = build_profile("m", "1", {"v": ("FP64", ref[:, None])}, {}, 0.0)
    thresholds = DriftThresholds(js=None, ks=None, wasserstein=None)
    w = DriftWindow(profile)
    w.add([{"v": rng.normal(0.4, 1.0, (20_000, 1))}], [])
    result = compare_window(w, thresholds)
    f = result.features[0]
    assert f.psi is not None and 0.1 <= f.psi < 0.2
    assert f.status == "warn" and f.reasons == ("psi>=0.1",)


def test_missing_and_out_of_range_rates() -> None:
    rng = np.random.default_rng(9)
    profile = build_profile("m", "1", {"v": ("FP32", rng.normal(0, 1, (REF_N, 1)))}, {}, 0.0)
    live = rng.normal(0, 1, (4000, 1))
    live[:400] = np.nan
    live[400:800] = 50.0  # far above the reference max
    w = DriftWindow(profile)
    w.add([{"v": live}], [])
    f = compare_window(w, DriftThresholds()).features[0]
    assert f.missing_rate == pytest.approx(0.1)
    assert f.out_of_range_rate == pytest.approx(400 / 3600)
    assert f.status == "drift"
    assert "missing_rate>=0.1" in f.reasons and "out_of_range>=0.1" in f.reasons


def test_too_few_samples_is_not_judged() -> None:
    rng = np.random.default_rng(10)
    profile = build_profile("m", "1", {"v": ("FP64", rng.normal(0, 1, (REF_N, 1)))}, {}, 0.0)
    w = DriftWindow(profile)
    w.add([{"v": rng.normal(5, 1, (100, 1))}], [])  # wildly shifted, but only 100 samples
    result = compare_window(w, DriftThresholds(min_samples=500))
    assert result.status == "insufficient_data"
    assert compare_window(w, DriftThresholds(min_samples=50)).status == "drift"


def test_crossings() -> None:
    assert drift.is_crossing(None, "drift")
    assert drift.is_crossing("ok", "warn")
    assert drift.is_crossing("drift", "ok")
    assert not drift.is_crossing(None, "ok")
    assert not drift.is_crossing("drift", "drift")
    assert not drift.is_crossing("drift", "insufficient_data")


# -- windows ---------------------------------------------------------------------------------


def test_window_memory_is_fixed_by_the_profile() -> None:
    rng = np.random.default_rng(12)
    profile = _profile(rng)
    w = DriftWindow(profile)
    sizes = [f.counts.nbytes for _, ws in w.tensors for f in ws]
    for _ in range(50):
        d = _tabular(rng, 10_000)
        w.add([{"x": d["x"], "color": d["color"]}], [{"label": d["label"]}])
    assert [f.counts.nbytes for _, ws in w.tensors for f in ws] == sizes
    assert sum(sizes) < 64 * 1024
    assert w.requests == 50


def test_pooled_tensor_and_shape_mismatch() -> None:
    rng = np.random.default_rng(13)
    images = rng.normal(0, 1, (200, 3, 8, 8)).astype(np.float32)  # 192 elements per sample
    profile = build_profile("m", "1", {"img": ("FP32", images)}, {}, 0.0)
    t = profile.tensors[0]
    assert t.pooled and len(t.features) == 1 and t.features[0].index is None
    w = DriftWindow(profile)
    w.add([{"img": images[:10]}], [])
    assert w.tensors[0][1][0].count == 10 * 192
    tab = build_profile("m", "1", {"v": ("FP32", rng.normal(0, 1, (100, 4)))}, {}, 0.0)
    w2 = DriftWindow(tab)
    w2.add([{"v": np.zeros((2, 3))}], [])  # 6 elements: not a whole number of 4-element rows
    assert w2.shape_mismatches == 1


def test_profile_json_round_trip() -> None:
    rng = np.random.default_rng(14)
    profile = _profile(rng)
    doc = json.loads(json.dumps(profile_to_dict(profile)))
    again = profile_from_dict(doc)
    assert profile_to_dict(again) == profile_to_dict(profile)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("schema",), "other", "schema"),
        (("version",), 2, "version"),
        (("tensors",), [], "tensors"),
        (("tensors", 0, "features", 0, "edges"), [1.0, 0.5], "increasing"),
        (("tensors", 0, "features", 0, "proportions"), [1.0], "entries"),
        (("tensors", 0, "features", 0, "missing_rate"), 2.0, "not in [0, 1]"),
        (("tensors", 0, "features", 0, "kind"), "weird", "kind"),
        (("tensors", 0, "features", 0, "mean"), "x", "expected"),
        (("tensors", 0, "role"), "sideways", "role"),
    ],
)
def test_malformed_profiles_are_rejected(path: tuple[Any, ...], value: Any, message: str) -> None:
    rng = np.random.default_rng(15)
    doc = profile_to_dict(_profile(rng))
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        profile_from_dict(doc)


# -- properties ------------------------------------------------------------------------------

proportions = st.integers(2, 30).flatmap(
    lambda k: st.tuples(
        hnp.arrays(np.float64, k, elements=st.floats(0.0, 1.0, allow_subnormal=False)),
        hnp.arrays(np.float64, k, elements=st.floats(0.0, 1.0, allow_subnormal=False)),
    )
).filter(lambda pq: pq[0].sum() > 0 and pq[1].sum() > 0)


@given(proportions)
def test_psi_is_non_negative_and_zero_for_identical(pq: tuple[Any, Any]) -> None:
    p, q = pq[0] / pq[0].sum(), pq[1] / pq[1].sum()
    assert drift.psi(p, q) >= 0.0
    assert drift.psi(p, p) == 0.0


@given(proportions)
def test_js_is_a_bounded_symmetric_distance(pq: tuple[Any, Any]) -> None:
    p, q = pq
    d = drift.js_distance(p, q)
    assert 0.0 <= d <= 1.0
    assert d == pytest.approx(drift.js_distance(q, p), abs=1e-12)
    assert drift.js_distance(p, p) == pytest.approx(0.0, abs=1e-7)
    expected = float(jensenshannon(p, q, base=2))
    if np.isnan(expected):
        # scipy takes the square root of a divergence that rounding can leave a hair
        # below zero; that happens only for (numerically) equal distributions.
        assert np.allclose(p / p.sum(), q / q.sum(), rtol=0.0, atol=1e-12)
        expected = 0.0
    assert d == pytest.approx(expected, abs=1e-7)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(np.float64, st.integers(1, 400), elements=finite),
    hnp.arrays(np.float64, st.integers(1, 400), elements=finite),
    st.integers(1, 7),
)
def test_window_statistics_are_bounded_and_chunking_invariant(
    ref_data: Any, live: Any, chunks: int
) -> None:
    ref = _numeric(ref_data)
    whole = _window(ref, live)
    parts = NumericWindow(ref)
    for piece in np.array_split(live, chunks):
        parts.add(piece)
    assert np.array_equal(whole.counts, parts.counts)
    ks = ks_binned(ref, whole)
    assert 0.0 <= ks <= 1.0 + 1e-12
    assert wasserstein_binned(ref, whole) >= 0.0
    with warnings.catch_warnings():  # scipy's p-value for tiny samples; the statistic is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = float(ks_2samp(ref_data, live).statistic)
    assert abs(ks - exact) <= ks_binning_bound(
        ref, whole
    ) + 1e-9
    assert ref.proportions.sum() == pytest.approx(1.0)
    assert set(ref.edges.tolist()) <= set(ref.fine_edges.tolist())


@settings(max_examples=40)
@given(st.lists(st.sampled_from(["a", "b", "c", "", "d"]), min_size=1, max_size=200))
def test_categorical_reference_frequencies_sum_to_one(values: list[str]) -> None:
    ref = build_categorical_reference("c", 0, np.array(values, dtype=object), OPTIONS)
    assert isinstance(ref, CategoricalReference)
    present = [v for v in values if v]
    assert ref.missing_rate == pytest.approx(1 - len(present) / len(values))
    if present:
        assert ref.frequencies.sum() == pytest.approx(1.0)
    assert math.isfinite(float(ref.frequencies.sum()))
