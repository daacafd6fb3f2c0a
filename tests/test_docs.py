"""The shell commands in README.md and docs/*.md run as written.

Every fenced ``sh`` block carries a marker on the line before it:

- ``<!-- runnable -->``: the test runs it (a ``python`` block too, with the
  venv's python). Options after the word:
  ``needs=agent`` (an ``edge-agent serve`` of the example models is running;
  ``127.0.0.1:8001`` and ``127.0.0.1:9464`` in the block are replaced by its
  gRPC and metrics addresses),
  ``needs=perf_analyzer`` (skipped where tests/run.sh has not unpacked it),
  ``timeout=S`` (default 120).
- ``<!-- not-runnable: why -->``: the block needs what a test cannot have (root,
  systemd, the network, your own files); the reason is required.

A document's runnable blocks run in order, as one session, in a fresh temporary
directory holding a copy of the repository's models/ (and ``.venv`` linked to
the checkout's), with the venv's bin first on PATH: each block is a
``bash -euo pipefail`` script that starts where the last one ended (working
directory and exported variables carry over), in a process group of its own.
Preset variables (a block may default them, ``PORT=${PORT:-8883}``): ``FLEET``
(the directory), ``EXAMPLES`` (the models copy), ``PORT`` and ``GRPC_PORT``
(free 127.0.0.1 ports). Whatever a block leaves running is stopped by process
group at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.agent_process import REPO_ROOT, AgentProcess, write_toml
from tests.mqtt_broker import free_port

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PERF_TOOLS = REPO_ROOT / ".venv" / "perf-tools" / "bin" / "perf_analyzer"
DEFAULT_TIMEOUT_S = 120.0
SHELL = {"sh", "bash", "shell", "console"}
# perf_analyzer exits 0 when a concurrency level past the first never stabilised.
FAILURE_TEXT = ("Failed to obtain stable measurement", "Traceback (most recent call last)")
_FENCE = re.compile(r"^\s*```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(runnable|not-runnable)\b:?\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # "runnable" | "not-runnable" | None
    options: dict[str, str] = field(default_factory=dict)
    needs: set[str] = field(default_factory=set)
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO_ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of ``doc`` with the marker on the line before it, if any."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        block = Block(doc, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n")
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        if marker is not None:
            block.marker = marker.group(1)
            if block.marker == "runnable":
                for word in marker.group(2).split():
                    key, _, value = word.partition("=")
                    if key == "needs":
                        block.needs.add(value)
                    else:
                        block.options[key] = value
            else:
                block.reason = marker.group(2)
        found.append(block)
        i = end + 1
    return found


def test_every_shell_block_is_marked() -> None:
    unmarked = [
        b.where
        for doc in DOCS
        for b in blocks(doc)
        if b.lang in SHELL and (b.marker is None or (b.marker == "not-runnable" and not b.reason))
    ]
    assert unmarked == [], (
        "mark each shell block `<!-- runnable -->` (tests/test_docs.py runs it) or "
        "`<!-- not-runnable: why -->`"
    )


def test_the_operator_guide_is_runnable_end_to_end() -> None:
    guide = blocks(REPO_ROOT / "docs" / "operator-guide.md")
    shell = [b for b in guide if b.lang == "sh"]
    assert sum(b.marker == "runnable" for b in shell) >= 8, "the whole flow runs"
    assert all(b.marker for b in shell)


# --------------------------------------------------------------------------- running


class Session:
    """One document's blocks: a temp set-up, the environment they pass on, cleanup."""

    def __init__(self) -> None:
        # mkdtemp, world-traversable: the guide's mosquitto drops to its own account
        # (started as root) and must reach the files chowned to it.
        self.root = Path(tempfile.mkdtemp(prefix="edge-docs-", dir="/tmp"))
        self.root.chmod(0o755)
        shutil.copytree(REPO_ROOT / "models", self.root / "models", symlinks=True)
        (self.root / ".venv").symlink_to(REPO_ROOT / ".venv")
        venv_bin = REPO_ROOT / ".venv" / "bin"
        self.env = {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "FLEET": str(self.root),
            "EXAMPLES": str(self.root / "models"),
            "PORT": str(free_port()),
            "GRPC_PORT": str(free_port()),
            "VIRTUAL_ENV": str(REPO_ROOT / ".venv"),
        }
        self.cwd = self.root
        self.groups: list[int] = []
        self.agent: AgentProcess | None = None
        self.metrics_address = f"127.0.0.1:{free_port()}"

    def ensure_agent(self) -> str:
        if self.agent is None:
            config = write_toml(
                self.root / "docs-agent.toml",
                {
                    "server": {"address": "127.0.0.1:0"},
                    "repository": {"path": str(self.root / "models")},
                    "signing": {"trust_dir": str(self.root / "models" / "keys" / "trusted")},
                    "state": {"dir": str(self.root / "docs-agent-state")},
                    "telemetry": {"prometheus_address": self.metrics_address},
                },
            )
            self.agent = AgentProcess(config).wait_serving()
        return self.agent.address

    def run(self, block: Block) -> None:
        text = block.text
        if "agent" in block.needs:
            text = text.replace("127.0.0.1:8001", self.ensure_agent())
            text = text.replace("127.0.0.1:9464", self.metrics_address)
        n = len(self.groups)
        script = self.root / f".block-{n}.sh"
        env_out = self.root / f".block-{n}.env"
        cwd_out = self.root / f".block-{n}.cwd"
        log = self.root / f".block-{n}.log"
        if block.lang == "python":
            script = script.with_suffix(".py")
            script.write_text(text)
            command = [str(REPO_ROOT / ".venv" / "bin" / "python"), str(script)]
        else:
            # set -a: plain assignments are exported, so they reach the next block too.
            script.write_text(
                f"set -euo pipefail\nset -a\ntrap 'pwd > {cwd_out}; env -0 > {env_out}' EXIT\n"
                f"{text}"
            )
            command = ["bash", str(script)]
        timeout = float(block.options.get("timeout", DEFAULT_TIMEOUT_S))
        with log.open("wb") as out:  # a file: a background child must not hold a pipe open
            proc = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(proc.pid)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc.pid)
            proc.wait(10)
            raise AssertionError(
                f"{block.where}: still running after {timeout:.0f}s\n{block.text}\n"
                f"--- output:\n{log.read_text(errors='replace')[-6000:]}"
            ) from None
        output = log.read_text(errors="replace")
        assert code == 0, f"{block.where}: exit {code}\n{block.text}\n--- output:\n{output[-6000:]}"
        for failure in FAILURE_TEXT:  # tools that say they failed and exit 0
            assert failure not in output, f"{block.where}: {failure!r}\n--- output:\n{output}"
        if env_out.exists():
            pairs = [p.split("=", 1) for p in env_out.read_text().split("\0") if "=" in p]
            self.env = {k: v for k, v in pairs if k not in {"_", "SHLVL", "OLDPWD", "PWD"}}
        if cwd_out.exists():
            self.cwd = Path(cwd_out.read_text().strip())

    @staticmethod
    def _kill_group(pgid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)

    def close(self) -> None:
        for pgid in reversed(self.groups):
            self._kill_group(pgid)
        if self.agent is not None:
            self.agent.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def session() -> Iterator[Session]:
    made = Session()
    try:
        yield made
    finally:
        made.close()


def _runnable(doc: Path) -> list[Block]:
    return [b for b in blocks(doc) if b.marker == "runnable"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "doc",
    [d for d in DOCS if _runnable(d)],
    ids=lambda d: str(d.relative_to(REPO_ROOT)),
)
def test_runnable_blocks_run(doc: Path, session: Session) -> None:
    for block in _runnable(doc):
        if "perf_analyzer" in block.needs and not PERF_TOOLS.exists():
            print(f"{block.where}: not run, perf_analyzer not unpacked (tests/run.sh does that)")
            continue
        session.run(block)
