"""The telemetry parts that need no process: latency percentiles from the histogram,
the sampling monitor's bounded queue and windows, reference data readers, the
profile file, per-model thresholds, message size limits and config validation.

No agent.wire import here (the agent's data types are stood in for by plain
dataclasses with the same attributes the monitor reads)."""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import build_config
from agent.errors import ConfigError
from agent.serving.stats import LATENCY_BOUNDS_NS, ModelStats
from agent.telemetry.drift.monitor import DriftMonitor
from agent.telemetry.drift.profile_io import (
    PROFILE_FILENAME,
    TensorInfo,
    encode_profile,
    parse_profile,
    read_profile,
    read_reference_data,
    write_profile,
)
from agent.telemetry.drift.profiles import DriftThresholds, ProfileError, build_profile
from agent.telemetry.drift.statistics import compare_window
from agent.telemetry.health import latency_percentiles
from agent.telemetry.publisher import MAX_MESSAGE_BYTES, _fit, encode, thresholds_for

# -- latency histogram --------------------------------------------------------------------


def _histogram(latencies_ns: Any) -> ModelStats:
    stats = ModelStats()
    from agent.serving.stats import ExecutionTimings

    t = ExecutionTimings(1, 0, 0, 0)
    for ns in latencies_ns:
        stats.record_success(int(ns), 0, 1, t)
    return stats


@pytest.mark.parametrize("scale_ms", [0.05, 0.5, 3.0, 40.0])
def test_percentiles_from_histogram_within_one_bucket(scale_ms: float) -> None:
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(math.log(scale_ms * 1e6), 0.6, 20_000)
    stats = _histogram(latencies)
    assert sum(stats.latency) == stats.success.count == 20_000
    got = latency_percentiles(stats.latency)
    for q, value in zip((50, 95, 99), got, strict=True):
        exact = float(np.percentile(latencies, q)) / 1e9
        assert value is not None
        # The answer lies in the bucket that holds the exact quantile (ratio <= 1.67).
        i = int(np.searchsorted(LATENCY_BOUNDS_NS, exact * 1e9))
        lo = LATENCY_BOUNDS_NS[i - 1] / 1e9 if i else 0.0
        hi = LATENCY_BOUNDS_NS[i] / 1e9
        assert lo <= value <= hi * 1.0000001, (q, exact, value)
        assert value == pytest.approx(exact, rel=0.35)


def test_percentiles_empty_and_overflow() -> None:
    assert latency_percentiles([0] * (len(LATENCY_BOUNDS_NS) + 1)) == [None, None, None]
    stats = _histogram([200e9] * 10)  # slower than the last bound
    assert latency_percentiles(stats.latency) == [LATENCY_BOUNDS_NS[-1] / 1e9] * 3


@given(st.lists(st.integers(1, 10**11), min_size=1, max_size=300))
def test_percentiles_are_ordered(latencies: list[int]) -> None:
    p50, p95, p99 = latency_percentiles(_histogram(latencies).latency)
    assert p50 is not None and p95 is not None and p99 is not None
    assert 0 <= p50 <= p95 <= p99


# -- the sampling monitor -------------------------------------------------------------


@dataclass
class _Spec:
    name: str
    version: str


@dataclass
class _Model:
    spec: _Spec
    loaded_at: float = 1.0


@dataclass
class _Decoded:
    feeds: dict[str, Any]


@dataclass
class _Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


@dataclass
class _Done:
    outputs: list[_Output] = field(default_factory=list)


def _profile() -> Any:
    rng = np.random.default_rng(2)
    return build_profile(
        "m", "1",
        {"x": ("FP32", rng.normal(0, 1, (5000, 2)).astype(np.float32)),
         "s": ("BYTES", np.array([["a"], ["b"]] * 2500, dtype=object))},
        {"y": ("FP64", rng.normal(0, 1, (5000, 1))),
         "t": ("BYTES", np.array([["u"], ["v"]] * 2500, dtype=object))},
        created_at=0.0,
    )


def _request(rng: np.random.Generator, shift: float = 0.0) -> tuple[_Decoded, _Done]:
    x = rng.normal(shift, 1, (4, 2)).astype(np.float32)
    y = rng.normal(shift, 1, (4, 1))
    strings = b"".join(struct.pack("<I", 1) + c for c in (b"u", b"v", b"u", b"v"))
    return (
        _Decoded({"x": x, "s": np.array([["a"], ["b"], ["a"], ["b"]], dtype=object)}),
        _Done([_Output("y", "FP64", (4, 1), y.tobytes()),
               _Output("t", "BYTES", (4, 1), strings)]),
    )


