"""Benchmark: a staged rollout of a 5 MB model to N simulated devices through 2 controllers.

For each fleet size (default 100, 300, 1000): one local mosquitto (plain TCP on
127.0.0.1, its fd limit raised with ``resource.setrlimit`` before it starts),
two ``edge-controller serve`` processes sharing one store (chunk requests via
the shared subscription), N devices from tests/bench/fleet_sim.py (the agent's
real updater on its real MQTT client, chunk fetcher and state store, no
onnxruntime) spread over
``--sim-processes`` processes, and one ``edge-controller deploy --group all``
(first wave 10%, then waves of ``--wave-size`` 20%, soak 1 s). Prints, per size:

* rollout s: from starting ``deploy`` to it reporting ``completed``;
* chunks/s: chunk requests the two controllers answered, per second of rollout;
* MB/s: bytes served per second;
* peak ctrl RSS: the larger controller's peak RSS (VmHWM);
* broker msg/s: messages mosquitto received + sent per second of rollout
  (``$SYS/broker/messages/*``, sampled before and after);
* shed: chunk requests the controllers left unanswered because the device had
  already given up on them (overload; 0 on a machine that keeps up);
* growth: each metric relative to the smallest fleet.

Then, per size, what the simulated devices cost (how many one simulator process
can carry): seconds until every device was connected and subscribed, peak RSS
of the simulator processes per device, and their CPU time per device while
connecting and during the rollout.

    .venv/bin/python tests/bench/bench_fleet_scale.py [--sizes 100,300,1000] [--size-mb 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.mqtt.client import MqttClient, MqttSettings
from tests.bench.fleet_sim import SimFleet, SimOptions, device_names, raise_fd_limit
from tests.controller_process import (
    ControllerProcess,
    controller_toml,
    publish_version,
    run_controller,
)
from tests.fleet_device import make_signed_version, make_signing_keys
from tests.mqtt_broker import MosquittoBroker


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssWatcher:
    """Samples VmHWM of some PIDs (read it before the process exits)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _peak_rss(pid))

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(2)
        for pid in self.pids:
            self.peak[pid] = max(self.peak[pid], _peak_rss(pid))
        return self.peak


async def _broker_counters(broker: MosquittoBroker) -> dict[str, int]:
    client = MqttClient(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"bench-sys-{os.getpid()}-{time.time_ns()}",
            clean_start=True,
            session_expiry_s=0,
        )
    )
    await client.start()
    try:
        await client.wait_connected(10)
        await client.subscribe("$SYS/broker/messages/+", qos=0)
        wanted = {"$SYS/broker/messages/received", "$SYS/broker/messages/sent"}
        found: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while set(found) != wanted and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(client.messages.get(), 1.0)
            except TimeoutError:
                continue
            if message.topic in wanted:
                found[message.topic] = int(message.payload)
        return {k.rsplit("/", 1)[-1]: v for k, v in found.items()}
    finally:
        await client.stop()


