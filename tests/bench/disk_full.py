"""Disk full during an update (issue 17, campaign 4).

The agent's state directory (downloads, staging, state.json, telemetry outbox)
is a small tmpfs (``mount -t tmpfs -o size=8m``, root only; unmounted in a
``finally``). The repository it serves from is on the ordinary disk. Two cases:

* download: a signed version larger than the whole file system is deployed;
  the download hits ENOSPC.
* state write: the file system is filled up to a few KiB before a small
  deployment, so the first state write of the job hits ENOSPC.

Verdict, each case: the job is reported upstream as failed with a reason that
names the disk space; the old version answers every request during the whole
case (a client thread infers all the time); after a restart (with the space
freed) state.json parses, every version directory verifies and the agent serves
the version its state pins.

    python tests/bench/disk_full.py [--size-mb 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from agent.signing.keys import TrustStore  # noqa: E402
from agent.signing.version_dir import verify_version  # noqa: E402
from tests.agent_process import AgentProcess  # noqa: E402
from tests.fleet_harness import (  # noqa: E402
    MODEL,
    TERMINAL,
    Keys,
    TestController,
    agent_config,
    deployment_doc,
    repository_problems,
    version_files,
    write_version,
)
from tests.mqtt_broker import MosquittoBroker  # noqa: E402
from tests.test_fleet_crash import infer_k  # noqa: E402

SPACE_WORDS = ("no space", "disk", "space left", "enospc", "file system is full")


@contextlib.contextmanager
def small_filesystem(directory: Path, size_mb: int) -> Iterator[str]:
    """A tmpfs of ``size_mb`` at ``directory``; yields how it was made."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield f"tmpfs size={size_mb}m"
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True,
                       timeout=30)


def fill(path: Path) -> None:
    """Write real blocks (not a sparse file) into ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\xff" * size
            for _ in range(100_000):  # bounded: 8 MiB take about 2,000 writes
                try:
                    os.write(fd, block)
                except OSError:
                    break
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Watcher:
    """A client thread inferring all the time: every answer's k, every error."""

    address: str
    answers: dict[float, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                k = infer_k(self.address)
                self.answers[k] = self.answers.get(k, 0) + 1
            except Exception as exc:
                self.errors.append(repr(exc)[:200])
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)


@dataclass
class Result:
    case: str
    status: str
    reason: str
    served: dict[float, int]
    errors: int
    after_restart: str
    ok: bool


def names_disk_space(job: dict[str, Any]) -> bool:
    text = f"{job.get('reason_code', '')} {job.get('message', '')} {job.get('reason', '')}"
    return any(word in text.lower() for word in SPACE_WORDS)


def run_case(case: str, tmp: Path, size_mb: int, sequence: int, verbose: bool = False,
             timeout: float = 30.0) -> Result:
    broker = MosquittoBroker(tmp / "broker").start()
    keys = Keys.create(tmp / "keys")
    repository, state = tmp / "repo", tmp / "state"
    write_version(repository / MODEL / "1", 1.0, keys.model)
    trust = TrustStore.from_directory(keys.model_trust_dir)
    controller = TestController(broker.port)
    agent: AgentProcess | None = None
    watcher: Watcher | None = None
    try:
        with small_filesystem(state, size_mb):
            config = agent_config(tmp, broker.port, keys, repository, state,
                                  chunk_bytes=256 * 1024, window=4, chunk_retries=2)
            agent = AgentProcess(config).wait_serving(30)
            watcher = Watcher(agent.address)
            padding = (size_mb + 4) * 1024 * 1024 if case == "download" else 0
            directory = write_version(tmp / "published" / "2", 2.0, keys.model, padding=padding)
            files = version_files(directory)
            controller.add_files(files)
            doc = deployment_doc(files, 2, sequence, probation_s=0.5)
            filler = state / "filler"
            if case == "state write":
                time.sleep(1.0)  # the agent's own start-up writes are done
                fill(filler)
            controller.deploy(doc, keys.deploy)
            try:
                final = controller.wait_job(doc["deployment_id"], TERMINAL, timeout)
            except AssertionError as exc:
                final = {"status": "NO REPORT", "reason_code": "", "message": str(exc)[:200]}
            if verbose:
                jobs = controller.jobs_for(doc["deployment_id"])
                print(f"--- {case}: jobs", json.dumps(jobs)[-3000:])
                print(f"--- {case}: agent log\n" + agent.log_text()[-6000:])
            time.sleep(1.0)  # the old version keeps serving after the failure too
            watcher.stop()
            served, errors = dict(watcher.answers), len(watcher.errors)
            # Restart with the space freed: no corrupt state, a verified version serves.
            agent.stop()
            filler.unlink(missing_ok=True)
            agent = AgentProcess(config).wait_serving(30)
            after = ""
            try:
                json.loads((state / "state.json").read_text())
                problems = repository_problems(repository, lambda p: verify_version(p, trust))
                k = infer_k(agent.address)
                # A job the state left unfinished resumes now that there is space.
                job = json.loads((state / "state.json").read_text()).get("job") or {}
                if job.get("status") not in TERMINAL:
                    with contextlib.suppress(AssertionError):
                        controller.wait_job(doc["deployment_id"], TERMINAL, 20)
                k = infer_k(agent.address)
                models = json.loads((state / "state.json").read_text()).get("models", {})
                pinned = (models.get(MODEL) or {}).get("active", 1)  # none: the repository's
                after = f"serves {k:g}, pins {pinned}" + (f", {problems}" if problems else "")
                restart_ok = not problems and k == float(pinned)
            except Exception as exc:
                after, restart_ok = f"broken: {exc!r}"[:200], False
            agent.stop()
            agent = None
        ok = (final["status"] == "FAILED" and names_disk_space(final) and errors == 0
              and set(served) == {1.0} and restart_ok)
        return Result(case, str(final["status"]), f"{final.get('reason_code')}: "
                      f"{str(final.get('message', ''))[-110:]}", served, errors, after, ok)
    finally:
        if watcher is not None:
            watcher.stop()
        if agent is not None:
            agent.stop()
        controller.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--case", choices=["download", "state write"], action="append")
    parser.add_argument("--verbose", action="store_true", help="print jobs and agent logs")
    parser.add_argument("--report-timeout", type=float, default=30.0,
                        help="how long to wait for the job's final report")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("disk_full needs root (mount -t tmpfs)")
        return 2
    results = []
    for round_no in range(args.rounds):
        for number, case in enumerate(args.case or ["download", "state write"]):
            with tempfile.TemporaryDirectory(prefix="disk-full-") as tmp:
                results.append(run_case(case, Path(tmp), args.size_mb,
                                        10 * round_no + number + 1, args.verbose,
                                        args.report_timeout))
    print(f"disk_full: state directory on tmpfs size={args.size_mb}m; model repository on disk")
    print(f"{'case':<12} {'job':<10} {'served (k: answers)':<22} {'errors':>6}  after restart")
    for r in results:
        served = ", ".join(f"{k:g}: {n}" for k, n in sorted(r.served.items()))
        print(f"{r.case:<12} {r.status:<10} {served:<22} {r.errors:>6}  {r.after_restart}")
        print(f"{'':<12} reason: {r.reason}")
    passed = sum(r.ok for r in results)
    print(f"{passed}/{len(results)} cases: failure reported naming the disk space, old version "
          "served throughout, clean restart")
    print(f"verdict: {'PASS' if passed == len(results) else 'FAIL'}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