def test_monitor_samples_into_windows_off_the_caller() -> None:
    profile = _profile()
    monitor = DriftMonitor(1.0, lambda m, v: profile if m == "m" else None, capacity=10_000)
    model, other = _Model(_Spec("m", "1")), _Model(_Spec("no_profile", "1"))
    rng = np.random.default_rng(3)
    for _ in range(300):
        monitor.tap(model, *_request(rng))  # type: ignore[arg-type]
        monitor.tap(other, *_request(rng))  # type: ignore[arg-type]
    assert monitor.queued == 600
    monitor.drain()
    assert monitor.counters.processed == 300 and monitor.counters.no_profile == 300
    monitor.tap(other, *_request(rng))  # type: ignore[arg-type]
    assert monitor.queued == 0  # known to have no profile: not even queued
    windows = monitor.rollover([("m", "1", 1.0), ("no_profile", "1", 1.0)])
    assert [(w.model, w.version) for w in windows] == [("m", "1")]
    result = compare_window(windows[0].window, DriftThresholds(min_samples=100))
    assert result.requests == 300
    assert {f.name: f.count for f in result.features} == {
        "x[0]": 1200, "x[1]": 1200, "s": 1200, "y": 1200, "t": 1200
    }
    assert result.status == "ok"
    # The next window starts empty, and a version no longer served is forgotten.
    assert monitor.rollover([("m", "1", 1.0)])[0].window.requests == 0
    assert monitor.rollover([]) == []


def test_monitor_queue_is_bounded_and_never_blocks() -> None:
    profile = _profile()
    monitor = DriftMonitor(1.0, lambda m, v: profile, capacity=50, max_queued_bytes=10**9)
    model = _Model(_Spec("m", "1"))
    rng = np.random.default_rng(4)
    request = _request(rng)
    start = time.perf_counter()
    for _ in range(10_000):
        monitor.tap(model, *request)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    assert monitor.queued == 50
    assert monitor.counters.sampled == 10_000 and monitor.counters.dropped_full == 9_950
    assert elapsed < 1.0  # 10k taps: no waiting anywhere
    small = DriftMonitor(1.0, lambda m, v: profile, capacity=10**6, max_queued_bytes=100)
    for _ in range(10):
        small.tap(model, *request)  # type: ignore[arg-type]
    assert small.queued <= 2 and small.counters.dropped_full >= 8  # bounded by bytes too


def test_monitor_sample_rate() -> None:
    monitor = DriftMonitor(0.25, lambda m, v: None, capacity=10**6)
    model = _Model(_Spec("m", "1"))
    rng = np.random.default_rng(5)
    request = _request(rng)
    for _ in range(20_000):
        monitor.tap(model, *request)  # type: ignore[arg-type]
    assert 4_500 < monitor.counters.sampled < 5_500
    off = DriftMonitor(0.0, lambda m, v: None)
    for _ in range(100):
        off.tap(model, *request)  # type: ignore[arg-type]
    assert off.counters.sampled == 0


def test_monitor_thread_drains_and_flags_a_shift() -> None:
    profile = _profile()
    monitor = DriftMonitor(1.0, lambda m, v: profile, drain_interval_s=0.01)
    monitor.start()
    try:
        model = _Model(_Spec("m", "1"))
        rng = np.random.default_rng(6)
        for _ in range(400):
            monitor.tap(model, *_request(rng, shift=2.0))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while monitor.counters.processed < 400 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert monitor.counters.processed == 400
    finally:
        monitor.stop()
    window = monitor.rollover([("m", "1", 1.0)])[0].window
    result = compare_window(window, DriftThresholds())
    assert result.status == "drift"
    assert {"x[0]", "x[1]", "y"} <= set(result.drifting)
    assert not {"s", "t"} & set(result.drifting)


# -- reference data and the profile file ------------------------------------------------------


FEATURES = TensorInfo("features", "FP32", (3,))
CATEGORY = TensorInfo("category", "BYTES", (1,))
WEIGHT = TensorInfo("weight", "FP64", (1,))


