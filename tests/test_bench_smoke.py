"""The serving benchmark runs and prints its table (it asserts nothing about speed)."""

from __future__ import annotations

import subprocess
import sys

from tests.agent_process import REPO_ROOT

BENCH = REPO_ROOT / "tests" / "bench" / "bench_serving.py"


def test_bench_serving_quick_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--models", "tiny"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
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
    assert "Targets (issue 3):" in out
    for target in ("(a)", "(b)", "(e)"):
        assert target in out
