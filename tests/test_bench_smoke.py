"""The serving benchmark runs and prints its table (it asserts nothing about speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.agent_process import REPO_ROOT

BENCH = REPO_ROOT / "tests" / "bench" / "bench_serving.py"


def run_bench(script: Path, *args: str, timeout: float) -> str:
    """Run a benchmark program; its stdout, after it exited 0."""
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bench_serving_quick_prints_the_table() -> None:
    out = run_bench(BENCH, "--quick", "--models", "tiny", timeout=240)
    assert "infer/s" in out and "p50 us" in out and "RSS idle" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    servers = {(row[1], row[2]) for row in rows}
    for conc in ("1", "4", "16"):
        for server in ("raw", "echo", "agent", "agent+db"):
            assert (conc, server) in servers, f"no row for {server} at concurrency {conc}"
    # Every gRPC row got answers, and none failed.
    for row in rows:
        if row[2] in ("echo", "agent", "agent+db"):
            assert float(row[3]) > 0, row
            assert row[-2] == "0", row  # errors (the last column is the load average)
    assert "Targets (issue 22" in out
    for target in ("(a)", "(b)", "(e)", "(f)", "(g)", "(h)"):
        assert target in out


FLEET_BENCH = REPO_ROOT / "tests" / "bench" / "bench_fleet.py"


def test_bench_fleet_small_run_prints_the_download_table_and_every_update() -> None:
    """A 4 MB model, one setting, two updates under load: both tables, every run's
    ratios, each update SUCCEEDED with no failed request (its own mosquitto, controller
    and agents, all stopped by the bench)."""
    out = run_bench(
        FLEET_BENCH,
        *("--size-mb", "4", "--chunks", "262144", "--windows", "4", "--repeat", "2"),
        *("--update-runs", "2", "--clients", "2"),
        timeout=300,
    )
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("256 KiB"))
    assert row[-1] == "agent" and float(row[3]) > 0 and row[-2] == "16", row  # 16 requests
    assert "Active/SUCCEEDED" in out
    assert "swap window p99/steady in 2 runs:" in out
    assert "jobs: SUCCEEDED; failed requests in all runs: 0" in out