def test_read_npy_npz_and_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (50, 3))
    np.save(tmp_path / "x.npy", x)
    got = read_reference_data(tmp_path / "x.npy", [FEATURES])
    assert got["features"].dtype == np.float32 and got["features"].shape == (50, 3)
    np.savez(tmp_path / "d.npz", features=x, category=np.array(["a", "b"] * 25)[:, None],
             weight=np.arange(50.0), ignored=np.zeros(3))
    got = read_reference_data(tmp_path / "d.npz", [FEATURES, CATEGORY, WEIGHT], max_rows=20)
    assert got["category"].dtype == object and got["category"][1, 0] == "b"
    assert got["weight"].shape == (20, 1) and got["features"].shape == (20, 3)
    (tmp_path / "d.csv").write_text(
        "features[0],features[1],features[2],category,weight\n"
        "1.0,2.0,3.0,red,0.5\n"
        "4.0,,6.0,,1.5\n"
    )
    got = read_reference_data(tmp_path / "d.csv", [FEATURES, CATEGORY, WEIGHT])
    assert got["features"][0].tolist() == [1.0, 2.0, 3.0]
    assert math.isnan(float(got["features"][1, 1]))  # an empty cell is missing
    assert got["category"][:, 0].tolist() == ["red", ""]
    (tmp_path / "plain.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    got = read_reference_data(tmp_path / "plain.csv", [FEATURES])  # one tensor: all columns
    assert got["features"].tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("name", "content", "tensors", "message"),
    [
        ("x.npy", None, [FEATURES, WEIGHT], "holds one array"),
        ("bad.csv", "features[0],features[2]\n1,2\n", [FEATURES], "cover 0..2"),
        ("short.csv", "features[0],features[1],features[2]\n1,2\n", [FEATURES], "row 2"),
        ("text.csv", "weight\nabc\n", [WEIGHT], "weight"),
        ("wide.npy", "wide", [FEATURES], "needs 3 element"),
        ("x.parquet", b"", [FEATURES], "unknown data format"),
        ("empty.csv", "", [FEATURES], "empty file"),
    ],
)
def test_bad_reference_data_is_refused_with_a_reason(
    tmp_path: Path, name: str, content: Any, tensors: list[TensorInfo], message: str
) -> None:
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((5, 3)))
    elif content == "wide":
        np.save(path, np.zeros((5, 4)))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        read_reference_data(path, tensors)


def test_profile_file_round_trip_and_limits(tmp_path: Path) -> None:
    profile = _profile()
    path = write_profile(tmp_path, profile)
    assert path == tmp_path / PROFILE_FILENAME
    assert not list(tmp_path.glob(".drift_profile.*"))  # no temporary file left behind
    again = read_profile(tmp_path)
    assert encode_profile(again) == encode_profile(profile)
    with pytest.raises(ProfileError, match="not UTF-8 JSON"):
        parse_profile(b"{nope")
    with pytest.raises(ProfileError, match="larger than"):
        parse_profile(b" " * (16 * 1024 * 1024 + 1))
    with pytest.raises(ProfileError, match="No such file"):
        read_profile(tmp_path / "missing")


# -- thresholds, message size, config ----------------------------------------------------------


