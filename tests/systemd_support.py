"""Helpers for the systemd tests: a notification socket standing in for systemd,
and a model whose run time the request chooses.

Imports neither ``agent.wire`` nor tritonclient, so any test may use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.agent_process import REPO_ROOT

EXAMPLE_MODELS = REPO_ROOT / "models"


class NotifyListener:
    """A datagram socket at NOTIFY_SOCKET recording every sd_notify message with the
    time (monotonic) it arrived. Messages are the newline-separated fields."""

    def __init__(self) -> None:
        # sun_path is at most 107 bytes: keep the socket in a short temporary directory.
        self._dir = Path(tempfile.mkdtemp(prefix="sdn-"))
        self.path = self._dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                self.messages.append((time.monotonic(), data.decode().split("\n")))
                self._changed.notify_all()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def fields(self) -> list[str]:
        """Every field of every message so far, in order."""
        with self._changed:
            return [f for _, msg in self.messages for f in msg]

    def wait_for(
        self, field: str | Callable[[str], bool], after: int = 0, timeout: float = 30.0
    ) -> int:
        """Index (into ``messages``) of the first message at or after ``after`` with a
        field equal to ``field`` (or for which it is true), waiting up to ``timeout`` s."""
        match = field if callable(field) else field.__eq__
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(after, len(self.messages)):
                    if any(match(f) for f in self.messages[i][1]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {field!r} within {timeout} s; got {self.messages[after:]}"
                    )
                self._changed.wait(min(left, 0.2))

    def ping_times(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        with self._changed:
            return [t for t, msg in self.messages if "WATCHDOG=1" in msg and start <= t <= end]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def counter_model(offset: int = 0) -> bytes:
    """INT64 ``iters`` [1] -> INT64 ``count`` [1] = offset + iters, by a Loop that runs
    ``iters`` times: about a microsecond per iteration, so the caller picks how long
    the run takes (10**10 is hours)."""
    T = TensorProto
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", T.INT64, []),
            helper.make_tensor_value_info("cond_in", T.BOOL, []),
            helper.make_tensor_value_info("acc_in", T.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", T.BOOL, []),
            helper.make_tensor_value_info("acc_out", T.INT64, [1]),
        ],
        [helper.make_tensor("one", T.INT64, [1], [1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["iters"], ["trip"]),
            helper.make_node("Loop", ["trip", "true", "start"], ["count"], body=body),
        ],
        "counter",
        [helper.make_tensor_value_info("iters", T.INT64, [1])],
        [helper.make_tensor_value_info("count", T.INT64, [1])],
        [
            helper.make_tensor("true", T.BOOL, [], [True]),
            helper.make_tensor("start", T.INT64, [1], [offset]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


COUNTER_CONFIG = """\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "iters" data_type: TYPE_INT64 dims: [ 1 ] }} ]
output [ {{ name: "count" data_type: TYPE_INT64 dims: [ 1 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
"""


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def add_counter(repo: Path, name: str, version: int = 1, offset: int = 0,
                instances: int = 1) -> None:
    write_atomically(
        repo / name / "config.pbtxt",
        COUNTER_CONFIG.format(name=name, instances=instances).encode(),
    )
    write_atomically(repo / name / str(version) / "model.onnx", counter_model(offset))


def copy_example(repo: Path, name: str) -> None:
    shutil.copytree(EXAMPLE_MODELS / name, repo / name)
