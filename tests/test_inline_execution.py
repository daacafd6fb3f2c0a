"""Where the agent runs a model: inline on the event loop or on worker threads.

Through a real agent and tritonclient. Nothing here asserts on latency: the
tests read the decision the agent logs ("model version ready" carries
``execution``; "model execution moved" each move) and what clients get back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from tests.agent_process import AgentProcess, write_toml
from tests.serving_models import (
    _model,
    build_slow_model,
    make_repository,
    scale_and_echo_model,
    serving_config,
)

CALL_TIMEOUT_S = 30.0
# A lone request must not wait for company: far above anything else in this test.
LONG_QUEUE_DELAY_US = 60_000_000

INLINE_PARAM = 'parameters { key: "execution" value { string_value: "inline" } }'


def gram_model() -> bytes:
    """``x`` FP32 [b, n] -> ``y`` == x, computing x^T x (n x n) on the way: a few
    microseconds for n = 4, milliseconds for n in the thousands (a model that turns slow)."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
            helper.make_node("MatMul", ["xt", "x"], ["g"]),
            helper.make_node("ReduceMean", ["g"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "zero"], ["m0"]),
            helper.make_node("Add", ["x", "m0"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n"])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
        "gram",
    )


def _ready(agent: AgentProcess, model: str) -> dict[str, Any]:
    found = [
        e for e in agent.events if e.get("msg") == "model version ready" and e.get("model") == model
    ]
    assert found, f"no 'model version ready' for {model}:\n{agent.log_text()[-3000:]}"
    return found[-1]


def _moves(agent: AgentProcess, model: str) -> list[str]:
    return [
        str(e.get("execution"))
        for e in agent.events
        if e.get("msg") == "model execution moved" and e.get("model") == model
    ]


def _start(tmp: Path, models: dict[str, tuple[bytes, str | None]], **runtime: Any) -> AgentProcess:
    repo = make_repository(tmp / "models", models)
    config = serving_config(tmp, repo, runtime={"intra_op_threads": 1, **runtime})
    return AgentProcess(write_toml(tmp / "agent.toml", config)).wait_serving()


def _scale(client: grpcclient.InferenceServerClient, model: str) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    inputs = [
        grpcclient.InferInput("x", [1, 4], "FP32"),
        grpcclient.InferInput("tag", [1, 1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.array([[b"t"]], dtype=np.object_))
    result = client.infer(model, inputs, client_timeout=CALL_TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)


def _identity(
    client: grpcclient.InferenceServerClient, model: str, x: np.ndarray[Any, Any]
) -> None:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], client_timeout=CALL_TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("y"), x)


@pytest.fixture(scope="module")
def slow_bytes() -> bytes:
    return build_slow_model(target_ms=20.0).onnx_bytes


@pytest.fixture(scope="module")
def auto_agent(
    tmp_path_factory: pytest.TempPathFactory, slow_bytes: bytes
) -> Iterator[AgentProcess]:
    agent = _start(
        tmp_path_factory.mktemp("auto"),
        {
            "tiny": (scale_and_echo_model(), None),
            "slow": (slow_bytes, None),
            "slow_inline": (slow_bytes, INLINE_PARAM),
            "gram": (gram_model(), None),
        },
        # A threshold far from both models (the measured hop is tens of microseconds,
        # which a loaded machine blurs); the measured one is checked below.
        inline_threshold_us=2000,
    )
    yield agent
    agent.stop()


def test_auto_runs_a_tiny_model_inline_and_a_slow_one_on_workers(auto_agent: AgentProcess) -> None:
    tiny, slow = _ready(auto_agent, "tiny"), _ready(auto_agent, "slow")
    assert (tiny["execution_mode"], tiny["execution"]) == ("auto", "inline"), str(tiny)
    assert (slow["execution_mode"], slow["execution"]) == ("auto", "worker"), slow
    # The decision is the measured run time against the measured hop.
    assert tiny["run_us"] < tiny["threshold_us"] < slow["run_us"], (tiny, slow)
    # The per-model override (config.pbtxt parameter) wins over the measurement.
    forced = _ready(auto_agent, "slow_inline")
    assert (forced["execution_mode"], forced["execution"]) == ("inline", "inline"), forced
    client = grpcclient.InferenceServerClient(auto_agent.address)
    try:
        for _ in range(5):
            _scale(client, "tiny")
        _identity(client, "slow", np.ones((1, 4), np.float32))
        _identity(client, "slow_inline", np.ones((1, 4), np.float32))
    finally:
        client.close()
    assert _moves(auto_agent, "tiny") == [] and _moves(auto_agent, "slow") == []


def test_a_model_that_turns_slow_moves_off_the_loop_and_back(auto_agent: AgentProcess) -> None:
    assert _ready(auto_agent, "gram")["execution"] == "inline"
    client = grpcclient.InferenceServerClient(auto_agent.address)
    try:
        big = np.ones((1, 3000), np.float32)  # a 3000 x 3000 product: milliseconds
        for _ in range(30):  # bounded; a few such runs lift the average over the threshold
            _identity(client, "gram", big)
            if _moves(auto_agent, "gram"):
                break
        assert _moves(auto_agent, "gram")[:1] == ["worker"], auto_agent.log_text()[-2000:]
        small = np.ones((1, 4), np.float32)
        for _ in range(200):  # fast again: the average decays below the threshold
            _identity(client, "gram", small)
            if len(_moves(auto_agent, "gram")) >= 2:
                break
        assert _moves(auto_agent, "gram")[:2] == ["worker", "inline"]
    finally:
        client.close()


def test_config_override_keeps_every_model_on_workers(
    tmp_path: Path, slow_bytes: bytes
) -> None:
    agent = _start(
        tmp_path,
        {"tiny": (scale_and_echo_model(), None), "slow_inline": (slow_bytes, INLINE_PARAM)},
        execution="worker",
    )
    try:
        tiny = _ready(agent, "tiny")
        assert (tiny["execution_mode"], tiny["execution"]) == ("worker", "worker"), tiny
        # config.pbtxt names its own mode: it wins over runtime.execution.
        assert _ready(agent, "slow_inline")["execution"] == "inline"
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            _scale(client, "tiny")
        finally:
            client.close()
    finally:
        agent.stop()


def test_a_bad_execution_parameter_is_a_load_error_naming_it(tmp_path: Path) -> None:
    bad = 'parameters { key: "execution" value { string_value: "sideways" } }'
    agent = _start(tmp_path, {"tiny": (scale_and_echo_model(), bad)})
    try:
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            assert not client.is_model_ready("tiny")
            index = client.get_model_repository_index(as_json=True)
            reasons = [m.get("reason", "") for m in index.get("models", [])]
            assert any("execution" in r and "sideways" in r for r in reasons), reasons
        finally:
            client.close()
    finally:
        agent.stop()


@pytest.mark.parametrize("execution", ["worker", "auto"])
def test_a_lone_request_with_batching_runs_at_once(tmp_path: Path, execution: str) -> None:
    config = f"""
max_batch_size: 8
dynamic_batching {{
  max_queue_delay_microseconds: {LONG_QUEUE_DELAY_US}
  preferred_batch_size: [ 8 ]
}}
"""
    agent = _start(tmp_path, {"tiny": (scale_and_echo_model(), config)}, execution=execution)
    try:
        ready = _ready(agent, "tiny")
        if execution == "auto":  # the threshold measured here: a thread hop's cost
            assert 0 < ready["threshold_us"] < 10_000, str(ready)
        client = grpcclient.InferenceServerClient(agent.address)
        try:
            # The very first request, before the batcher learnt anything about its
            # clients: waiting for the queue delay would outlast the client's timeout.
            for _ in range(3):
                _scale(client, "tiny")
        finally:
            client.close()
    finally:
        agent.stop()
