"""Soak: steady load, hot swaps and telemetry for minutes (issue 17, campaign 2).

One agent process serves a signed model ``m`` (``y = k * x``, k = the version
number) from a repository it verifies; 16 client threads (tritonclient.grpc,
one client each) infer all the time; every ``--swap-s`` a new signed version is
installed into the repository and the agent is sent SIGHUP (it loads the new
version before the old one stops serving); telemetry is on (health every 2 s,
drift windows of 5 s, Prometheus endpoint). Every interval prints one line:
time, the agent's RSS, requests and errors in the interval.

Verdict: RSS growth between the first settled interval (a quarter into the run,
at least the second interval) and the end below 5 %, and 0 errors (an error is
any failed request, or an answer from a version that was never installed).

    python tests/bench/soak.py --minutes 30 [--concurrency 16] [--swap-s 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from tests.agent_process import AgentProcess, write_toml  # noqa: E402
from tests.fleet_harness import CONFIG_PBTXT, MODEL, Keys, write_version  # noqa: E402
from tests.mqtt_broker import free_port  # noqa: E402


class Load:
    """``concurrency`` threads inferring in a loop; counters read by the main thread."""

    def __init__(self, address: str, concurrency: int, installed: set[float]) -> None:
        self.address = address
        self.installed = installed
        self.requests = 0
        self.errors = 0
        self.samples: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.address)
        x = np.ones((1, 4), np.float32)
        try:
            while not self._stop.is_set():
                problem = ""
                try:
                    inp = grpcclient.InferInput("x", [1, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    k = float(client.infer(MODEL, [inp], client_timeout=10).as_numpy("y")[0, 0])
                    if k not in self.installed:
                        problem = f"answer from version {k}, never installed"
                except Exception as exc:
                    problem = repr(exc)[:200]
                with self._lock:
                    self.requests += 1
                    if problem:
                        self.errors += 1
                        if len(self.samples) < 5:
                            self.samples.append(problem)
        finally:
            client.close()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.errors

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--swap-s", type=float, default=10.0)
    parser.add_argument("--interval-s", type=float, default=0.0,
                        help="one line per interval (default: the run / 20, 3 s to 60 s)")
    args = parser.parse_args(argv)
    duration = args.minutes * 60
    interval = args.interval_s or min(60.0, max(3.0, duration / 20))
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    keys = Keys.create(tmp / "keys")
    repository = tmp / "repo"
    write_version(repository / MODEL / "1", 1.0, keys.model)
    (repository / MODEL / "config.pbtxt").write_text(CONFIG_PBTXT)
    config = write_toml(tmp / "agent.toml", {
        "server": {"address": "127.0.0.1:0"},
        "repository": {"path": str(repository)},
        "signing": {"trust_dir": str(keys.model_trust_dir)},
        "state": {"dir": str(tmp / "state")},
        "telemetry": {"health_interval_s": 2.0, "drift_window_s": 5.0, "sample_rate": 0.1,
                      "prometheus_address": f"127.0.0.1:{free_port()}"},
    })
    agent = AgentProcess(config).wait_serving(60)
    installed = {1.0}
    load = Load(agent.address, args.concurrency, installed)
    rows: list[tuple[float, float, int, int, int]] = []  # t, RSS, requests, errors, version
    version = 1
    started = time.monotonic()
    next_swap = started + args.swap_s
    next_line = started + interval
    last_requests = last_errors = 0
    print(f"soak: {args.minutes:g} min, concurrency {args.concurrency}, a swap every "
          f"{args.swap_s:g} s, telemetry on; agent pid {agent.pid}")
    print(f"{'t s':>7} {'RSS MB':>8} {'requests':>9} {'errors':>7} {'version':>8}")
    try:
        while (now := time.monotonic()) < started + duration:
            if agent.proc.poll() is not None:
                print(f"the agent exited with {agent.proc.returncode}")
                break
            if now >= next_swap:
                version += 1
                write_version(tmp / "stage" / str(version), float(version), keys.model)
                installed.add(float(version))
                # Installed by a rename on the same file system: it appears whole.
                os.replace(tmp / "stage" / str(version), repository / MODEL / str(version))
                old = repository / MODEL / str(version - 2)
                if old.exists():  # unloaded by the previous reload: the operator tidies up
                    shutil.rmtree(old)
                agent.signal(signal.SIGHUP)
                next_swap += args.swap_s
            if now >= next_line:
                requests, errors = load.counts()
                rows.append((now - started, rss_mb(agent.pid), requests - last_requests,
                             errors - last_errors, version))
                last_requests, last_errors = requests, errors
                t, rss, r, e, v = rows[-1]
                print(f"{t:>7.0f} {rss:>8.1f} {r:>9} {e:>7} {v:>8}", flush=True)
                next_line += interval
            time.sleep(0.05)
    finally:
        load.stop()
        code = agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    requests, errors = load.counts()
    if len(rows) < 2:
        print("too short a run for an RSS curve")
        return 1
    settled_at = max(1, len(rows) // 4)
    settled, end = rows[settled_at][1], rows[-1][1]
    growth = (end - settled) / settled * 100
    swaps = version - 1
    print(f"requests {requests}, errors {errors}, swaps {swaps}, agent exit code {code}")
    print(f"RSS settled (t={rows[settled_at][0]:.0f} s) {settled:.1f} MB, end {end:.1f} MB: "
          f"growth {growth:+.2f} %")
    for sample in load.samples:
        print("  error:", sample)
    ok = growth < 5.0 and errors == 0 and swaps >= 1 and requests > 0
    print(f"verdict: {'PASS' if ok else 'FAIL'} (RSS growth < 5 %, 0 errors)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
