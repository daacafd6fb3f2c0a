"""Broker outage during telemetry and an update (issue 17, campaign 3).

A real mosquitto, an in-test controller (tests/fleet_harness.py) and an agent
with fleet updates and telemetry on (health every 0.5 s, drift windows of 2 s).
A deployment is published and, while the agent downloads it (the controller's
chunk answers are slowed), the broker is stopped by PID for the outage, then
started again on the same port with the same persistence file.

A recorder client with a persistent session (clean_start false, its
subscriptions and queued messages kept by the broker across the restart)
collects every telemetry message. At the end the agent is stopped (SIGTERM
flushes what it can) and its outbox database gives what it generated and what
it still holds.

Verdict: generated = delivered + still in the outbox (0 lost), nothing dropped
(the outbox bound was not reached), and the update SUCCEEDED after reconnect.

    python tests/bench/outage.py --minutes 10   (20 % before, 50 % outage, 30 % after)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from agent.mqtt.client import MqttClient, MqttSettings  # noqa: E402
from tests.agent_process import AgentProcess, write_toml  # noqa: E402
from tests.fleet_harness import (  # noqa: E402
    DEVICE,
    MODEL,
    TERMINAL,
    Keys,
    TestController,
    agent_config,
    deployment_doc,
    version_files,
    write_version,
)
from tests.mqtt_broker import MosquittoBroker  # noqa: E402
from tests.test_fleet_crash import infer_k  # noqa: E402

OUTBOX = "telemetry-outbox.sqlite3"


class Recorder:
    """Telemetry subscriber on its own loop thread; a persistent session survives the
    broker restart, so nothing published while it reconnects is missed."""

    def __init__(self, port: int) -> None:
        self.seqs: dict[str, set[int]] = {"health": set(), "drift": set()}
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = MqttClient(MqttSettings(port=port, client_id="outage-recorder",
                                              clean_start=False, session_expiry_s=3600,
                                              reconnect_max_s=1.0, max_inflight=1000))
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)

    async def _start(self) -> None:
        for kind in self.seqs:
            await self.client.subscribe(f"edge/devices/{DEVICE}/{kind}", qos=1)
        await self.client.start()
        await self.client.wait_connected(10)
        self._pump = asyncio.ensure_future(self._receive())

    async def _receive(self) -> None:
        while True:
            message = await self.client.messages.get()
            kind = message.topic.rsplit("/", 1)[-1]
            try:
                doc = json.loads(message.payload)
            except ValueError:
                continue
            with self._lock:
                self.seqs.setdefault(kind, set()).add(int(doc["seq"]))
                self.last = doc

    def delivered(self) -> set[int]:
        with self._lock:
            return set().union(*self.seqs.values())

    def stop(self) -> None:
        async def stop() -> None:
            self._pump.cancel()
            await self.client.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def outbox_counts(state: Path) -> tuple[int, int]:
    """(messages generated, messages still waiting) from the agent's outbox database."""
    db = sqlite3.connect(state / OUTBOX)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        pending = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        next_seq = None
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            next_seq = int(row[0]) if row else None
        if next_seq is None:
            next_seq = (db.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0) + 1
        return next_seq - 1, int(pending)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    total = args.minutes * 60
    before, outage, after = 0.2 * total, 0.5 * total, 0.3 * total
    with tempfile.TemporaryDirectory(prefix="outage-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(tmp / "broker").start()
        keys = Keys.create(tmp / "keys")
        repository, state = tmp / "repo", tmp / "state"
        write_version(repository / MODEL / "1", 1.0, keys.model)
        controller = TestController(broker.port)
        recorder = Recorder(broker.port)
        agent: AgentProcess | None = None
        try:
            # A download that outlasts the time before the outage: chunks answered slowly,
            # each well within the chunk timeout (a late answer would be a lost chunk).
            directory = write_version(tmp / "published" / "2", 2.0, keys.model,
                                      padding=2 * 1024 * 1024)
            files = version_files(directory)
            controller.add_files(files)
            size = sum(len(d) for d in files.values())
            delay_s = max(0.01, 2 * 2 * before / (size / (16 * 1024)))
            controller.policy.delay_s = delay_s
            path = agent_config(tmp, broker.port, keys, repository, state,
                                chunk_bytes=16 * 1024, window=2,
                                chunk_timeout_s=max(2.0, 3 * delay_s), chunk_retries=8)
            config = tomllib.loads(path.read_text())
            config["telemetry"] = {"health_interval_s": 0.5, "drift_window_s": 2.0,
                                   "prometheus_address": ""}
            write_toml(path, config)
            agent = AgentProcess(path).wait_serving(30)
            doc = deployment_doc(files, 2, 1, probation_s=0.5)
            controller.deploy(doc, keys.deploy)
            controller.wait_for(lambda: any(m.get("phase") == "Downloading" for m in
                                            controller.jobs_for(doc["deployment_id"])),
                                20, "the download to start")
            time.sleep(before)
            phase_at_stop = controller.jobs_for(doc["deployment_id"])[-1]["phase"]
            delivered_before = len(recorder.delivered())
            broker.stop()  # by PID (SIGTERM: mosquitto saves its persistence file)
            outage_started = time.monotonic()
            served_during = 0
            while time.monotonic() - outage_started < outage:  # serving goes on meanwhile
                served_during += infer_k(agent.address) in (1.0, 2.0)
                time.sleep(0.2)
            broker.start()
            controller.policy.delay_s = 0.0
            final = controller.wait_job(doc["deployment_id"], TERMINAL, max(60.0, after))
            time.sleep(max(0.0, after - 0.0))
            served_after = infer_k(agent.address)
            agent.stop()  # SIGTERM: the agent flushes its outbox before it exits
            agent = None
            time.sleep(1.0)
            generated, pending = outbox_counts(state)
            delivered = recorder.delivered()
            last = recorder.last
        finally:
            if agent is not None:
                agent.stop()
            recorder.stop()
            controller.stop()
            broker.stop()
    lost = generated - len(delivered) - pending
    gaps = sorted(set(range(1, generated + 1)) - delivered)
    dropped = int(last.get("dropped_total", 0)) if last else -1
    print(f"outage: {args.minutes:g} min: {before:.0f} s before, broker down {outage:.0f} s, "
          f"{after:.0f} s after; health every 0.5 s, drift every 2 s")
    print(f"{'telemetry messages':<34}{'count':>8}")
    for label, value in (("generated (outbox seq)", generated),
                         ("delivered before the outage", delivered_before),
                         ("delivered in all", len(delivered)),
                         ("still in the outbox at exit", pending),
                         ("dropped by the outbox bound", dropped),
                         ("lost", lost)):
        print(f"{label:<34}{value:>8}")
    if gaps[:10]:
        print("undelivered seqs (first 10):", gaps[:10])
    print(f"update: in {phase_at_stop} when the broker stopped; final "
          f"{final['phase']}/{final['status']} {final.get('reason_code') or ''}; "
          f"serves {served_after:g} after; {served_during} answers during the outage")
    ok = (lost == 0 and dropped == 0 and final["status"] == "SUCCEEDED"
          and served_after == 2.0 and generated > 0)
    print(f"verdict: {'PASS' if ok else 'FAIL'} (0 lost within the outbox bound, "
          "update completed after reconnect)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
