"""The files in systemd/: the unit passes ``systemd-analyze verify`` and scores an
exposure of at most 2.0 in ``systemd-analyze security``; the sysusers and
tmpfiles entries work with the real tools (in a scratch root); the example
config is valid and agrees with the unit's directories and stop timeout."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import STOP_HOOKS_TIMEOUT_S, build_config
from tests.agent_process import REPO_ROOT

SYSTEMD_DIR = REPO_ROOT / "systemd"
UNIT = SYSTEMD_DIR / "edge-agent.service"
EXAMPLE_CONFIG = SYSTEMD_DIR / "agent.toml.example"
CONTROLLER_UNIT = SYSTEMD_DIR / "edge-controller.service"
CONTROLLER_EXAMPLE = SYSTEMD_DIR / "controller.toml.example"
CONTROLLER_EXEC_START = (
    "/usr/local/bin/edge-controller serve --config /etc/edge-agent/controller.toml "
    "$EDGE_CONTROLLER_ARGS"
)
EXEC_START = "/usr/local/bin/edge-agent serve --config /etc/edge-agent/agent.toml"
MAX_EXPOSURE = 2.0

needs_systemd_tools = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _directives(text: str) -> dict[str, list[str]]:
    """``[Service]`` and friends flattened: key -> every value given, in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _installed_copy(tmp_path: Path, text: str | None = None, unit: Path = UNIT) -> Path:
    """The unit as it would be installed, except that ExecStart runs this checkout's
    ``edge-agent`` (or ``edge-controller``) entry point (``systemd-analyze verify``
    checks the binary exists; /usr/local/bin/edge-agent does not on a test machine)."""
    program = unit.stem
    entry_point = Path(sys.executable).with_name(program)
    assert entry_point.exists(), entry_point
    text = unit.read_text() if text is None else text
    assert text.count(f"ExecStart=/usr/local/bin/{program} ") == 1
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"/usr/local/bin/{program}", str(entry_point)))
    return copy


def _verify(unit: Path) -> list[str]:
    """``systemd-analyze verify``: it exits 0 even for unknown keys or bad values
    (it prints a warning and ignores the line), so any line it prints about the
    unit counts as a failure."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        if unit.stem in line
    ]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}")
    return problems


def test_unit_has_what_issue_7_names() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == [EXEC_START]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["StateDirectory"] == ["edge-agent"]
    assert d["ConfigurationDirectory"] == ["edge-agent"]
    assert d["User"] == ["edge-agent"] and d["Group"] == ["edge-agent"]
    assert re.fullmatch(r"\d+s", d["WatchdogSec"][0])
    # onnxruntime maps writable+executable pages.
    assert "MemoryDenyWriteExecute" not in d


def test_stop_timeout_covers_the_drain_and_the_stop_hooks() -> None:
    d = _directives(UNIT.read_text())
    (stop,) = d["TimeoutStopSec"]
    assert stop.endswith("s")
    config = build_config(tomllib.loads(EXAMPLE_CONFIG.read_text()), str(EXAMPLE_CONFIG))
    # drain, then up to 1 s for the last responses, then the stop hooks; 2 s to spare.
    needed = config.server.drain_timeout_s + 1.0 + STOP_HOOKS_TIMEOUT_S + 2.0
    assert float(stop[:-1]) >= needed, (stop, needed)


@needs_systemd_tools
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    assert _verify(_installed_copy(tmp_path)) == []
    assert _verify(_installed_copy(tmp_path, unit=CONTROLLER_UNIT)) == []
    # The check itself catches a mistake (a misspelt key is only a warning).
    broken = tmp_path / "broken"
    broken.mkdir()
    typo = _installed_copy(broken, UNIT.read_text().replace("Type=notify", "Tpye=notify"))
    assert any("Tpye" in p for p in _verify(typo))


@needs_systemd_tools
@pytest.mark.parametrize("unit", [UNIT, CONTROLLER_UNIT], ids=lambda u: u.stem)
def test_security_exposure_is_at_most_2(tmp_path: Path, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true",
         str(_installed_copy(tmp_path, unit=unit))],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(
        rf"Overall exposure level for {unit.stem}\.service: (\d+\.\d+)", result.stdout
    )
    assert match, result.stdout
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_example_config_is_valid_and_uses_the_service_directories() -> None:
    check = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--schema-only",
         "--config", str(EXAMPLE_CONFIG)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    config = build_config(tomllib.loads(EXAMPLE_CONFIG.read_text()), str(EXAMPLE_CONFIG))
    # ProtectSystem=strict: the agent may write only under its StateDirectory.
    for writable in (config.repository.path, config.state.dir):
        assert Path(writable).is_relative_to("/var/lib/edge-agent"), writable
    assert Path(config.signing.trust_dir).is_relative_to("/etc/edge-agent")
    assert not config.signing.allow_unsigned_models


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles are not installed",
)
def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, conf in (
        (["systemd-sysusers"], "edge-agent.sysusers.conf"),
        (["systemd-tmpfiles", "--create"], "edge-agent.tmpfiles.conf"),
    ):
        result = subprocess.run(
            [*tool, f"--root={root}", "-"],
            input=(SYSTEMD_DIR / conf).read_text(), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/passwd").read_text().splitlines()}
    user = passwd["edge-agent"]
    uid, gid = int(user[2]), int(user[3])
    assert 0 < uid < 1000 and user[6].endswith("nologin")  # a system account, no login

    def owner_mode(path: str) -> tuple[int, int, int]:
        st = (root / path.lstrip("/")).stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    config = build_config(tomllib.loads(EXAMPLE_CONFIG.read_text()), str(EXAMPLE_CONFIG))
    assert owner_mode(config.repository.path) == (uid, gid, 0o750)
    assert owner_mode(config.state.dir) == (uid, gid, 0o700)
    # The trust anchors are root's: the agent cannot change whom it trusts.
    assert owner_mode(config.signing.trust_dir) == (0, 0, 0o755)
    assert owner_mode("/etc/edge-agent/tls") == (0, gid, 0o750)


def _syscall_set(expression: str) -> set[str]:
    """System calls named by one SystemCallFilter= word (a call or a @group, nested)."""
    if not expression.startswith("@"):
        return {expression}
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", expression],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= _syscall_set(word)
    return names


def _unit_syscall_allow_list() -> set[str]:
    """What the unit's SystemCallFilter= lines allow (an allow list, then deny lists)."""
    allowed: set[str] = set()
    for value in _directives(UNIT.read_text())["SystemCallFilter"]:
        deny = value.startswith("~")
        words = set().union(*(_syscall_set(w) for w in value.lstrip("~").split()))
        allowed = allowed - words if deny else allowed | words
    return allowed