def run_size(count: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = root / f"fleet-{count}"
    work.mkdir()
    broker = MosquittoBroker(work / "broker")
    # Fast $SYS updates for the message counters.
    broker.config_path.write_text(broker.config_path.read_text() + "sys_interval 1\n")
    signing = make_signing_keys(work / "signing")
    keygen = run_controller(["keygen", "--out-dir", str(work / "keys")])
    assert keygen.returncode == 0, keygen.stderr
    store = work / "store"
    configs = []
    for index in range(2):
        config = controller_toml(
            work / f"controller-{index}.toml",
            broker,
            store,
            trust_dir=signing.trust_dir,
            deploy_key=work / "keys" / "deployment.key.pem",
            max_chunk_bytes=args.chunk_bytes,
        )
        with config.open("a") as handle:
            handle.write('\n[groups]\nall = ["sim-*"]\n')
        configs.append(config)
    for version, size in ((1, 1000), (2, int(args.size_mb * 1_000_000))):
        version_dir = make_signed_version(
            work / f"repo-{version}", "m", version, {"model.onnx": os.urandom(size)}, signing
        )
        published = publish_version(configs[0], version_dir, "m", version)
        assert published.returncode == 0, published.stderr
    options = SimOptions(
        host=broker.host,
        port=broker.port,
        prefix="edge",
        state_dir=work / "sim",
        deploy_trust=work / "keys" / "deployment.pub.pem",
        model_trust=signing.trust_dir,
        initial_version=1,
        model="m",
        health_interval_s=5.0,
        chunk_bytes=args.chunk_bytes,
        window=args.window,
        chunk_timeout_s=args.chunk_timeout,
    )
    broker.start()
    controllers: list[ControllerProcess] = []
    sim = SimFleet(device_names(count), args.sim_processes, options)
    sim_watcher = RssWatcher(sim.pids)
    connect_started = time.monotonic()
    try:
        sim.wait_ready(300)
        ready_s = time.monotonic() - connect_started
        sim_cpu_ready = sum(_cpu_s(pid) for pid in sim.pids)
        controllers = [ControllerProcess(c).wait_serving() for c in configs]
        watcher = RssWatcher([c.pid for c in controllers])
        before = asyncio.run(_broker_counters(broker))
        started = time.monotonic()
        result = run_controller(
            [
                "deploy",
                "m",
                "2",
                "--group",
                "all",
                "--first",
                "10%",
                "--wave-size",
                args.wave_size,
                "--soak",
                "1",
                "--wave-timeout",
                "900",
                "--config",
                str(configs[0]),
                "--interval",
                "0.25",
                "--probation",
                str(args.probation),
            ],
            timeout=3600,
        )
        elapsed = time.monotonic() - started
        after = asyncio.run(_broker_counters(broker))
        peaks = watcher.stop()
        sim_cpu = sum(_cpu_s(pid) for pid in sim.pids)
        sim_peaks = sim_watcher.stop()
        outcome = "completed" if result.returncode == 0 else "HALTED"
        if result.returncode != 0:  # still a row: how far it got, and why it stopped
            print(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "?")
        latest = sim.latest_jobs()
        done = sum(1 for e in latest.values() if e["version"] == 2 and e["status"] == "SUCCEEDED")
    finally:
        stopped = [c.stop() for c in controllers]
        sim.stop()
        broker.stop()
    chunks = sum(s["chunks"] for s in stopped if s)
    served = sum(s["bytes"] for s in stopped if s)
    shed = sum(s.get("shed", 0) for s in stopped if s)
    messages = sum(after.values()) - sum(before.values()) if before and after else 0
    shutil.rmtree(work / "sim", ignore_errors=True)
    return {
        "devices": count,
        "outcome": outcome,
        "succeeded": done,
        "rollout_s": elapsed,
        "chunks_per_s": chunks / elapsed,
        "mb_per_s": served / elapsed / 1e6,
        "peak_rss_mb": max(peaks.values()) / 2**20,
        "broker_msgs_per_s": messages / elapsed,
        "shed": shed,
        "sim_ready_s": ready_s,
        "sim_rss_kb_per_device": sum(sim_peaks.values()) / 1024 / count,
        "sim_cpu_ms_per_device_ready": sim_cpu_ready * 1000 / count,
        "sim_cpu_ms_per_device_rollout": (sim_cpu - sim_cpu_ready) * 1000 / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=4)
    parser.add_argument("--chunk-bytes", type=int, default=256 * 1024)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--wave-size", default="20%", help="later waves (deploy --wave-size)")
    parser.add_argument(
        "--chunk-timeout", type=float, default=30.0, help="device chunk timeout (agent: 10)"
    )
    parser.add_argument(
        "--probation", type=int, default=0, help="the deployments' probation window, seconds"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    limit = raise_fd_limit(max(65536, 4 * max(sizes) + 1024))  # mosquitto inherits it
    print(
        f"fd limit {limit}; {os.cpu_count()} CPUs; model {args.size_mb} MB, chunk "
        f"{args.chunk_bytes} B, window {args.window}, "
        f"chunk timeout {args.chunk_timeout}s, waves 10% "
        f"then {args.wave_size}, {args.sim_processes} simulator processes"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-scale-") as tmp:
        for count in sizes:
            rows.append(run_size(count, args, Path(tmp)))
            print(f"  {count} devices done in {rows[-1]['rollout_s']:.1f}s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    base = rows[0]
    header = (
        f"{'devices':>8} {'ok':>6} {'rollout s':>10} {'chunks/s':>9} {'MB/s':>7} "
        f"{'peak ctrl RSS MB':>17} {'broker msg/s':>13} {'shed':>6}  growth vs {base['devices']} "
        "(time, RSS)"
    )
    print(header)
    for row in rows:
        print(
            f"{row['devices']:>8} {row['succeeded']:>6} {row['rollout_s']:>10.1f} "
            f"{row['chunks_per_s']:>9.0f} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>17.1f} "
            f"{row['broker_msgs_per_s']:>13.0f} {row['shed']:>6}  "
            f"x{row['rollout_s'] / base['rollout_s']:.2f}, "
            f"x{row['peak_rss_mb'] / base['peak_rss_mb']:.2f}"
        )
    # The simulator's cost per device decides how many devices one process can carry.
    print(
        f"{'devices':>8} {'sim ready s':>12} {'sim RSS KB/device':>18} "
        f"{'sim CPU ms/device (connect)':>28} {'(rollout)':>10}"
    )
    for row in rows:
        print(
            f"{row['devices']:>8} {row['sim_ready_s']:>12.1f} "
            f"{row['sim_rss_kb_per_device']:>18.0f} "
            f"{row['sim_cpu_ms_per_device_ready']:>28.1f} "
            f"{row['sim_cpu_ms_per_device_rollout']:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
