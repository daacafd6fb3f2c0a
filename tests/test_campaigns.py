"""Short variants of the issue-17 campaigns in tests/bench/: each program runs as a user
runs it (its own agent, broker and controller, all stopped by it) and the test asserts
its printed verdict. The long variants are the same programs with bigger arguments.

The slower ones (the one-minute soak, the 20-second outage) are marked ``slow``:
``-m "not slow"`` leaves them out. All of them together take about 2.5 minutes.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.agent_process import REPO_ROOT
from tests.test_bench_smoke import run_bench

BENCH = REPO_ROOT / "tests" / "bench"


def test_grpc_fuzzing_300_cases_no_crash_no_hang_only_clean_rejections() -> None:
    out = run_bench(BENCH / "fuzz_grpc.py", "--cases", "300", timeout=180)
    assert "verdict: PASS" in out, out
    ran = re.search(r"seed \d+, (\d+) cases", out)
    assert ran and int(ran.group(1)) >= 250, out  # hypothesis may stop a little short
    assert "crashes 0  hangs 0  bad rejections 0" in out, out
    assert "INVALID_ARGUMENT" in out and "NOT_FOUND" in out and "ModelStreamInfer" in out


@pytest.mark.timeout(300)
def test_sigkill_at_4_random_points_of_updates_always_leaves_a_verified_version() -> None:
    out = run_bench(BENCH / "kill_points.py", "--points", "4", timeout=280)
    assert "4/4 kill points" in out and "verdict: PASS" in out, out


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root only)")


@needs_root
def test_disk_full_during_a_download_fails_the_job_naming_the_space_old_version_serves() -> None:
    out = run_bench(BENCH / "disk_full.py", "--case", "download", timeout=120)
    assert "1/1 cases" in out and "verdict: PASS" in out, out
    assert "storage_failed" in out and "is full" in out, out


@needs_root
def test_disk_full_on_a_state_write_fails_the_job_naming_the_space() -> None:
    run_bench(BENCH / "disk_full.py", "--case", "state write", "--report-timeout", "8",
              timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_soak_one_minute_of_load_and_hot_swaps_no_error_rss_flat() -> None:
    out = run_bench(BENCH / "soak.py", "--minutes", "1", "--swap-s", "10", timeout=180)
    assert "verdict: PASS" in out, out
    assert re.search(r"requests \d+, errors 0, swaps [1-9]", out), out


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_broker_outage_loses_no_telemetry_and_the_update_completes_after_reconnect() -> None:
    out = run_bench(BENCH / "outage.py", "--minutes", "0.35", timeout=180)
    assert "verdict: PASS" in out, out
    lost = re.search(r"^lost +(\d+)$", out, re.M)
    assert lost and lost.group(1) == "0", out
    assert "Active/SUCCEEDED" in out, out
