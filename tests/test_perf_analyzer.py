"""Triton's perf_analyzer runs against the agent unchanged (issue 3).

perf_analyzer asks for ModelMetadata and ModelConfig before anything else and
gives up if either fails, then drives ModelInfer and reads ModelStatistics.
tests/run.sh unpacks the binary into .venv/perf-tools.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import REPO_ROOT, AgentProcess, write_toml

TOOLS = Path(os.environ.get("EDGE_AGENT_PERF_TOOLS", REPO_ROOT / ".venv" / "perf-tools"))
PERF_ANALYZER = TOOLS / "bin" / "perf_analyzer"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("perf")
    config = write_toml(
        tmp / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "state": {"dir": str(tmp / "state")},
            "telemetry": {"prometheus_address": ""},
        },
    )
    with AgentProcess(config) as process:
        process.wait_serving()
        yield process


@pytest.mark.skipif(
    not PERF_ANALYZER.exists(),
    reason=f"perf_analyzer not unpacked at {PERF_ANALYZER} (tests/run.sh does that)",
)
@pytest.mark.parametrize("model", ["tabular_classifier", "text_features"])
def test_perf_analyzer_measures_the_agent(agent: AgentProcess, model: str) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(TOOLS / "lib")}
    args = [
        str(PERF_ANALYZER),
        "-m", model,
        "-u", agent.address,
        "-i", "grpc",
        "-b", "1",
        "--concurrency-range", "1:2",
        "--measurement-interval", "500",
        "--max-trials", "10",
        # A busy CI machine is never "stable"; this test is about the protocol.
        "--stability-percentage", "1000",
    ]
    if model == "text_features":
        args += ["--string-data", "red"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", output)
    rates = [float(r) for r in summary]
    assert len(rates) == 2 and all(rate > 0 for rate in rates), output
    # perf_analyzer reads the server-side statistics too: the agent's counts show up.
    assert "Successful request count:" in output, output
