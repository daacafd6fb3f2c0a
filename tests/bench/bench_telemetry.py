"""Telemetry benchmark: what drift monitoring and the outbox cost. Prints tables.

1. Serving throughput at client concurrency 16 on the example tabular model
   (its version directory profiled and signed here), with drift monitoring off
   (``sample_rate = 0``) and on (0.1, the default, and 1.0, every request),
   telemetry publishing to a local mosquitto in every case. Each configuration
   has its own agent process; all run side by side and the load visits them in
   short slices, round after round, in a rotating order (so that whatever else
   the machine does hits each alike). The table shows the median slice, the
   ratio to "off" (target >= 0.95), the agent's CPU time per 1,000 requests
   and what the drift thread did with the samples (cumulative).
2. The outbox: durable ``put`` (SQLite WAL, synchronous=FULL: one fsync per
   message) and ``ack`` cost per message for health-sized and drift-sized
   messages, on the file system of ``--state-dir`` (default: a temp dir).
3. The drift window: cost of accumulating a batch and of computing a window's
   statistics for the profiled model.

    .venv/bin/python tests/bench/bench_telemetry.py [--duration 4] [--rounds 8]

Every process started here is stopped by its PID; every load loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from agent.telemetry.drift.profile_io import read_profile  # noqa: E402
from agent.telemetry.drift.profiles import DriftThresholds  # noqa: E402
from agent.telemetry.drift.statistics import DriftWindow, compare_window  # noqa: E402
from agent.telemetry.outbox import Outbox, OutboxLimits, Stamp  # noqa: E402
from tests.agent_process import AgentProcess, write_toml  # noqa: E402
from tests.mqtt_broker import MosquittoBroker  # noqa: E402

MODEL = "tabular_classifier"
VERSION = "2"
DEMO_KEY = REPO_ROOT / "models" / "keys" / "demo-model-signing.key.pem"
TRUST_DIR = REPO_ROOT / "models" / "keys" / "trusted"
CONCURRENCY = 16
MAX_REQUESTS_PER_S = 50_000  # bounds every load loop


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent.cli", *args], check=True, cwd=REPO_ROOT,
                   capture_output=True, timeout=300)


def prepare_repo(root: Path) -> Path:
    repo = root / "repo"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    data = root / "reference.npz"
    rng = np.random.default_rng(42)
    np.savez(data, features=rng.normal(0.0, 1.0, (10_000, 8)).astype(np.float32))
    _cli("profile", str(repo / MODEL / VERSION), "--data", str(data), "--quiet")
    _cli("sign", str(repo / MODEL / VERSION), "--private-key", str(DEMO_KEY))
    return repo


# -- 1. throughput ------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    sample_rate: float
    infer_per_s: float
    errors: int
    cpu_ms_per_1k: float
    sampled: float
    processed: float
    dropped: float


async def _load(address: str, duration: float, warmup: float) -> tuple[int, int, float, int]:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(address)
    rng = np.random.default_rng(1)
    inputs = []
    for _ in range(64):
        t = aioclient.InferInput("features", [1, 8], "FP32")
        t.set_data_from_numpy(rng.normal(0.0, 1.0, (1, 8)).astype(np.float32))
        inputs.append(t)
    loop = asyncio.get_running_loop()
    counts = {"ok": 0, "err": 0, "all": 0}
    measuring = False
    left = int((duration + warmup) * MAX_REQUESTS_PER_S)

    async def worker(i: int) -> None:
        nonlocal left
        j = i
        while loop.time() < end and left > 0:
            left -= 1
            j = (j + 1) % len(inputs)
            try:
                await client.infer(MODEL, [inputs[j]], model_version=VERSION)
                counts["all"] += 1
                if measuring:
                    counts["ok"] += 1
            except Exception:
                if measuring:
                    counts["err"] += 1

    end = loop.time() + warmup + duration
    tasks = [asyncio.create_task(worker(i)) for i in range(CONCURRENCY)]
    await asyncio.sleep(warmup)
    measuring = True
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    await client.close()
    return counts["ok"], counts["err"], elapsed, counts["all"]


def _metric(address: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return float("nan")


def _metrics_address(agent: AgentProcess) -> str:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for e in list(agent.events):
            if e.get("msg") == "prometheus endpoint listening":
                return str(e["address"])
        time.sleep(0.05)
    raise RuntimeError("agent did not log its Prometheus address")


@dataclass
class Server:
    label: str
    rate: float
    agent: AgentProcess
    metrics: str
    state: Path


def start_server(
    root: Path, repo: Path, broker: MosquittoBroker, label: str, rate: float
) -> Server:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=root))
    config = write_toml(root / f"agent-{rate}.toml", {
        "server": {"address": "127.0.0.1:0"},
        "repository": {"path": str(repo)},
        "signing": {"trust_dir": str(TRUST_DIR)},
        "state": {"dir": str(state)},
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port,
                 "device_id": f"bench-{label.replace(' ', '-')}"},
        "telemetry": {"health_interval_s": 1.0, "drift_window_s": 5.0, "sample_rate": rate,
                      "prometheus_address": "127.0.0.1:0"},
    })
    agent = AgentProcess(config)
    agent.wait_serving(60)
    return Server(label, rate, agent, _metrics_address(agent), state)


def measure(server: Server, args: Any) -> Run:
    import psutil

    proc = psutil.Process(server.agent.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    ok, err, elapsed, served = asyncio.run(_load(server.agent.address, args.duration, args.warmup))
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    time.sleep(0.2)  # let the drift thread drain
    m = server.metrics
    return Run(
        server.label, server.rate, ok / elapsed, err, cpu * 1e6 / max(served, 1),
        _metric(m, "edge_agent_drift_samples_total", fate="sampled"),
        _metric(m, "edge_agent_drift_samples_total", fate="processed"),
        _metric(m, "edge_agent_drift_samples_total", fate="dropped_queue_full"),
    )


def bench_throughput(root: Path, args: Any) -> list[list[Run]]:
    """All configurations run side by side (idle but for telemetry); the load visits
    them in turn, in short slices, so that other activity on the machine hits
    every configuration alike."""
    repo = prepare_repo(root)
    broker = MosquittoBroker(root / "mosquitto").start()
    configs = [("off", 0.0), ("on 0.1", 0.1), ("on 1.0", 1.0)]
    servers: list[Server] = []
    rounds: list[list[Run]] = []
    try:
        for label, rate in configs:
            servers.append(start_server(root, repo, broker, label, rate))
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[: r % len(servers)]
            results = {s.label: measure(s, args) for s in order}
            rounds.append([results[s.label] for s in servers])
            print(f"  round {r + 1}: " + ", ".join(
                f"{x.label} {x.infer_per_s:,.0f}/s" for x in rounds[-1]), flush=True)
    finally:
        for s in servers:
            s.agent.stop()
            shutil.rmtree(s.state, ignore_errors=True)
        broker.stop()
    return rounds


def print_throughput(rounds: list[list[Run]]) -> None:
    print()
    print(f"Throughput, tabular_classifier, batch 1, client concurrency {CONCURRENCY} "
          f"(median of {len(rounds)} slices each; telemetry to mosquitto in every row)")
    head = (f"{'drift monitoring':<18}{'infer/s':>9}{'vs off':>8}{'errors':>8}"
            f"{'CPU ms/1k req':>15}{'CPU vs off':>12}{'sampled':>10}{'processed':>11}"
            f"{'dropped':>9}")
    print(head)
    print("-" * len(head))
    off = statistics.median(r[0].infer_per_s for r in rounds)
    off_cpu = statistics.median(r[0].cpu_ms_per_1k for r in rounds)
    for i in range(len(rounds[0])):
        runs = [r[i] for r in rounds]
        last = runs[-1]  # the sample counters are cumulative
        rate = statistics.median(x.infer_per_s for x in runs)
        cpu = statistics.median(x.cpu_ms_per_1k for x in runs)
        print(f"{last.label + f' (rate {last.sample_rate:g})':<18}"
              f"{rate:>9,.0f}{rate / off:>8.3f}{sum(x.errors for x in runs):>8}"
              f"{cpu:>15.1f}{off_cpu / cpu:>12.3f}"
              f"{last.sampled:>10,.0f}{last.processed:>11,.0f}{last.dropped:>9,.0f}")
    spread = [max(x.infer_per_s for x in col) / min(x.infer_per_s for x in col)
              for col in zip(*rounds, strict=True)]
    print(f"(slowest to fastest slice of one configuration: up to {max(spread):.1f}x; "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}. "
          "'CPU vs off' = the agent's CPU time per request without drift monitoring over "
          "with it: the throughput ratio when the agent is CPU-bound, and far less noisy "
          "on a shared machine.)")


# -- 2. outbox ------------------------------------------------------------------------------


def bench_outbox(state_dir: Path, count: int) -> None:
    print()
    print(f"Outbox (SQLite WAL, synchronous=FULL) in {state_dir}, {count} messages per row")
    head = f"{'message':<22}{'bytes':>7}{'put us/msg':>12}{'put msg/s':>11}{'ack us/msg':>12}"
    print(head)
    print("-" * len(head))
    for label, size in (("health", 2_300), ("drift (1 model)", 7_000), ("drift (large)", 50_000)):
        path = state_dir / f"bench-outbox-{size}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        box = Outbox(path, OutboxLimits(max_messages=count * 2, max_bytes=2**40))
        body = "x" * size

        def build(stamp: Stamp, body: str = body) -> bytes:
            return json.dumps({"seq": stamp.seq, "message_id": stamp.message_id,
                               "dropped": stamp.dropped, "body": body}).encode()

        for _ in range(5):
            box.put("edge/devices/d/health", build)  # warm up
        box.ack([e.seq for e in box.pending(10)])
        t0 = time.perf_counter()
        for _ in range(count):
            box.put("edge/devices/d/health", build)
        put_s = (time.perf_counter() - t0) / count
        seqs = [e.seq for e in box.pending(count)]
        t0 = time.perf_counter()
        for start in range(0, len(seqs), 32):  # the publisher acks a batch at a time
            box.ack(seqs[start : start + 32])
        ack_s = (time.perf_counter() - t0) / max(len(seqs), 1)
        box.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        print(f"{label:<22}{size:>7,}{put_s * 1e6:>12,.0f}{1 / put_s:>11,.0f}{ack_s * 1e6:>12,.0f}")


# -- 3. drift window ---------------------------------------------------------------------------


def bench_drift(repo: Path) -> None:
    profile = read_profile(repo / MODEL / VERSION)
    rng = np.random.default_rng(3)
    print()
    print("Drift window (tabular_classifier profile: 8 inputs, 3 probabilities, label)")
    head = f"{'operation':<44}{'us':>10}"
    print(head)
    print("-" * len(head))
    for requests in (1, 64, 1024):
        feeds = [{"features": rng.normal(0, 1, (1, 8)).astype(np.float32)}
                 for _ in range(requests)]
        outs: list[dict[str, Any]] = [
            {"probabilities": rng.dirichlet([1, 1, 1], 1).astype(np.float32),
             "label": rng.integers(0, 3, (1, 1))}
            for _ in range(requests)
        ]
        window = DriftWindow(profile)
        reps = max(3, 2000 // requests)
        t0 = time.perf_counter()
        for _ in range(reps):
            window.add(feeds, outs)
        dt = (time.perf_counter() - t0) / reps
        print(f"{f'add {requests} request(s) (one drain)':<44}{dt * 1e6:>10,.0f}")
        if requests == 1024:
            print(f"{'  per request':<44}{dt * 1e6 / requests:>10,.1f}")
    t0 = time.perf_counter()
    for _ in range(20):
        compare_window(window, DriftThresholds())
    print(f"{'compute one window (all features)':<44}"
          f"{(time.perf_counter() - t0) / 20 * 1e6:>10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per slice")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--outbox-messages", type=int, default=500)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    try:
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
        if not args.skip_throughput:
            print_throughput(bench_throughput(root, args))
        else:
            prepare_repo(root)
        bench_outbox(args.state_dir or root, args.outbox_messages)
        bench_drift(root / "repo")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
