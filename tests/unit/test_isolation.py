"""The import-isolation design itself (see tests/unit/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.agent_process import REPO_ROOT


def test_this_process_has_the_agent_protobufs_and_not_tritonclient() -> None:
    import agent.wire.model_config_pb2  # noqa: F401

    assert "tritonclient" not in sys.modules
    assert "tritonclient.grpc" not in sys.modules


def test_the_conflict_is_real() -> None:
    # If this ever starts passing, tests/unit could rejoin the main pytest run.
    result = subprocess.run(
        [sys.executable, "-c", "import agent.serving.model_config; import tritonclient.grpc"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "model_config.proto" in result.stderr


def test_a_run_mixing_unit_and_integration_tests_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/unit", "tests/test_config.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "tests/run.sh runs both" in result.stdout + result.stderr
