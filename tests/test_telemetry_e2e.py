"""Telemetry end to end: a real agent process, a real mosquitto, real onnxruntime.

The agent serves a signed tabular model whose version directory carries a
drift profile (made with ``edge-agent profile``, then signed) while a client
sends it traffic. Health and drift messages flow on the device's topics; the
Prometheus endpoint counts every request. Then the broker goes away for a
minute, as the issue asks, and the agent is restarted meanwhile; when the broker is
back, every message both agent processes produced arrives, in order, each
with a unique id. A second test gives the outbox a tiny bound and checks that
what was dropped is exactly what the messages report as dropped.

This module uses tritonclient, so it imports nothing that imports agent.wire.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.mqtt.client import MqttClient, MqttSettings
from agent.telemetry.outbox import OUTBOX_FILENAME, Outbox, OutboxLimits
from tests.agent_process import REPO_ROOT, AgentProcess, metrics_address, write_toml
from tests.mqtt_broker import MosquittoBroker

MODEL = "tabular_classifier"
VERSION = "2"
DEVICE = "dev-telemetry"
DEMO_KEY = REPO_ROOT / "models" / "keys" / "demo-model-signing.key.pem"
TRUST_DIR = REPO_ROOT / "models" / "keys" / "trusted"
OUTAGE_S = 60.0

Message = tuple[str, dict[str, Any]]


# -- helpers ---------------------------------------------------------------------------


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent.cli", *args], check=True, cwd=REPO_ROOT,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def profiled_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example tabular model alone, version 2 profiled and (re)signed."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    data = tmp_path_factory.mktemp("data") / "reference.npz"
    rng = np.random.default_rng(42)
    np.savez(data, features=rng.normal(0.0, 1.0, (5000, 8)).astype(np.float32))
    version_dir = repo / MODEL / VERSION
    _cli("profile", str(version_dir), "--data", str(data), "--quiet")
    _cli("sign", str(version_dir), "--private-key", str(DEMO_KEY))
    assert (version_dir / "drift_profile.json").is_file()
    return repo


def _config(tmp: Path, repo: Path, broker: MosquittoBroker, **telemetry: Any) -> Path:
    return write_toml(tmp / "agent.toml", {
        "server": {"address": "127.0.0.1:0", "drain_timeout_s": 2.0},
        "repository": {"path": str(repo)},
        "signing": {"trust_dir": str(TRUST_DIR)},
        "state": {"dir": str(tmp / "state")},
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port,
                 "device_id": DEVICE, "reconnect_max_s": 1.0},
        "telemetry": {"health_interval_s": 1.0, "drift_window_s": 2.0, "sample_rate": 1.0,
                      "prometheus_address": "127.0.0.1:0", **telemetry},
    })


class Collector:
    """A controller-like subscriber with a persistent session (it misses nothing while
    the broker restarts: mosquitto keeps its session and queued messages on disk)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.broker = broker
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by wait_ready / stop
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        client = MqttClient(MqttSettings(
            host=self.broker.host, port=self.broker.port, client_id=f"collector-{uuid.uuid4()}",
            reconnect_min_s=0.5, reconnect_max_s=1.0,
        ))
        topics = [f"edge/devices/{DEVICE}/health", f"edge/devices/{DEVICE}/drift"]
        for topic in topics:
            await client.subscribe(topic)
        await client.start()
        await client.wait_connected(10)
        for topic in topics:  # once more, waiting for the SUBACKs
            await client.subscribe(topic)
        self._ready.set()
        while not self._stop.is_set():
            try:
                msg = await asyncio.wait_for(client.messages.get(), 0.2)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((msg.topic, json.loads(msg.payload)))
        await client.stop()

    def start(self) -> Collector:
        self._thread.start()
        assert self._ready.wait(15), "collector did not connect"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, what: str, ok: Callable[[list[Message]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok(self.snapshot()):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages")


class Traffic:
    """One client thread sending batches of 8 rows (drawn around ``mean``)."""

    def __init__(self, address: str, mean: float = 0.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(address)
        self.mean = mean
        self.ok = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        while not self._stop.is_set():
            x = rng.normal(self.mean, 1.0, (8, 8)).astype(np.float32)
            tensor = self._grpc.InferInput("features", [8, 8], "FP32")
            tensor.set_data_from_numpy(x)
            try:
                self.client.infer(MODEL, [tensor], model_version=VERSION, client_timeout=5.0)
                self.ok += 1
            except Exception:
                self.failed += 1
            time.sleep(0.003)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.client.close()


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _requests(metrics: dict[Any, float], outcome: str) -> float:
    key = ("edge_agent_model_requests_total",
           (("model", MODEL), ("outcome", outcome), ("version", VERSION)))
    return metrics[key]


def _first_arrivals(messages: list[Message]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for _topic, body in messages:
        if body["message_id"] not in seen:
            seen.add(body["message_id"])
            out.append(body)
    return out


def _outbox_state(state_dir: Path) -> tuple[int, int, int]:
    """(messages left, last seq produced, dropped in all) of a stopped agent's outbox."""
    box = Outbox(state_dir / OUTBOX_FILENAME, OutboxLimits())
    try:
        return box.count, box.next_seq() - 1, box.dropped_total()
    finally:
        box.close()


@pytest.fixture
def collector(mqtt_broker: MosquittoBroker) -> Iterator[Collector]:
    c = Collector(mqtt_broker).start()
    try:
        yield c
    finally:
        c.stop()


# -- tests ---------------------------------------------------------------------------------


def test_telemetry_survives_broker_outage_and_agent_restart(
    tmp_path: Path, profiled_repo: Path, mqtt_broker: MosquittoBroker, collector: Collector
) -> None:
    config = _config(tmp_path, profiled_repo, mqtt_broker)
    agents: list[AgentProcess] = []
    try:
        # 1. Telemetry flows; Prometheus counts every request the client made.
        first = AgentProcess(config)
        agents.append(first)
        first.wait_serving()
        metrics_at = metrics_address(first)
        with Traffic(first.address) as traffic:
            collector.wait_for(
                "health and an unshifted drift window",
                lambda ms: any(b["schema"] == "edge.drift" and b["models"]
                               and b["models"][0]["requests"] >= 50 for _, b in ms)
                and sum(b["schema"] == "edge.health" for _, b in ms) >= 2,
                timeout=30,
            )
        assert traffic.ok > 50 and traffic.failed == 0
        metrics = _scrape(metrics_at)
        assert _requests(metrics, "success") == traffic.ok
        assert _requests(metrics, "failure") == 0
        latency_count = ("edge_agent_model_request_duration_seconds_count",
                         (("model", MODEL), ("version", VERSION)))
        assert metrics[latency_count] == traffic.ok
        assert any(name == "edge_agent_drift_samples_total" for name, _ in metrics)

        health = [b for _, b in collector.snapshot() if b["schema"] == "edge.health"]
        model = next(m for m in health[-1]["models"] if m["name"] == MODEL)
        assert model["active"] and model["version"] == VERSION
        assert model["requests"]["success"] > 0 and model["latency_ms"]["p99"] > 0
        assert health[-1]["host"]["memory"]["total_bytes"] > 0
        assert health[-1]["process"]["rss_bytes"] > 0
        drift_msgs = [b for _, b in collector.snapshot() if b["schema"] == "edge.drift"]
        judged = [m for b in drift_msgs for m in b["models"] if m["status"] != "insufficient_data"]
        assert judged and all(m["status"] == "ok" for m in judged), judged

        # 2. The broker goes away; telemetry keeps being produced into the outbox,
        #    and the agent is restarted in the middle of the outage.
        outage_start = time.time()
        mqtt_broker.stop()
        time.sleep(0.5)  # anything already on its way to the collector has arrived
        received_before = len(collector.snapshot())
        with Traffic(first.address):
            time.sleep(OUTAGE_S / 2)
        assert first.stop() == 0
        second = AgentProcess(config)
        agents.append(second)
        second.wait_serving()
        with Traffic(second.address, mean=1.5):  # shifted inputs: drift
            remaining = OUTAGE_S - (time.time() - outage_start)
            time.sleep(max(remaining, 3.0))
            assert len(collector.snapshot()) == received_before  # nothing got through
            # 3. The broker returns: the backlog and new messages arrive.
            outage_end = time.time()
            mqtt_broker.start()
            collector.wait_for(
                "a drift window produced after the broker returned",
                lambda ms: any(b["schema"] == "edge.drift" and b["ts"] > outage_end
                               for _, b in ms),
                timeout=60,
            )
        assert second.stop() == 0
        left, last_seq, dropped = _outbox_state(tmp_path / "state")
        assert dropped == 0
        if left:  # the final report may still be in flight at stop: it is kept for later
            assert left <= 2
        collector.wait_for(
            f"every message up to seq {last_seq - left}",
            lambda ms: {b["seq"] for _, b in ms} >= set(range(1, last_seq - left + 1)),
            timeout=30,
        )

        messages = collector.snapshot()
        firsts = _first_arrivals(messages)
        seqs = [b["seq"] for b in firsts]
        assert seqs == sorted(seqs), "messages arrived out of order"
        assert set(seqs) >= set(range(1, last_seq - left + 1))
        by_seq: dict[int, str] = {}
        for _, b in messages:  # a duplicate (at-least-once) repeats the same id
            assert by_seq.setdefault(b["seq"], b["message_id"]) == b["message_id"]
        assert len(set(by_seq.values())) == len(by_seq)
        assert all(b["dropped"] == 0 and b["dropped_total"] == 0 for b in firsts)
        for _, b in messages:
            assert b["device"] == DEVICE and b["version"] == 1
            assert b["schema"] in ("edge.health", "edge.drift")

        # Both processes' outage-time messages came through the outbox.
        during = [b for b in firsts if outage_start < b["ts"] < outage_end]
        pids = {b["agent"]["pid"] for b in during if b["schema"] == "edge.health"}
        assert pids == {first.pid, second.pid}
        assert len(during) >= OUTAGE_S * 0.8  # ~1 health per second, plus drift windows
        stopping = [b for b in firsts if b["schema"] == "edge.health" and b["agent"]["stopping"]]
        assert any(b["agent"]["pid"] == first.pid for b in stopping)  # the final report

        # The shifted traffic was flagged, as an event with the features that moved.
        events = [e for b in firsts if b["schema"] == "edge.drift" for e in b["events"]]
        assert any(e["to"] == "drift" and "features[0]" in e["drifting"] for e in events)
    finally:
        for agent in agents:
            agent.stop()


def test_outbox_bound_drops_oldest_and_reports_it(
    tmp_path: Path, profiled_repo: Path, mqtt_broker: MosquittoBroker, collector: Collector
) -> None:
    config = _config(
        tmp_path, profiled_repo, mqtt_broker,
        health_interval_s=0.5, drift_window_s=60.0, sample_rate=0.0, outbox_max_messages=5,
    )
    agent = AgentProcess(config)
    try:
        agent.wait_serving()
        collector.wait_for("health", lambda ms: len(ms) >= 2, timeout=20)
        mqtt_broker.stop()
        time.sleep(6.0)  # ~12 health messages into a 5-message outbox
        mqtt_broker.start()
        collector.wait_for(
            "a message reporting drops",
            lambda ms: any(b["dropped"] > 0 for _, b in ms), timeout=30,
        )
        time.sleep(2.0)
    finally:
        agent.stop()
    box = Outbox(tmp_path / "state" / OUTBOX_FILENAME, OutboxLimits())
    try:
        left = {e.seq for e in box.pending(1000)}
        last_seq, dropped_total = box.next_seq() - 1, box.dropped_total()
    finally:
        box.close()
    firsts = _first_arrivals(collector.snapshot())
    seqs = [b["seq"] for b in firsts]
    assert seqs == sorted(seqs), "messages arrived out of order"
    missing = set(range(1, last_seq + 1)) - set(seqs) - left
    # ~12 messages into a 5-message outbox: the oldest went, and exactly those are
    # the gaps in seq (one more only if a message reached the broker but its PUBACK
    # did not come back before the broker stopped).
    assert 5 <= len(missing) <= 14
    assert len(missing) <= dropped_total <= len(missing) + 1
    reported = [b for b in firsts if b["dropped"] > 0]
    assert reported, "no message reported the drops"
    assert reported[0]["seq"] > min(missing)
    totals = [b["dropped_total"] for b in firsts]
    assert totals == sorted(totals) and 0 < totals[-1] <= dropped_total