@needs_systemd_tools
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_agent_only_makes_system_calls_the_unit_allows(tmp_path: Path) -> None:
    """The agent under strace through start-up, inference, a reload with a new
    version and a SIGTERM: every system call it makes is in the unit's filter
    (the filter answers EPERM to the others, which would break the agent)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from tests.agent_process import write_toml
    from tests.systemd_support import NotifyListener, add_counter, copy_example

    repo = tmp_path / "repo"
    add_counter(repo, "counter")
    copy_example(repo, "tabular_classifier")
    config = write_toml(tmp_path / "agent.toml", {
        "server": {"address": "127.0.0.1:0"},
        "repository": {"path": str(repo)},
        "state": {"dir": str(tmp_path / "state")},
        "signing": {"allow_unsigned_models": True},  # until the signing work lands
    })
    trace = tmp_path / "strace.txt"
    notify = NotifyListener()
    env = {**os.environ, **notify.env, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(trace),
         sys.executable, "-m", "agent.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent_pid = 0
    try:
        ready = notify.wait_for("READY=1", timeout=60)
        agent_pid = int(Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text())
        address = next(
            line.split("on ", 1)[1] for line in notify.messages[ready][1]
            if line.startswith("STATUS=serving")
        )
        client = grpcclient.InferenceServerClient(address)
        features = grpcclient.InferInput("features", [2, 8], "FP32")
        features.set_data_from_numpy(np.ones((2, 8), np.float32))
        iters = grpcclient.InferInput("iters", [1], "INT64")
        iters.set_data_from_numpy(np.array([100], np.int64))
        for _ in range(10):
            client.infer("tabular_classifier", [features])
            client.infer("counter", [iters])
        shutil.copytree(repo / "tabular_classifier" / "1", repo / "tabular_classifier" / "3")
        mark = len(notify.messages)
        os.kill(agent_pid, signal.SIGHUP)
        notify.wait_for("READY=1", after=notify.wait_for("RELOADING=1", after=mark))
        result = client.infer("tabular_classifier", [features])
        assert result.get_response().model_version == "3"
        client.close()
        os.kill(agent_pid, signal.SIGTERM)
        assert tracer.wait(60) == 0
    finally:
        if tracer.poll() is None:
            if agent_pid:
                os.kill(agent_pid, signal.SIGKILL)
            tracer.wait(30)
        notify.close()

    used = {
        m.group(1) for line in trace.read_text().splitlines()
        if (m := re.match(r"\d+ +(?:<\.\.\. )?([a-z0-9_]+)[( ]", line))
    }
    assert len(used) > 30, "strace recorded too little to judge"
    outside = used - _unit_syscall_allow_list()
    if os.geteuid() == 0:
        # SQLite (inside onnxruntime) fchown()s its files to keep their owner, only
        # when it runs as root; the service runs as edge-agent.
        outside.discard("fchown")
    assert outside == set(), sorted(outside)


# -- the controller's unit and both example configs -----------------------------------


def test_controller_unit_runs_serve_with_the_optional_console_arguments() -> None:
    d = _directives(CONTROLLER_UNIT.read_text())
    assert d["Type"] == ["exec"]  # no sd_notify in the controller
    assert d["ExecStart"] == [CONTROLLER_EXEC_START]
    # The optional environment file may add serve options (e.g. --http once the web
    # console exists); without it, EDGE_CONTROLLER_ARGS is empty and adds nothing.
    assert d["Environment"] == ["EDGE_CONTROLLER_ARGS="]
    assert d["EnvironmentFile"] == ["-/etc/edge-agent/controller.env"]
    assert d["User"] == ["edge-controller"] and d["Group"] == ["edge-controller"]
    assert d["StateDirectory"] == ["edge-controller"]
    assert d["Restart"] == ["on-failure"]
    assert d["MemoryDenyWriteExecute"] == ["yes"]
    # Everything the agent's unit hardens, the controller's does too.
    agent = _directives(UNIT.read_text())
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateDevices",
                "PrivateUsers", "RestrictNamespaces", "SystemCallArchitectures",
                "CapabilityBoundingSet", "RestrictAddressFamilies", "ProtectProc"):
        assert d[key] == agent[key], key


def test_controller_example_config_is_valid_and_uses_the_service_directories() -> None:
    from agent.controller.config import read_controller_config

    config = read_controller_config(CONTROLLER_EXAMPLE)
    # ProtectSystem=strict: the controller may write only under its StateDirectory.
    for writable in (config.store_dir, config.status_file):
        assert writable.is_relative_to("/var/lib/edge-controller"), writable
    assert config.trust_dir.is_relative_to("/etc/edge-agent")
    assert config.broker.tls_ca and config.broker.tls_cert  # the service speaks TLS
    check = subprocess.run(
        [sys.executable, "-m", "agent.controller.cli", "status", "--config",
         str(CONTROLLER_EXAMPLE)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert "unknown key" not in check.stderr and check.returncode != 2, check.stderr


def _schema_keys(schema: dict[str, object], prefix: str = "") -> set[str]:
    """Every key path a schema allows (a table without fixed keys counts as one key)."""
    out: set[str] = set()
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {prefix.rstrip(".")} if prefix else set()
    for name, sub in properties.items():
        if isinstance(sub, dict) and sub.get("$ref"):
            sub = {"properties": {"_": {}}}  # a $ref'd table: checked by its own key list
        if isinstance(sub, dict) and isinstance(sub.get("properties"), dict):
            out |= _schema_keys(sub, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def _example_keys(text: str) -> set[str]:
    """Key paths an example names, set or commented out (``# key = default``)."""
    out: set[str] = set()
    section = ""
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        if m := re.fullmatch(r"\[([A-Za-z0-9_.-]+)\].*", body):
            section = m.group(1)
            parts = section.split(".")
            out |= {".".join(parts[: i + 1]) for i in range(len(parts))}
        elif m := re.match(r"([A-Za-z0-9_-]+) = ", body):
            out.add(f"{section}.{m.group(1)}" if section else m.group(1))
    return out


def test_examples_name_every_key_of_their_schema() -> None:
    from agent.config import _SCHEMA as AGENT_SCHEMA
    from agent.controller.config import _SCHEMA as CONTROLLER_SCHEMA

    pairs = ((EXAMPLE_CONFIG, AGENT_SCHEMA), (CONTROLLER_EXAMPLE, CONTROLLER_SCHEMA))
    for example, schema in pairs:
        expected = _schema_keys(schema)
        # The drift thresholds table ($ref): its keys, by the defaults.
        expected = {k for k in expected if not k.endswith("._")}
        if example is EXAMPLE_CONFIG:
            thresholds = AGENT_SCHEMA["$defs"]["drift_thresholds"]["properties"]
            expected |= {f"telemetry.thresholds.{k}" for k in thresholds}
        named = _example_keys(example.read_text())
        assert expected - named == set(), (example.name, sorted(expected - named))
        # Nothing named that the schema does not know (a typo in a commented-out key).
        sections = {k.rsplit(".", 1)[0] for k in expected if "." in k}
        unknown = {
            k for k in named - expected - sections
            if not k.startswith(("telemetry.model_thresholds.", "groups."))
        }
        assert unknown == set(), (example.name, sorted(unknown))


def test_examples_with_every_commented_key_set_still_validate() -> None:
    """Uncommenting the ``# key = value`` lines gives a valid file: the values shown are
    real (the defaults, or an example for a table such as [groups])."""
    from agent.controller.config import build_controller_config

    for example in (EXAMPLE_CONFIG, CONTROLLER_EXAMPLE):
        lines = []
        for line in example.read_text().splitlines():
            if re.match(r"# ?(\[[A-Za-z0-9_.-]+\]|[A-Za-z0-9_-]+ = \S)", line):
                line = line.lstrip("#").lstrip()
            lines.append(line)
        values = tomllib.loads("\n".join(lines))
        if example is EXAMPLE_CONFIG:
            # A token file only with the control RPCs on, and those only with explicit control.
            values["control"]["enabled"] = False
            build_config(values, example.name)
        else:
            build_controller_config(values, {}, example.name)


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles are not installed",
)
def test_controller_sysusers_and_tmpfiles_create_the_user_and_directories(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, conf in (
        (["systemd-sysusers"], "edge-controller.sysusers.conf"),
        (["systemd-tmpfiles", "--create"], "edge-controller.tmpfiles.conf"),
    ):
        result = subprocess.run(
            [*tool, f"--root={root}", "-"],
            input=(SYSTEMD_DIR / conf).read_text(), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("edge-controller:"))
    uid, gid = int(user[2]), int(user[3])
    assert 0 < uid < 1000 and user[6].endswith("nologin")

    def owner_mode(path: str) -> tuple[int, int, int]:
        st = (root / path.lstrip("/")).stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    from agent.controller.config import read_controller_config

    config = read_controller_config(CONTROLLER_EXAMPLE)
    assert owner_mode(str(config.store_dir)) == (uid, gid, 0o750)
    assert owner_mode(str(config.trust_dir)) == (0, 0, 0o755)
    # The broker CA, the controller's TLS key and the deployment key live here.
    assert owner_mode(str(Path(config.broker.tls_key).parent)) == (0, gid, 0o750)


@needs_systemd_tools
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_controller_only_makes_system_calls_the_unit_allows(
    tmp_path: Path, mqtt_tls_broker: Any
) -> None:
    """``edge-controller serve`` under strace, connected over mutual TLS, then SIGTERM:
    every system call is in the unit's filter, and no memory is mapped writable and
    executable at once (the unit has MemoryDenyWriteExecute=yes)."""
    from tests.controller_process import controller_toml
    from tests.processes import LoggedProcess

    config = controller_toml(
        tmp_path / "controller.toml", mqtt_tls_broker, tmp_path / "store",
        trust_dir=REPO_ROOT / "models" / "keys" / "trusted",
    )
    trace = tmp_path / "strace.txt"
    tracer = LoggedProcess(
        ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m",
         "agent.controller.cli", "serve", "--config", str(config)],
        REPO_ROOT,
    )
    controller_pid = 0
    try:
        tracer.wait_serving(90)
        controller_pid = int(
            Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()[0]
        )
        time.sleep(1.0)  # a status write or two
        os.kill(controller_pid, signal.SIGTERM)
        assert tracer.proc.wait(60) == 0, "\n".join(tracer.lines[-20:])
    finally:
        if tracer.proc.poll() is None:
            if controller_pid:
                os.kill(controller_pid, signal.SIGKILL)
            tracer.proc.wait(30)
    lines = trace.read_text().splitlines()
    used = {
        m.group(1) for line in lines
        if (m := re.match(r"\d+ +(?:<\.\.\. )?([a-z0-9_]+)[( ]", line))
    }
    assert len(used) > 30, "strace recorded too little to judge"
    allowed: set[str] = set()
    for value in _directives(CONTROLLER_UNIT.read_text())["SystemCallFilter"]:
        deny = value.startswith("~")
        words = set().union(*(_syscall_set(w) for w in value.lstrip("~").split()))
        allowed = allowed - words if deny else allowed | words
    outside = used - allowed
    if os.geteuid() == 0:
        outside.discard("fchown")  # only as root (see the agent's test)
    assert outside == set(), sorted(outside)
    wx = [line for line in lines
          if re.search(r"\b(mmap|mprotect|pkey_mprotect)\(", line)
          and "PROT_WRITE" in line and "PROT_EXEC" in line]
    assert wx == [], wx[:5]
