"""One verdict: ``edge-agent check-config`` runs the checks ``serve`` runs before it
starts, so a config check-config passes is one serve accepts, and one serve refuses
check-config refuses too, both with exit status 2 and the same message naming the key.

Real processes (``python -m agent.cli``), real files and permissions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import REPO_ROOT, write_toml

TIMEOUT_S = 60
TRUSTED = REPO_ROOT / "models" / "keys" / "trusted"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def _setup(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """A config serving an empty repository; ``sections`` override it."""
    (tmp_path / "models").mkdir(exist_ok=True)
    config: dict[str, dict[str, Any]] = {
        "server": {"address": "127.0.0.1:0"},
        "repository": {"path": str(tmp_path / "models")},
        "signing": {"trust_dir": str(TRUSTED)},
        "state": {"dir": str(tmp_path / "state")},
        "telemetry": {"prometheus_address": ""},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return write_toml(tmp_path / "agent.toml", config)


def _both_refuse(config: Path, cwd: Path, *expected: str) -> str:
    check = _cli("check-config", "--config", str(config), cwd=cwd)
    serve = _cli("serve", "--config", str(config), cwd=cwd)
    for result in (check, serve):
        assert result.returncode == 2, (result.returncode, result.stderr)
        for text in expected:
            assert text in result.stderr, result.stderr
    assert check.stdout == ""
    # The same verdict, word for word.
    assert check.stderr.strip().splitlines()[-1] == serve.stderr.strip().splitlines()[-1]
    return check.stderr


def test_a_good_config_is_ok(tmp_path: Path) -> None:
    config = _setup(tmp_path)
    result = _cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK {config}"


def test_missing_trust_dir_is_refused_by_both(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "trusted"
    config = _setup(tmp_path, signing={"trust_dir": str(missing)})
    err = _both_refuse(config, tmp_path, "signing.trust_dir", str(missing), "does not exist")
    assert "public keys" in err  # what to do


def test_empty_trust_dir_is_refused_by_both(tmp_path: Path) -> None:
    empty = tmp_path / "trusted"
    empty.mkdir()
    config = _setup(tmp_path, signing={"trust_dir": str(empty)})
    _both_refuse(config, tmp_path, "signing.trust_dir", "no *.pem")


def test_missing_repository_is_refused_by_both(tmp_path: Path) -> None:
    config = _setup(tmp_path, repository={"path": str(tmp_path / "nowhere")})
    _both_refuse(config, tmp_path, "repository.path", str(tmp_path / "nowhere"), "does not exist")


def test_a_relative_default_says_what_it_resolved_against(tmp_path: Path) -> None:
    # No config file: repository.path = "models", resolved against the working directory.
    work = tmp_path / "work"
    work.mkdir()
    check = _cli("check-config", cwd=work)
    assert check.returncode == 2, check.stderr
    assert "repository.path" in check.stderr
    assert str(work / "models") in check.stderr
    assert "working directory" in check.stderr


def test_missing_tls_and_token_files_are_refused_by_both(tmp_path: Path) -> None:
    config = _setup(
        tmp_path,
        server={"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")},
    )
    _both_refuse(config, tmp_path, "server.tls_cert", "does not exist")
    config = _setup(
        tmp_path,
        server={"tls_cert": "", "tls_key": ""},
        repository={"model_control": "explicit"},
        control={"enabled": True, "token_file": str(tmp_path / "token")},
    )
    _both_refuse(config, tmp_path, "control.token_file", "does not exist")


def test_schema_only_skips_the_paths(tmp_path: Path) -> None:
    config = _setup(tmp_path, repository={"path": str(tmp_path / "nowhere")})
    result = _cli("check-config", "--schema-only", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schema only" in result.stdout


def test_exit_codes_are_in_the_help(tmp_path: Path) -> None:
    for args in (["--help"], ["check-config", "--help"]):
        result = _cli(*args, cwd=tmp_path)
        assert result.returncode == 0
        assert "exit status" in result.stdout and "2  a configuration error" in result.stdout


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as another user",
)
def test_an_unreadable_repository_is_refused_for_the_service_user() -> None:
    # The service user (here: nobody) cannot read a root-only 0700 repository. Not in
    # tmp_path: pytest's base directory is root's alone.
    base = Path(tempfile.mkdtemp(prefix="check-config-"))
    try:
        base.chmod(0o755)
        config = _setup(base, state={"dir": "/tmp"})
        (base / "models").chmod(0o700)
        config.chmod(0o644)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "agent.cli", "check-config", "--config", str(config)],
            cwd="/", env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    finally:
        shutil.rmtree(base)
    if "Permission denied" in result.stderr and "repository.path" not in result.stderr:
        pytest.skip(f"the checkout is not readable by nobody: {result.stderr[-200:]}")
    assert result.returncode == 2, result.stderr
    assert "repository.path" in result.stderr and "cannot be read" in result.stderr


def test_controller_missing_trust_dir_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    # The controller's relative default (models/keys/trusted) from a directory without it.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "agent.controller.cli", "publish",
         str(REPO_ROOT / "models" / "tabular_classifier" / "2"), "--model",
         "tabular_classifier", "--version", "2", "--store", str(tmp_path / "store")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 2, result.stderr
    assert "signing.trust_dir" in result.stderr
    assert str(tmp_path / "models" / "keys" / "trusted") in result.stderr
    assert "working directory" in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "agent.controller.cli", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    ).stdout
    assert "exit status" in help_text and "2  a configuration error" in help_text
