"""Benchmark: model download over loopback mosquitto vs mosquitto's raw publish throughput.

Starts a real mosquitto on 127.0.0.1 (plain TCP, or ``--tls`` with client
certificates and the fleet ACL), publishes a signed version directory holding a
``--size-mb`` model into a controller store, and runs ``edge-controller serve``
as its own process. For each chunk size and window of the sweep it measures:

* download: the device side pulls the whole model with ``window`` chunk requests
  in flight (request + MQTT v5 response topic / correlation data, QoS 1). It
  uses the agent's ``agent.fleet.downloader.Downloader`` (partial file, fsynced
  range checkpoints, SHA-256 check at the end) if that module is importable,
  else the in-test puller of tests/fleet_device.py (memory only);
* raw: the same bytes in messages of the same size, published QoS 1 by a
  separate process with ``window`` PUBACKs outstanding, to a subscriber in this
  process; timed from the first publish to the last message received.

The agent's downloader time includes what a real download does besides the
transfer: writing the partial file, fsynced range checkpoints and the SHA-256
of the whole file at the end.

Both sides use the agent's paho adapter (agent.mqtt.client). Each setting runs
``--repeat`` times and the fastest run of each side counts (shared, noisy hosts);
the repeats are interleaved (the whole sweep, then again), so that the host's
drift over a run reaches every setting alike.
Prints a table of MB/s and the ratio download / raw (target >= 50%).

    .venv/bin/python tests/bench/bench_fleet.py [--size-mb 100] [--tls]
        [--chunks 65536,262144,1048576] [--windows 4,16,64] [--repeat 3]

Then (unless ``--no-update``) the update itself, end to end: a real
``edge-agent serve`` process serving the example ``tabular_classifier`` (version
2) under closed-loop tritonclient load (``--clients`` threads) gets a signed
deployment of version 3 (version 1's weights padded to ``--size-mb``) from the
same controller. Reported: time from publishing the deployment to each phase
(from the job progress the agent reports, via the controller's status file),
and request latency p50/p99 in steady state, during the whole update and in the
swap window (Activating .. Active, +-250 ms), with the failed request count.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.controller.store import ArtifactStore
from agent.mqtt.client import MqttClient, MqttSettings
from agent.signing.keys import TrustStore, write_key_pair
from tests.controller_process import ControllerProcess, controller_toml
from tests.fleet_device import (
    DeviceClient,
    DownloadStats,
    SigningKeys,
    device_settings,
    make_signed_version,
    make_signing_keys,
)
from tests.mqtt_broker import CONTROLLER_IDENTITY, MosquittoBroker, TlsMaterial

MB = 1_000_000
UPDATE_DEVICE = "bench-agent"
UPDATE_MODEL = "tabular_classifier"
EXAMPLE = Path(__file__).resolve().parents[2] / "models" / UPDATE_MODEL
MIB = 1024 * 1024
DEVICE = "bench-device"


@dataclass
class Row:
    chunk: int
    window: int
    download_s: float
    raw_s: float
    requests: int
    downloader: str
    paired: list[float]  # per repeat: raw time / download time, run back to back

    def line(self, size: int) -> str:
        down = size / self.download_s / MB
        raw = size / self.raw_s / MB
        return (
            f"{self.chunk // 1024:>7} KiB {self.window:>6} {down:>13.1f} {raw:>9.1f} "
            f"{down / raw:>7.0%} {statistics.median(self.paired):>7.0%} {self.requests:>9} "
            f"{self.downloader}"
        )


# --------------------------------------------------------------------------- raw publish


def raw_publisher_main(args: argparse.Namespace) -> int:
    """Child process: publish ``count`` messages of ``chunk`` bytes, ``window`` unacked."""
    settings = MqttSettings(**json.loads(args.settings))

    async def run() -> None:
        client = MqttClient(settings)
        await client.start()
        await client.wait_connected(10)
        payload = os.urandom(args.chunk)
        slots = asyncio.Semaphore(args.window)
        tasks: list[asyncio.Task[None]] = []

        async def one(data: bytes) -> None:
            try:
                await client.publish(args.topic, data, qos=1)
            finally:
                slots.release()

        print(f"START {time.time()!r}", flush=True)  # wall clock: the parent compares
        remaining = args.size
        while remaining > 0:
            await slots.acquire()
            data = payload[: min(args.chunk, remaining)]
            remaining -= len(data)
            tasks.append(asyncio.create_task(one(data)))
        await asyncio.gather(*tasks)
        await client.stop()

    asyncio.run(run())
    return 0


def _settings_json(settings: MqttSettings) -> str:
    return json.dumps({name: getattr(settings, name) for name in MqttSettings.__dataclass_fields__})


async def measure_raw(broker: MosquittoBroker, size: int, chunk: int, window: int) -> float:
    topic = f"edge/devices/{DEVICE}/artifacts"  # the device may read it; the controller writes
    subscriber = MqttClient(
        device_settings(broker, DEVICE, client_id=f"{DEVICE}-raw", clean_start=True)
    )
    await subscriber.start()
    await subscriber.wait_connected(10)
    await subscriber.subscribe(topic, qos=1)
    publisher_settings = device_settings(
        broker, CONTROLLER_IDENTITY, client_id="bench-raw-publisher", clean_start=True
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--raw-publisher",
            "--settings",
            _settings_json(publisher_settings),
            "--topic",
            topic,
            "--size",
            str(size),
            "--chunk",
            str(chunk),
            "--window",
            str(window),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        received = 0
        last = 0.0
        while received < size:
            message = await asyncio.wait_for(subscriber.messages.get(), 60)
            received += len(message.payload)
            last = time.time()
        out, _ = await asyncio.to_thread(proc.communicate, None, 60)
        if proc.returncode != 0:
            raise RuntimeError("raw publisher failed")
        started = float(out.split("START ", 1)[1].split()[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await subscriber.stop()
    # From the publisher's first publish to the subscriber's last byte, like a download
    # from its first request to its last chunk.
    return last - started


# --------------------------------------------------------------------------- download


def agent_downloader_available() -> bool:
    try:
        import agent.fleet.downloader  # noqa: F401
    except ImportError:
        return False
    return True


async def download_with_agent(
    broker: MosquittoBroker, sha: str, size: int, chunk: int, window: int, work: Path
) -> tuple[float, int]:
    from agent.adapters.chunk_fetcher import MqttChunkFetcher
    from agent.fleet.downloader import Downloader, DownloadSettings
    from agent.protocol.deployment import DeploymentFile

    client = MqttClient(device_settings(broker, DEVICE, clean_start=True))
    await client.start()
    await client.wait_connected(10)
    fetcher = MqttChunkFetcher(client, broker.prefix, DEVICE, timeout_s=10.0)
    await client.subscribe(fetcher.response_topic, qos=1)

    async def pump() -> None:
        while True:
            message = await client.messages.get()
            if message.topic == fetcher.response_topic:
                fetcher.handle(message)

    pumping = asyncio.create_task(pump())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    downloader = Downloader(
        work / "downloads", fetcher, DownloadSettings(chunk_bytes=chunk, window=window)
    )
    try:
        started = time.perf_counter()
        await downloader.download([(DeploymentFile("model.onnx", sha, size), work / "model.onnx")])
        elapsed = time.perf_counter() - started
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        await client.stop()
    if (work / "model.onnx").stat().st_size != size:
        raise RuntimeError("downloaded file has the wrong size")
    shutil.rmtree(work, ignore_errors=True)
    return elapsed, downloader.requests


async def download_with_puller(
    broker: MosquittoBroker, sha: str, size: int, chunk: int, window: int
) -> tuple[float, int]:
    device = DeviceClient(device_settings(broker, DEVICE, clean_start=True), DEVICE)
    await device.start()
    try:
        stats = DownloadStats()
        started = time.perf_counter()
        await device.download(sha, size, chunk=chunk, window=window, stats=stats, deadline_s=600)
        return time.perf_counter() - started, stats.requests
    finally:
        await device.stop()


# --------------------------------------------------------------------------- update


@dataclass
class UpdateResult:
    phases: dict[str, float]  # "Phase/STATUS" -> seconds after the deployment was published
    steady: list[float]
    during: list[float]
    swap: list[float]
    failures: int
    status: str

    def ratio(self, latencies: list[float]) -> float:
        """p99 of ``latencies`` over the steady-state p99."""
        return _percentile(latencies, 99) / _percentile(self.steady, 99)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def padded_model(source: Path, size: int) -> bytes:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(source.read_bytes())
    padding = max(size - len(source.read_bytes()), 0)
    pad = np.frombuffer(os.urandom(padding), np.uint8)
    model.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    return model.SerializeToString()


def publish_update(tmp: Path, store_dir: Path, signing: SigningKeys, size: int) -> None:
    """Version 3 of the example model, padded to ``size``, signed, into the store."""
    from agent.signing.keys import load_private_key
    from agent.signing.version_dir import sign_version

    published = tmp / "update-published" / UPDATE_MODEL / "3"
    published.mkdir(parents=True)
    (published / "model.onnx").write_bytes(padded_model(EXAMPLE / "1" / "model.onnx", size))
    sign_version(published, load_private_key(signing.private_key), model_name=UPDATE_MODEL)
    shutil.copy(EXAMPLE / "config.pbtxt", published.parent / "config.pbtxt")
    store = ArtifactStore(store_dir)
    store.publish(published, UPDATE_MODEL, 3, TrustStore.from_directory(signing.trust_dir))


def measure_update(
    broker: MosquittoBroker,
    work: Path,
    store_dir: Path,
    signing: SigningKeys,
    deploy_key: Path,
    deploy_trust: Path,
    size: int,
    clients: int,
    chunk_bytes: int,
    max_bytes_per_s: int = 0,
    device: str = UPDATE_DEVICE,
) -> UpdateResult:
    """One update 2 -> 3 of a fresh agent (its own ``work`` directory and ``device`` id:
    the desired state of an earlier run stays retained on the broker)."""
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    from agent.controller.deploy import issue_deployment, publish_deployment
    from agent.controller.status import load_status
    from agent.signing.keys import load_private_key
    from agent.signing.version_dir import sign_version
    from tests.agent_process import AgentProcess, write_toml

    private_key = load_private_key(signing.private_key)
    store = ArtifactStore(store_dir)
    tmp = work
    repository = tmp / "agent-repo"
    for version in ("1", "2"):
        shutil.copytree(EXAMPLE / version, repository / UPDATE_MODEL / version)
        sign_version(repository / UPDATE_MODEL / version, private_key)
    shutil.copy(EXAMPLE / "config.pbtxt", repository / UPDATE_MODEL / "config.pbtxt")
    mqtt: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "device_id": device,
        "reconnect_max_s": 1.0,
    }
    if broker.tls is not None:
        cert = broker.tls.client(device)
        mqtt |= {
            "tls_ca": str(broker.tls.ca_cert),
            "tls_cert": str(cert.cert),
            "tls_key": str(cert.key),
        }
    config = write_toml(
        tmp / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "repository": {"path": str(repository)},
            "signing": {"trust_dir": str(signing.trust_dir)},
            "state": {"dir": str(tmp / "agent-state")},
            "mqtt": mqtt,
            "fleet": {
                "deployment_trust_dir": str(deploy_trust),
                "probation_min_requests": 1_000_000_000,
                "max_model_bytes": 2 * size + 10 * MB,
                "chunk_bytes": chunk_bytes,
                "max_download_bytes_per_s": max_bytes_per_s,
            },
        },
    )
    agent = AgentProcess(config).wait_serving()
    features = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)
    samples: list[tuple[float, float]] = []  # (start time, latency)
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            while not stop.is_set():
                inp = grpcclient.InferInput("features", [1, 8], "FP32")
                inp.set_data_from_numpy(features)
                started = time.time()
                t0 = time.perf_counter()
                try:
                    client.infer(UPDATE_MODEL, [inp])
                    samples.append((started, time.perf_counter() - t0))
                except Exception as exc:
                    failures.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=load) for _ in range(clients)]
    try:
        time.sleep(1.0)  # the agent's birth message and first connection settle
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # warm-up
        steady_from = time.time()
        time.sleep(3.0)
        issued = issue_deployment(
            store,
            UPDATE_MODEL,
            3,
            [device],
            load_private_key(deploy_key),
            probation_s=1,
        )

        async def send() -> float:
            client = MqttClient(
                device_settings(broker, CONTROLLER_IDENTITY, client_id="bench-deployer")
            )
            await client.start()
            await client.wait_connected(10)
            published_at = time.time()
            await publish_deployment(client, broker.prefix, issued)
            await client.stop()
            return published_at

        t0 = asyncio.run(send())
        status_path = store_dir / "status.json"
        history: list[dict[str, Any]] = []
        deadline = time.monotonic() + 300
        final = ""
        while time.monotonic() < deadline and not final:
            time.sleep(0.05)
            try:
                seen = load_status(status_path)["devices"].get(device, {})
            except (OSError, ValueError):
                continue
            history = [
                j
                for j in seen.get("job_history", [])
                if j.get("deployment_id") == issued.deployment_id
            ]
            for job in history:
                if job.get("status") in {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"}:
                    final = str(job["status"])
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        agent.stop()
    phases: dict[str, float] = {}
    for job in history:
        phases.setdefault(f"{job['phase']}/{job['status']}", float(job["ts"]) - t0)
    end = t0 + max(phases.values(), default=0.0)
    swap_from = t0 + phases.get("Activating/IN_PROGRESS", 0.0) - 0.25
    swap_to = t0 + phases.get("Active/IN_PROGRESS", 0.0) + 0.25
    return UpdateResult(
        phases=phases,
        steady=[lat for start, lat in samples if steady_from <= start < t0],
        during=[lat for start, lat in samples if t0 <= start <= end],
        swap=[lat for start, lat in samples if swap_from <= start <= swap_to],
        failures=len(failures),
        status=final or "no result",
    )


def print_update(
    result: UpdateResult, size_mb: int, clients: int, chunk_bytes: int, max_bytes_per_s: int
) -> None:
    cap = f", download capped at {max_bytes_per_s / MB:g} MB/s" if max_bytes_per_s else ""
    print()
    print(
        f"Update of tabular_classifier 2 -> 3 ({size_mb} MB, {chunk_bytes // 1024} KiB chunks"
        f"{cap}), "
        f"{clients} tritonclient threads of closed-loop load; job {result.status}, "
        f"{result.failures} failed requests"
    )
    print("  seconds from publishing the deployment to each reported phase:")
    for phase, seconds in sorted(result.phases.items(), key=lambda item: item[1]):
        print(f"    {phase:<28} {seconds:>7.2f}")
    print(
        f"  {'latency (ms)':<24} {'requests':>9} {'p50':>8} {'p99':>8} {'max':>8} "
        f"{'p99/steady':>11}"
    )
    steady_p99 = _percentile(result.steady, 99)
    for name, values in (
        ("steady state (3 s)", result.steady),
        ("whole update", result.during),
        ("swap window", result.swap),
    ):
        p99 = _percentile(values, 99)
        print(
            f"  {name:<24} {len(values):>9} {_percentile(values, 50) * 1e3:>8.2f} "
            f"{p99 * 1e3:>8.2f} {max(values, default=float('nan')) * 1e3:>8.2f} "
            f"{p99 / steady_p99:>10.2f}x"
        )


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--chunks", default="65536,262144,1048576")
    parser.add_argument("--windows", default="4,16,64")
    parser.add_argument("--tls", action="store_true", help="TLS + client certificates + ACL")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per setting; the fastest counts (noisy hosts)"
    )
    parser.add_argument("--downloader", choices=["auto", "agent", "puller"], default="auto")
    parser.add_argument("--no-update", action="store_true", help="skip the end-to-end update")
    parser.add_argument("--clients", type=int, default=4, help="load threads during the update")
    parser.add_argument(
        "--update-runs", type=int, default=3, help="updates measured (fresh agent each); default 3"
    )
    parser.add_argument(
        "--update-chunk-bytes",
        type=int,
        default=MIB,
        help="the agent's fleet.chunk_bytes in the update (default 1 MiB, the agent's own)",
    )
    parser.add_argument(
        "--update-max-bytes-per-s",
        type=int,
        default=0,
        help="the agent's fleet.max_download_bytes_per_s in the update (default 0: no cap)",
    )
    # internal: the raw publisher child process
    parser.add_argument("--raw-publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_publisher:
        return raw_publisher_main(args)

    chunks = [int(c) for c in args.chunks.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    use_agent = args.downloader == "agent" or (
        args.downloader == "auto" and agent_downloader_available()
    )
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        tls = TlsMaterial(tmp / "tls") if args.tls else None
        broker = MosquittoBroker(tmp / "broker", tls=tls)
        broker.start()
        controller: ControllerProcess | None = None
        try:
            signing = make_signing_keys(tmp / "signing")
            model = os.urandom(size)
            sha = hashlib.sha256(model).hexdigest()
            version_dir = make_signed_version(
                tmp / "repo", "bench_model", 1, {"model.onnx": model}, signing
            )
            del model
            store = tmp / "store"
            ArtifactStore(store).publish(
                version_dir, "bench_model", 1, TrustStore.from_directory(signing.trust_dir)
            )
            shutil.rmtree(tmp / "repo")
            config = controller_toml(
                tmp / "controller.toml", broker, store,
                max_chunk_bytes=max(*chunks, args.update_chunk_bytes),
            )
            deploy_pair = write_key_pair(tmp / "deploy-keys", "deployment")
            deploy_trust = tmp / "deploy-trust"
            deploy_trust.mkdir()
            shutil.copy(deploy_pair.public_key, deploy_trust)
            # The controller serves a blob only to devices a deployment gives it to.
            from agent.controller.deploy import issue_deployment
            from agent.signing.keys import load_private_key

            issue_deployment(ArtifactStore(store), "bench_model", 1, [DEVICE],
                             load_private_key(deploy_pair.private_key))
            controller = ControllerProcess(config).wait_serving()
            # Repeats are interleaved (every setting once, then again): the host's speed
            # drifts over a run, and each setting should see the whole of the drift.
            settings = [(chunk, window) for chunk in chunks for window in windows]
            downs: dict[tuple[int, int], list[tuple[float, int]]] = {s: [] for s in settings}
            raws: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
            for repeat in range(args.repeat):
                for chunk, window in settings:
                    if use_agent:
                        downs[chunk, window].append(
                            asyncio.run(
                                download_with_agent(
                                    broker, sha, size, chunk, window, tmp / "device"
                                )
                            )
                        )
                    else:
                        downs[chunk, window].append(
                            asyncio.run(download_with_puller(broker, sha, size, chunk, window))
                        )
                    raws[chunk, window].append(
                        asyncio.run(measure_raw(broker, size, chunk, window))
                    )
                print(f"  measured repeat {repeat + 1}/{args.repeat}", file=sys.stderr)
            rows: list[Row] = []
            for setting in settings:
                down_s, requests = min(downs[setting])
                rows.append(
                    Row(
                        *setting,
                        down_s,
                        min(raws[setting]),
                        requests,
                        "agent" if use_agent else "puller",
                        [r / d for (d, _), r in zip(downs[setting], raws[setting], strict=True)],
                    )
                )
            updates: list[UpdateResult] = []
            if not args.no_update:
                publish_update(tmp, store, signing, size)
                for run in range(args.update_runs):
                    print(f"  measuring update {run + 1}/{args.update_runs}", file=sys.stderr)
                    updates.append(
                        measure_update(
                            broker,
                            tmp / f"update-{run}",
                            store,
                            signing,
                            deploy_pair.private_key,
                            deploy_trust,
                            size,
                            args.clients,
                            args.update_chunk_bytes,
                            args.update_max_bytes_per_s,
                            device=f"{UPDATE_DEVICE}-{run}",
                        )
                    )
            stopped = controller.stop()
        finally:
            if controller is not None:
                controller.stop()
            broker.stop()

    print()
    transport = "TLS, client certificates, ACL" if args.tls else "plain TCP"
    print(
        f"Model download over loopback mosquitto ({transport}): {args.size_mb} MB, QoS 1, "
        f"controller in its own process; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'chunk':>11} {'window':>6} {'download MB/s':>13} {'raw MB/s':>9} {'ratio':>7} "
        f"{'median':>7} {'requests':>9} downloader"
    )
    for row in rows:
        print(row.line(size))
    print(
        "  ratio: best download / best raw of the repeats; median: of the ratios of each "
        "repeat's download and the raw run right after it"
    )
    best = max(rows, key=lambda r: size / r.download_s)
    print(
        f"best download: {size / best.download_s / MB:.1f} MB/s at chunk {best.chunk // 1024} "
        f"KiB, window {best.window} ({best.raw_s / best.download_s:.0%} of raw at the same "
        f"setting); controller served {stopped['chunks'] if stopped else '?'} chunks"
    )
    if updates:
        # The run with the median swap-window ratio in full, then every run's ratios:
        # the swap window holds a few hundred requests, so one run's p99 is noisy.
        ranked = sorted(updates, key=lambda u: u.ratio(u.swap))
        print_update(
            ranked[(len(ranked) - 1) // 2], args.size_mb, args.clients, args.update_chunk_bytes,
            args.update_max_bytes_per_s,
        )
        if len(updates) > 1:
            for name, pick in (("swap window", "swap"), ("whole update", "during")):
                ratios = [u.ratio(getattr(u, pick)) for u in updates]
                print(
                    f"  {name} p99/steady in {len(ratios)} runs: "
                    + ", ".join(f"{r:.2f}x" for r in ratios)
                    + f" (median {statistics.median(ratios):.2f}x)"
                )
            failed = sum(u.failures for u in updates)
            statuses = sorted({u.status for u in updates})
            print(f"  jobs: {', '.join(statuses)}; failed requests in all runs: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
