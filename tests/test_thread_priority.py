"""Model loading at low priority without slowing serving: onnxruntime thread pools.

onnxruntime's pool threads take the nice value of the thread that creates
them. The agent makes one pair of pools at start-up, at normal priority
(``share_thread_pools``), and creates sessions on low-priority threads; these
tests check with real processes and real onnxruntime sessions that no serving
thread ends up at a low priority and that sessions add no threads of their own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.common.background import BACKGROUND_NICE, BackgroundThread
from tests.agent_process import AgentProcess, write_toml
from tests.serving_models import make_repository, row_wise_model, serving_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the pools are made once per process.
SESSIONS_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    sys.path.insert(0, sys.argv[1])
    from agent.common.background import _lower_priority as lower_priority
    from agent.serving.onnx_runtime import (
        OnnxSession, SessionOptions, share_thread_pools, starts_no_threads)

    def threads():
        tasks = os.listdir("/proc/self/task")
        return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in tasks}

    shared = sys.argv[3] == "shared"
    options = SessionOptions(intra_op_threads=3)
    if shared:
        assert share_thread_pools(3, 0)
        assert share_thread_pools(3, 0)  # idempotent
        assert not share_thread_pools(2, 0)  # the pools exist: other sizes cannot have them
    before = threads()
    data = open(sys.argv[2], "rb").read()
    creators = []  # the low-priority threads that create the sessions (they end)
    sessions = []

    def create():
        creators.append(threading.get_native_id())
        lower_priority(10)
        sessions.append(OnnxSession(data, options))

    for _ in range(3):
        thread = threading.Thread(target=create)
        thread.start()
        thread.join()
    before.update(dict.fromkeys(creators, 0))
    new = {t: n for t, n in threads().items() if t not in before}
    print(starts_no_threads(options), len(new), sorted(set(new.values())))
    """
)


def _run_sessions(tmp_path: Path, mode: str) -> list[str]:
    model = tmp_path / "model.onnx"
    model.write_bytes(row_wise_model())
    done = subprocess.run(
        [sys.executable, "-c", SESSIONS_SCRIPT, str(REPO_ROOT), str(model), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(maxsplit=2)


def test_shared_pools_let_sessions_be_created_on_low_priority_threads(tmp_path: Path) -> None:
    no_threads, new_threads, _ = _run_sessions(tmp_path, "shared")
    assert no_threads == "True"
    assert new_threads == "0"  # three sessions, not one thread of their own


def test_without_shared_pools_a_low_priority_creator_leaves_low_priority_threads(
    tmp_path: Path,
) -> None:
    # The reason for the shared pools: each session's own pool inherits nice +10.
    no_threads, new_threads, nices = _run_sessions(tmp_path, "per-session")
    assert no_threads == "False"
    assert int(new_threads) == 3 * 2  # intra_op_threads=3: two pool threads per session
    assert nices == "[10]"


def _nice_values(pid: int) -> dict[int, int]:
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        values[int(task.name)] = int(fields[16])  # field 19 of stat: nice
    return values


def test_an_agent_loading_models_keeps_every_serving_thread_at_normal_priority(
    tmp_path: Path,
) -> None:
    models = {
        f"m{i}": (row_wise_model(), f'name: "m{i}"\nmax_batch_size: 8\n') for i in range(3)
    }
    repo = make_repository(tmp_path / "models", models)
    config = serving_config(tmp_path, repo, runtime={"intra_op_threads": 3})
    agent = AgentProcess(write_toml(tmp_path / "agent.toml", config))
    try:
        agent.wait_serving()
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            x = np.ones((2, 4), np.float32)
            k = np.zeros((2, 2), np.int64)
            tag = np.array([[b"a"], [b"b"]], dtype=np.object_)
            for name in models:
                inputs = []
                for tensor_name, array, datatype in (
                    ("x", x, "FP32"), ("k", k, "INT64"), ("tag", tag, "BYTES")
                ):
                    t = grpcclient.InferInput(tensor_name, list(array.shape), datatype)
                    t.set_data_from_numpy(array)
                    inputs.append(t)
                result = client.infer(name, inputs)
                assert result.as_numpy("y").shape == (2, 4)
        finally:
            client.close()
        # Loading threads (nice +10) end with their load; wait for them to go.
        deadline = time.monotonic() + 20
        while True:
            niced = {t: n for t, n in _nice_values(agent.pid).items() if n != 0}
            if not niced or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert niced == {}, f"threads left at a low priority: {niced}"
    finally:
        agent.stop()


def test_a_background_thread_runs_calls_in_order_at_low_priority() -> None:
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def job(i: int) -> tuple[int, int, str]:
        tid = threading.get_native_id()
        return i, os.getpriority(os.PRIO_PROCESS, tid), threading.current_thread().name

    async def go() -> list[tuple[int, int, str]]:
        worker = BackgroundThread("test-writer")
        try:
            return list(await asyncio.gather(*(worker.run(job, i) for i in range(20))))
        finally:
            await worker.close()

    results = asyncio.run(go())
    assert [i for i, _, _ in results] == list(range(20))
    assert {name for _, _, name in results} == {"test-writer"}  # one thread, reused
    assert {nice for _, nice, _ in results} == {min(loop_nice + BACKGROUND_NICE, 19)}
    # The caller's own priority is untouched.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice


def test_a_background_thread_hands_back_errors_and_finishes_calls_whose_caller_left() -> None:
    done: list[int] = []
    gate = threading.Event()

    def slow(i: int) -> int:
        gate.wait(10)
        done.append(i)
        return i

    def broken() -> None:
        raise ValueError("disk full")

    async def go() -> None:
        worker = BackgroundThread("test-errors", nice=0)
        with pytest.raises(ValueError, match="disk full"):
            await worker.run(broken)
        waiting = asyncio.create_task(worker.run(slow, 1))
        queued = asyncio.create_task(worker.run(slow, 2))
        await asyncio.sleep(0.05)
        waiting.cancel()
        queued.cancel()  # not started yet: still runs, in order (a write handed over)
        gate.set()
        await worker.close()  # waits for both
        assert done == [1, 2]
        with pytest.raises(RuntimeError, match="closed"):
            await worker.run(slow, 3)

    asyncio.run(asyncio.wait_for(go(), 30))

    other = BackgroundThread("test-loops", nice=0)
    asyncio.run(other.run(len, b"x"))
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(other.run(len, b"x"))
    other._jobs.put(None)  # its loop is gone, so close() cannot run: end the thread directly
    assert other._thread is not None
    other._thread.join(10)
    assert not other._thread.is_alive()
