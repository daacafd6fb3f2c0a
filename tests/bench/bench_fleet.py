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
  process; timed from the first message received to the last.

Both sides use the agent's paho adapter (agent.mqtt_client). Each setting runs
``--repeat`` times and the fastest run of each side counts (shared, noisy hosts).
Prints a table of MB/s and the ratio download / raw (target >= 50%).

    .venv/bin/python tests/bench/bench_fleet.py [--size-mb 100] [--tls]
        [--chunks 65536,262144,1048576] [--windows 4,16,64] [--repeat 3]

Update-to-active time and p99 latency during the swap need the agent's update
engine end to end and are not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.controller.store import ArtifactStore
from agent.mqtt_client import MqttClient, MqttSettings
from agent.signing.keys import TrustStore
from tests.controller_process import ControllerProcess, controller_toml
from tests.fleet_device import (
    DeviceClient,
    DownloadStats,
    device_settings,
    make_signed_version,
    make_signing_keys,
)
from tests.mqtt_broker import CONTROLLER_IDENTITY, MosquittoBroker, TlsMaterial

MB = 1_000_000
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

    def line(self, size: int) -> str:
        down = size / self.download_s / MB
        raw = size / self.raw_s / MB
        return (
            f"{self.chunk // 1024:>7} KiB {self.window:>6} {down:>13.1f} {raw:>9.1f} "
            f"{down / raw:>7.0%} {self.requests:>9} {self.downloader}"
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
    )
    try:
        received = 0
        first = 0.0
        while received < size:
            message = await asyncio.wait_for(subscriber.messages.get(), 60)
            if not first:
                first = time.perf_counter()
            received += len(message.payload)
        elapsed = time.perf_counter() - first
        if proc.wait(60) != 0:
            raise RuntimeError("raw publisher failed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await subscriber.stop()
    # The first message's own transfer is not in the interval: scale to the full size.
    return elapsed * size / max(size - chunk, 1)


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
    from agent.fleet.deployment import DeploymentFile
    from agent.fleet.downloader import Downloader, DownloadSettings, MqttChunkFetcher

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
                tmp / "controller.toml", broker, store, max_chunk_bytes=max(chunks)
            )
            controller = ControllerProcess(config).wait_serving()
            rows: list[Row] = []
            for chunk in chunks:
                for window in windows:
                    downs: list[tuple[float, int]] = []
                    raws: list[float] = []
                    for _ in range(args.repeat):
                        if use_agent:
                            downs.append(
                                asyncio.run(
                                    download_with_agent(
                                        broker, sha, size, chunk, window, tmp / "device"
                                    )
                                )
                            )
                        else:
                            downs.append(
                                asyncio.run(download_with_puller(broker, sha, size, chunk, window))
                            )
                        raws.append(asyncio.run(measure_raw(broker, size, chunk, window)))
                    down_s, requests = min(downs)
                    raw_s = min(raws)
                    rows.append(
                        Row(
                            chunk,
                            window,
                            down_s,
                            raw_s,
                            requests,
                            "agent" if use_agent else "puller",
                        )
                    )
                    print(f"  measured chunk {chunk} window {window}", file=sys.stderr)
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
        f"{'requests':>9} downloader"
    )
    for row in rows:
        print(row.line(size))
    best = max(rows, key=lambda r: size / r.download_s)
    print(
        f"best download: {size / best.download_s / MB:.1f} MB/s at chunk {best.chunk // 1024} "
        f"KiB, window {best.window} ({best.raw_s / best.download_s:.0%} of raw at the same "
        f"setting); controller served {stopped['chunks'] if stopped else '?'} chunks"
    )
    print("update-to-active time and p99 during the swap: not measured here (agent side)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
