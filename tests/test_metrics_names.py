"""Triton's metric names on the agent's Prometheus endpoint (docs/metrics.md).

A real agent process serves the signed example model; a tritonclient sends it
requests (some batched, one that fails); the real /metrics endpoint is scraped,
and every Triton-named series must exist with labels model and version and
agree with what the agent's own statistics extension (ModelStatistics, Triton's
units: ns) says, and with the edge_agent_* series. Also: docs/metrics.md names
every metric the endpoint exports, and the Grafana dashboard is valid JSON
whose queries use only metrics the endpoint exports.

This module uses tritonclient, so it imports nothing that imports agent.wire.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.agent_process import REPO_ROOT, AgentProcess, metrics_address, write_toml

MODEL = "tabular_classifier"
VERSION = "2"
TRUST_DIR = REPO_ROOT / "models" / "keys" / "trusted"
DOCS = REPO_ROOT / "docs"
TRITON_COUNTERS = {
    # Triton name -> the statistics extension field (ns for durations, else a count)
    "nv_inference_request_success": ("success", "count"),
    "nv_inference_request_failure": ("fail", "count"),
    "nv_inference_request_duration_us": ("success", "ns"),
    "nv_inference_queue_duration_us": ("queue", "ns"),
    "nv_inference_compute_input_duration_us": ("compute_input", "ns"),
    "nv_inference_compute_infer_duration_us": ("compute_infer", "ns"),
    "nv_inference_compute_output_duration_us": ("compute_output", "ns"),
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Scraped = tuple[Samples, dict[str, str], dict[str, Any]]


def _scrape(address: str) -> tuple[Samples, dict[str, str]]:
    """Every sample, and every family's name -> type."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Scraped:
    tmp = tmp_path_factory.mktemp("metrics")
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    config = write_toml(tmp / "agent.toml", {
        "server": {"address": "127.0.0.1:0", "drain_timeout_s": 2.0},
        "repository": {"path": str(repo)},
        "signing": {"trust_dir": str(TRUST_DIR)},
        "state": {"dir": str(tmp / "state")},
        "telemetry": {"prometheus_address": "127.0.0.1:0", "sample_rate": 0.0},
    })
    agent = AgentProcess(config)
    try:
        agent.wait_serving(60)
        metrics_at = metrics_address(agent)
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            for rows in (1, 2, 3, 1, 4):  # 11 samples in 5 requests
                features = grpcclient.InferInput("features", [rows, 8], "FP32")
                features.set_data_from_numpy(np.ones((rows, 8), np.float32))
                client.infer(MODEL, [features], model_version=VERSION)
            wrong = grpcclient.InferInput("features", [1, 8], "FP64")  # a failed request
            wrong.set_data_from_numpy(np.ones((1, 8), np.float64))
            with pytest.raises(InferenceServerException):
                client.infer(MODEL, [wrong], model_version=VERSION)
            stats = client.get_inference_statistics(MODEL, VERSION, as_json=True)
            samples, types = _scrape(metrics_at)
        finally:
            client.close()
    finally:
        agent.stop()
    (model_stats,) = stats["model_stats"]
    return samples, types, model_stats


LABELS = (("model", MODEL), ("version", VERSION))


def test_triton_named_series_agree_with_the_statistics_extension(
    scraped: Scraped,
) -> None:
    samples, types, stats = scraped
    inference = stats["inference_stats"]
    assert int(inference["success"]["count"]) == 5
    for name, (field, unit) in TRITON_COUNTERS.items():
        assert (name, LABELS) in samples, name
        expected = int(inference[field].get(unit, 0))
        if unit == "ns":
            expected //= 1000
        assert samples[(name, LABELS)] == expected, name
    assert samples[("nv_inference_count", LABELS)] == 11 == int(stats["inference_count"])
    assert samples[("nv_inference_exec_count", LABELS)] == int(stats["execution_count"])
    assert 1 <= samples[("nv_inference_exec_count", LABELS)] <= 5
    assert samples[("nv_inference_request_failure", LABELS)] >= 1
    assert samples[("nv_inference_pending_request_count", LABELS)] == 0
    # The same counts under the agent's own names.
    assert samples[("edge_agent_model_requests_total", (*LABELS[:1], ("outcome", "success"),
                                                       LABELS[1]))] == 5
    assert samples[("edge_agent_model_inferences_total", LABELS)] == 11
    # Exactly Triton's names (no "_total" suffix).
    for name in (*TRITON_COUNTERS, "nv_inference_count", "nv_inference_exec_count"):
        assert name in types and not any(
            n == f"{name}_total" for n, _ in samples
        ), name


def _documented_metrics() -> set[str]:
    text = (DOCS / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z_:]+)`", text, flags=re.MULTILINE))


def test_every_exported_metric_is_documented(
    scraped: Scraped,
) -> None:
    _, types, _ = scraped
    # The standard process_* / python_* collectors are prometheus_client's own.
    # A counter family "x" is exposed as x_total.
    ours = {
        f"{n}_total" if t == "counter" else n
        for n, t in types.items() if n.startswith(("edge_agent_", "nv_"))
    }
    # Families absent without sensors or drift data are documented too, so <=.
    assert ours <= _documented_metrics(), sorted(ours - _documented_metrics())


def test_the_grafana_dashboard_uses_exported_metrics(
    scraped: Scraped,
) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    documented = _documented_metrics()
    series = {name for name, _ in scraped[0]}
    used = {m for e in exprs for m in re.findall(r"\b((?:nv|edge_agent)_[a-z_]+)", e)}
    assert any(m.startswith("nv_") for m in used)
    for metric in used:
        assert metric in series or metric in documented, metric
