"""Triton's system shared memory extension through tritonclient, unchanged
(``tritonclient.utils.shared_memory`` creates the regions), against a real
agent process: inputs and outputs in shared memory, status, checks (bounds,
keys, path traversal, off by default), and regions released when unregistered
and when the agent stops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess, start_serving, write_toml
from tests.serving_models import make_repository, scale_and_echo_model, serving_config

Array = np.ndarray[Any, Any]
CONFIG = """
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "tag" data_type: TYPE_STRING dims: [ 1 ] } ]
"""
PREFIX = f"edge_test_{os.getpid()}"


def _start(tmp: Path, **server: Any) -> AgentProcess:
    repo = make_repository(tmp / "models", {"scaler": (scale_and_echo_model(), CONFIG)})
    config = serving_config(tmp, repo, server=server)
    return start_serving(write_toml(tmp / "agent.toml", config))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = _start(tmp_path_factory.mktemp("shm"), shared_memory="system")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(agent.address)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions() -> Iterator[list[Any]]:
    handles: list[Any] = []
    yield handles
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def _mapped(pid: int, key: str) -> bool:
    return f"/dev/shm/{key.lstrip('/')}" in Path(f"/proc/{pid}/maps").read_text()


def _tag_input(rows: int) -> grpcclient.InferInput:
    tag = np.array([[f"t{i}".encode()] for i in range(rows)], dtype=object)
    t = grpcclient.InferInput("tag", list(tag.shape), "BYTES")
    t.set_data_from_numpy(tag)
    return t


def test_inputs_and_outputs_in_shared_memory(
    agent: AgentProcess, client: grpcclient.InferenceServerClient, regions: list[Any]
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    key_in, key_out = f"/{PREFIX}_in", f"/{PREFIX}_out"
    h_in = shm.create_shared_memory_region("in", key_in, x.nbytes + 64)
    h_out = shm.create_shared_memory_region("out", key_out, x.nbytes + 64)
    regions.extend([h_in, h_out])
    shm.set_shared_memory_region(h_in, [x], offset=64)  # at an offset in the region
    client.register_system_shared_memory("in", key_in, x.nbytes + 64)
    client.register_system_shared_memory("out", key_out, x.nbytes, offset=64)

    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["in"]["key"] == key_in and int(status["in"]["byte_size"]) == x.nbytes + 64
    assert int(status["out"].get("offset", 0)) == 64

    x_in = grpcclient.InferInput("x", list(x.shape), "FP32")
    x_in.set_shared_memory("in", x.nbytes, offset=64)
    y_out = grpcclient.InferRequestedOutput("y")
    y_out.set_shared_memory("out", x.nbytes)
    tag_out = grpcclient.InferRequestedOutput("tag_out")  # beside it, on the wire
    result = client.infer("scaler", [x_in, _tag_input(3)], outputs=[y_out, tag_out])
    assert result.get_output("y").shape == [3, 4]
    y = shm.get_contents_as_numpy(h_out, np.float32, [3, 4], offset=64)
    np.testing.assert_array_equal(y, 2 * x)
    assert result.as_numpy("tag_out").reshape(-1).tolist() == [b"t0", b"t1", b"t2"]

    # Released when unregistered: the agent no longer maps the object.
    assert _mapped(agent.pid, key_in)
    client.unregister_system_shared_memory("in")
    assert not _mapped(agent.pid, key_in)
    assert "in" not in client.get_system_shared_memory_status(as_json=True).get("regions", {})
    with pytest.raises(InferenceServerException) as info:
        client.infer("scaler", [x_in, _tag_input(3)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'in'" in info.value.message()


def test_regions_are_checked(
    client: grpcclient.InferenceServerClient, regions: list[Any], tmp_path: Path
) -> None:
    key = f"/{PREFIX}_small"
    regions.append(shm.create_shared_memory_region("small", key, 64))

    def refused(*args: Any, **kwargs: Any) -> str:
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory(*args, **kwargs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        return str(info.value.message())

    assert "beyond the end" in refused("big", key, 65)
    assert "beyond the end" in refused("far", key, 16, offset=56)
    assert "cannot open" in refused("none", f"/{PREFIX}_absent", 16)
    (tmp_path / "secret").write_bytes(b"x" * 64)
    for traversal in ("/../../etc/passwd", "../" + str(tmp_path / "secret"), "/a/b", "..", "/.."):
        assert "shm_open name" in refused("evil", traversal, 16)
    os.symlink(tmp_path / "secret", f"/dev/shm/{PREFIX}_link")
    try:
        assert "cannot open" in refused("link", f"/{PREFIX}_link", 16)
    finally:
        os.unlink(f"/dev/shm/{PREFIX}_link")
    client.register_system_shared_memory("small", key, 64)
    assert "already registered" in refused("small", key, 64)

    # Use is bounded by the region: an input that reaches past it is refused.
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_shared_memory("small", 16, offset=56)
    with pytest.raises(InferenceServerException) as info:
        client.infer("scaler", [x, _tag_input(1)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "outside region 'small'" in info.value.message()
    # An output larger than its window is refused, naming it.
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_shared_memory("small", 16)
    y = grpcclient.InferRequestedOutput("y")
    y.set_shared_memory("small", 8, offset=32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("scaler", [x, _tag_input(1)], outputs=[y])
    assert "output 'y'" in info.value.message() and "byte_size is 8" in info.value.message()


def test_off_by_default_and_released_when_the_agent_stops(
    tmp_path: Path, regions: list[Any]
) -> None:
    key = f"/{PREFIX}_stop"
    regions.append(shm.create_shared_memory_region("r", key, 64))
    with _start(tmp_path / "off") as off:
        c = grpcclient.InferenceServerClient(off.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                c.register_system_shared_memory("r", key, 64)
            assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "server.shared_memory" in info.value.message()
            meta = c.get_server_metadata(as_json=True)
            assert "system_shared_memory" in meta["extensions"]
        finally:
            c.close()
    on = _start(tmp_path / "on", shared_memory="system")
    try:
        c = grpcclient.InferenceServerClient(on.address)
        try:
            c.register_system_shared_memory("r", key, 64)
            assert _mapped(on.pid, key)
        finally:
            c.close()
    finally:
        assert on.stop() == 0
    assert os.path.exists(f"/dev/shm/{key.lstrip('/')}")  # the client's object is the client's