def test_thresholds_per_model_override_the_defaults() -> None:
    config = build_config({"telemetry": {
        "thresholds": {"psi": [0.15, 0.3], "min_samples": 100},
        "model_thresholds": {"strict": {"psi": [0.05, 0.1], "ks": []}},
    }}).telemetry
    default = thresholds_for(config, "any")
    assert default.psi is not None and (default.psi.warn, default.psi.drift) == (0.15, 0.3)
    assert default.min_samples == 100 and default.ks is not None
    strict = thresholds_for(config, "strict")
    assert strict.psi is not None and strict.psi.drift == 0.1
    assert strict.ks is None  # [] = reported, never flagged
    assert strict.min_samples == 100


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        ({"sample_rate": 1.5}, "telemetry.sample_rate"),
        ({"prometheus_address": "9464"}, "telemetry.prometheus_address"),
        ({"thresholds": {"psi": [0.3, 0.1]}}, "telemetry.thresholds.psi"),
        ({"thresholds": {"psi": [0.1]}}, "telemetry.thresholds.psi"),
        ({"model_thresholds": {"m": {"nope": [1, 2]}}}, "telemetry.model_thresholds.m.nope"),
        ({"outbox_max_messages": 0}, "telemetry.outbox_max_messages"),
        ({"health_interval": 5}, "telemetry.health_interval"),
    ],
)
def test_bad_telemetry_config_names_the_key(telemetry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_config({"telemetry": telemetry})


def test_defaults() -> None:
    t = build_config({}).telemetry
    assert t.prometheus_address == "127.0.0.1:9464"
    assert t.thresholds["psi"] == [0.1, 0.2] and t.sample_rate == 0.1


def test_oversized_drift_message_keeps_the_most_severe_features() -> None:
    def feature(i: int, status: str) -> dict[str, Any]:
        return {"name": f"f{i}", "status": status, "pad": "x" * 300}

    body: dict[str, Any] = {"models": [
        {"name": "a", "features": [feature(i, "drift" if i < 3 else "ok") for i in range(200)],
         "features_omitted": 0},
        {"name": "b", "features": [feature(i, "warn" if i < 2 else "ok") for i in range(200)],
         "features_omitted": 0},
    ]}
    _fit(body, MAX_MESSAGE_BYTES)
    assert len(encode(body)) + 512 <= MAX_MESSAGE_BYTES
    a, b = body["models"]
    assert [f["status"] for f in a["features"][:3]] == ["drift"] * 3
    assert [f["status"] for f in b["features"][:2]] == ["warn"] * 2
    assert a["features_omitted"] + b["features_omitted"] + len(a["features"]) + len(
        b["features"]
    ) == 400
    small: dict[str, Any] = {
        "models": [{"name": "c", "features": [feature(0, "ok")], "features_omitted": 0}]
    }
    _fit(small, MAX_MESSAGE_BYTES)
    assert small["models"][0]["features_omitted"] == 0
    json.dumps(body)


@settings(max_examples=20)
@given(st.floats(0.0, 1.0))
def test_band_levels(value: float) -> None:
    from agent.telemetry.drift.profiles import Band

    band = Band(0.1, 0.2)
    assert band.level(value) == (2 if value >= 0.2 else 1 if value >= 0.1 else 0)


def test_monitor_concurrent_drains_lose_nothing() -> None:
    """The drain thread and a closing window may drain at the same time: every sample
    is processed exactly once and neither raises."""
    import threading

    profile = _profile()
    monitor = DriftMonitor(1.0, lambda m, v: profile, capacity=1_000_000)
    model = _Model(_Spec("m", "1"))
    request = _request(np.random.default_rng(8))
    for _ in range(50_000):
        monitor.tap(model, *request)  # type: ignore[arg-type]
    errors: list[str] = []

    def drainer() -> None:
        try:
            while monitor.queued:
                monitor.drain()
        except Exception as exc:
            errors.append(repr(exc))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        threads = [threading.Thread(target=drainer) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        sys.setswitchinterval(switch)
    assert errors == []
    closed = monitor.rollover([("m", "1", 1.0)])
    assert monitor.counters.processed == 50_000 == closed[0].window.requests


def test_pure_telemetry_modules_import_no_protobuf_code() -> None:
    """Tests and tools that use tritonclient import these: they must not pull agent.wire."""
    import subprocess

    from tests.agent_process import REPO_ROOT

    code = (
        "import sys\n"
        "import agent.telemetry.drift.statistics, agent.telemetry.drift.profile_io\n"
        "import agent.telemetry.outbox\n"
        "import agent.telemetry.drift.monitor, agent.telemetry.health, agent.telemetry.publisher\n"
        "import tritonclient.grpc\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('agent.wire', 'onnxruntime')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_health_of_very_many_models_fits_the_message_limit() -> None:
    from agent.telemetry.publisher import _fit_models

    def model(i: int) -> dict[str, Any]:
        return {"name": f"m{i}", "version": "1", "active": i % 7 == 0, "pad": "x" * 900}

    body: dict[str, Any] = {"host": {}, "models": [model(i) for i in range(200)]}
    _fit_models(body, MAX_MESSAGE_BYTES)
    assert len(encode(body)) + 512 <= MAX_MESSAGE_BYTES
    assert body["models_omitted"] == 200 - len(body["models"]) > 0
    kept = {m["name"] for m in body["models"]}
    assert {f"m{i}" for i in range(0, 200, 7)} <= kept  # every active version is kept
    small: dict[str, Any] = {"models": [model(1)]}
    _fit_models(small, MAX_MESSAGE_BYTES)
    assert small["models_omitted"] == 0 and len(small["models"]) == 1
