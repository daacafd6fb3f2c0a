"""The agent under a stand-in for systemd: a real ``edge-agent serve`` subprocess
whose NOTIFY_SOCKET is a datagram socket this test owns, real signals, and
Triton's own client for the requests.

Covered: the notification sequence (STATUS, READY only once serving, RELOADING +
MONOTONIC_USEC then READY around SIGHUP, STOPPING on SIGTERM), watchdog pings
that stop when inference stalls, reload under load with no failed request, a
refused invalid config, and the drain of in-flight requests on SIGTERM.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.agent_process import AgentProcess, write_toml
from tests.systemd_support import (
    NotifyListener,
    add_counter,
    copy_example,
    counter_model,
    write_atomically,
)

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: pings every 0.5 s
FOREVER = 10**12  # counter iterations: days


@dataclass
class Service:
    agent: AgentProcess
    notify: NotifyListener
    config: Path
    repo: Path

    def client(self) -> Any:
        return grpcclient.InferenceServerClient(self.agent.address)


def _config(tmp: Path, repo: Path, **server: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"address": "127.0.0.1:0", **server},
        "repository": {"path": str(repo)},
        "state": {"dir": str(tmp / "state")},
        "signing": {"allow_unsigned_models": True},  # until the signing work lands
        # One thread per run: concurrent runs share the CPUs without spinning.
        "runtime": {"intra_op_threads": 1},
        "telemetry": {"prometheus_address": ""},  # no fixed port shared between agents
    }


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Any]:
    """Starts agents on a repository under tmp_path; stops every one by PID."""
    started: list[Service] = []

    def start(
        server: dict[str, Any] | None = None, watchdog: bool = True, repo: Path | None = None
    ) -> Service:
        if repo is None:
            repo = tmp_path / "repo"
            add_counter(repo, "counter", instances=4)
            copy_example(repo, "tabular_classifier")
        config = write_toml(tmp_path / "agent.toml", _config(tmp_path, repo, **(server or {})))
        notify = NotifyListener()
        # WATCHDOG_PID would have to be the agent's own pid, unknown before spawn:
        # leave it empty (systemd sets it for the main process; unset means "you").
        env = {**notify.env, "WATCHDOG_PID": ""}
        if watchdog:
            env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        agent = AgentProcess(config, env=env)
        service = Service(agent, notify, config, repo)
        started.append(service)
        return service

    yield start
    for service in started:
        service.agent.signal(signal.SIGCONT)
        service.agent.stop()
        service.notify.close()


def _infer_counter(client: Any, iters: int, model: str = "counter", version: str = "",
                   timeout: float | None = None) -> int:
    inp = grpcclient.InferInput("iters", [1], "INT64")
    inp.set_data_from_numpy(np.array([iters], dtype=np.int64))
    result = client.infer(model, [inp], model_version=version, client_timeout=timeout)
    return int(result.as_numpy("count")[0])


def _seconds_per_iteration(client: Any) -> float:
    """How long one counter Loop iteration takes on this machine (best of 3)."""
    n = 300_000
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        assert _infer_counter(client, n) == n
        best = min(best, time.monotonic() - t0)
    return best / n


def _infer_tabular(client: Any, rng: np.random.Generator) -> str:
    inp = grpcclient.InferInput("features", [1, 8], "FP32")
    inp.set_data_from_numpy(rng.standard_normal((1, 8), dtype=np.float32))
    result = client.infer("tabular_classifier", [inp])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1.0) < 1e-4
    return str(result.get_response().model_version)


def _wait_event(agent: AgentProcess, match: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The first log event ``match`` accepts, waiting for the log reader to catch up."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in list(agent.events) if match(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such log event within {timeout} s:\n{agent.log_text()}")
        time.sleep(0.05)


def _status_fields(fields: list[str]) -> list[str]:
    return [f.removeprefix("STATUS=") for f in fields if f.startswith("STATUS=")]


def test_ready_reload_stop_sequence(service_factory: Any) -> None:
    service = service_factory()
    agent, notify = service.agent, service.notify

    # Freeze the agent the moment READY=1 arrives: whatever it did before sending
    # READY is then visible, and nothing it does after can be mistaken for it.
    ready = notify.wait_for("READY=1")
    agent.signal(signal.SIGSTOP)
    try:
        agent.wait_serving(5)  # the "serving" line, written before READY, is in the pipe
        host, port = agent.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            pass  # the port is listening (the kernel accepts while the agent is stopped)
        # ... and so are the model loads, all before "serving".
        loaded = [
            (e.get("model"), e.get("version"))
            for e in itertools.takewhile(lambda e: e["msg"] != "serving", agent.events)
            if e["msg"] == "model version ready"
        ]
        assert sorted(loaded) == [("counter", "1"), ("tabular_classifier", "2")]
    finally:
        agent.signal(signal.SIGCONT)

    before_ready = [f for _, m in notify.messages[:ready] for f in m]
    assert any(s.startswith("loading models") for s in _status_fields(before_ready))
    assert "READY=1" not in before_ready
    ready_status = _status_fields(notify.messages[ready][1])
    assert ready_status == [f"serving 2 model version(s) on {agent.address}"]

    client = service.client()
    assert client.is_server_ready() and client.is_model_ready("counter")
    assert _infer_counter(client, 5) == 5

    # Pings every WATCHDOG_USEC/2 while healthy.
    t0 = time.monotonic()
    time.sleep(2.6)
    pings = notify.ping_times(t0)
    assert len(pings) >= 4, notify.messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.35 < statistics.median(gaps) < 0.7 and max(gaps) < 0.9, gaps

    # SIGHUP: RELOADING=1 with a CLOCK_MONOTONIC timestamp, then READY=1 again.
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    mark = len(notify.messages)
    agent.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=mark, timeout=10)
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    usec = [f for f in notify.messages[reloading][1] if f.startswith("MONOTONIC_USEC=")]
    assert len(usec) == 1 and before_usec <= int(usec[0].split("=")[1]) <= after_usec
    reready = notify.wait_for("READY=1", after=reloading, timeout=10)
    assert _status_fields(notify.messages[reready][1]) == ready_status
    assert _infer_counter(client, 7) == 7
    client.close()

    # SIGTERM: STOPPING=1, then exit 0.
    mark = len(notify.messages)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(15) == 0
    stopping = notify.wait_for("STOPPING=1", after=mark, timeout=1)
    assert any(s.startswith("stopping") for s in _status_fields(notify.messages[stopping][1]))
    assert not any("READY=1" in m for _, m in notify.messages[stopping:])

    # Every STATUS= is one readable line.
    for text in _status_fields(notify.fields()):
        assert text and "\n" not in text and text.isprintable()
    # Every log line is one JSON event with level and logger; model events name both.
    assert len(agent.events) == len(agent.lines)
    for event in agent.events:
        assert {"ts", "level", "logger", "msg"} <= set(event)
        if event["msg"].startswith("model version"):
            assert event.get("model") and event.get("version"), event


def test_invalid_config_on_reload_is_refused(service_factory: Any) -> None:
    service = service_factory()
    agent, notify = service.agent, service.notify
    notify.wait_for("READY=1")
    agent.wait_serving()
    client = service.client()
    good = service.config.read_text()

    for bad, key in (
        (good.replace("[repository]", "[repository]\nmodel_contol = \"explicit\""),
         "repository.model_contol"),
        (good.replace("[server]", "[server]\ndrain_timeout_s = -1"), "server.drain_timeout_s"),
    ):
        service.config.write_text(bad)
        mark = len(notify.messages)
        agent.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", after=mark, timeout=10)
        ready = notify.wait_for("READY=1", after=reloading, timeout=10)
        (status,) = _status_fields(notify.messages[ready][1])
        assert "reload refused" in status and key in status, status
        refusal = _wait_event(
            agent, lambda e, key=key: e["msg"].startswith("reload refused") and key in e["reason"]
        )
        assert refusal["level"] == "error"
        # The old config and models keep serving.
        assert _infer_counter(client, 3) == 3

    # A good config again: accepted, and a model added meanwhile comes up.
    add_counter(service.repo, "counter_b", offset=100)
    service.config.write_text(good)
    mark = len(notify.messages)
    agent.signal(signal.SIGHUP)
    ready = notify.wait_for("READY=1", after=notify.wait_for("RELOADING=1", after=mark))
    (status,) = _status_fields(notify.messages[ready][1])
    assert status.startswith("serving 3 model version(s)"), status
    assert _infer_counter(client, 3, model="counter_b") == 103
    client.close()


def test_watchdog_pings_stop_while_inference_is_stalled(service_factory: Any) -> None:
    service = service_factory({"stall_timeout_s": 1.5, "drain_timeout_s": 2})
    agent, notify = service.agent, service.notify
    notify.wait_for("READY=1")
    agent.wait_serving()
    client = service.client()
    per_iter = _seconds_per_iteration(client)

    def stalls() -> list[dict[str, Any]]:
        return [e for e in agent.events if e["msg"].startswith("inference stalled")]

    # A run slower than the stall timeout that does finish: pings pause, then resume.
    # Aimed at 7 s: the calibration above can be off by a third on a busy machine,
    # and the pause the pings must show needs a run of more than 4 s.
    t0 = time.monotonic()
    iters = int(7.0 / per_iter)
    assert _infer_counter(client, iters, timeout=60) == iters
    t1 = time.monotonic()
    assert t1 - t0 > 4.0
    deadline = t1 + 5
    while not notify.ping_times(t1) and time.monotonic() < deadline:
        time.sleep(0.05)
    pings = notify.ping_times(t0 - 1)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert pings and max(gaps) > 2.0, gaps  # paused while stalled ...
    assert pings[-1] >= t1  # ... and back once the run finished
    (stall,) = stalls()
    assert (stall["level"], stall["model"], stall["version"]) == ("error", "counter", "1")
    _wait_event(agent, lambda e: e["msg"].startswith("inference no longer stalled"))

    # A run that never finishes: the pings stop for good (systemd would kill us).
    failures: list[BaseException] = []

    def stuck_request() -> None:
        try:
            _infer_counter(service.client(), FOREVER, timeout=120)
        except BaseException as exc:
            failures.append(exc)

    mark = len(notify.messages)
    threading.Thread(target=stuck_request, daemon=True).start()
    stall_msg = notify.wait_for(
        lambda f: f.startswith("STATUS=inference stalled"), after=mark, timeout=10
    )
    stalled_at = notify.messages[stall_msg][0]
    time.sleep(3 * WATCHDOG_USEC / 1e6)
    assert notify.ping_times(stalled_at) == [], "pings went on while inference was stuck"
    last_ping = notify.ping_times()[-1]
    assert stalled_at - last_ping < 1.0  # they stopped when the stall was noticed
    (status,) = _status_fields(notify.messages[stall_msg][1])
    assert "model counter version 1" in status, status
    assert failures == []  # the stuck request is still waiting
    second = _wait_event(agent, lambda e: e["msg"].startswith("inference stalled") and e != stall)
    assert (second["model"], second["version"]) == ("counter", "1")

    # SIGTERM with the run still stuck: the drain is bounded and the exit clean.
    t_term = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(15) == 0
    assert time.monotonic() - t_term < 2 + 3.0
    abandoned = _wait_event(agent, lambda e: e["msg"].startswith("inference runs still going"))
    assert abandoned["models"] == ["counter:1"]
    client.close()


@dataclass
class Outcome:
    model: str
    started: float
    ended: float
    value: str | int | None = None
    error: str | None = None


def test_reload_under_load_swaps_versions_without_failures(
    service_factory: Any, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    add_counter(repo, "counter", instances=2)
    copy_example(repo, "tabular_classifier")
    copy_example(repo, "text_features")
    service = service_factory(repo=repo)
    agent, notify = service.agent, service.notify
    notify.wait_for("READY=1")
    agent.wait_serving()

    outcomes: list[Outcome] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        client = service.client()
        rng = np.random.default_rng(worker)
        for _ in range(100_000):  # bounded; ``stop`` ends it long before
            if stop.is_set():
                break
            model = "tabular_classifier" if worker % 2 else "counter"
            o = Outcome(model, time.monotonic(), 0.0)
            try:
                if worker % 2:
                    o.value = _infer_tabular(client, rng)
                else:
                    o.value = _infer_counter(client, 50, version="1")
            except (InferenceServerException, AssertionError) as exc:
                o.error = repr(exc)
            o.ended = time.monotonic()
            outcomes.append(o)
        client.close()

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        info_before = [e for e in agent.events if e["level"] in ("info", "debug")]
        served_before = len(outcomes)
        time.sleep(1.0)
        # Thousands of requests, not one log line at INFO for them.
        assert len(outcomes) - served_before > 100
        assert [e for e in agent.events if e["level"] in ("info", "debug")] == info_before

        # New version, changed version, new model, removed model; then SIGHUP.
        shutil.copytree(repo / "tabular_classifier" / "1", repo / "tabular_classifier" / "3")
        write_atomically(repo / "counter" / "1" / "model.onnx", counter_model(offset=1000))
        add_counter(repo, "counter_new", offset=7)
        shutil.rmtree(repo / "text_features")
        mark = len(notify.messages)
        agent.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", after=mark, timeout=10)
        reload_at = notify.messages[reloading][0]
        notify.wait_for("READY=1", after=reloading, timeout=30)
        ready_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    failed = [o for o in outcomes if o.error is not None]
    assert failed == [], failed[:5]
    tabular = [o for o in outcomes if o.model == "tabular_classifier"]
    assert {o.value for o in tabular if o.ended < reload_at} == {"2"}
    assert {o.value for o in tabular if o.started > ready_at} == {"3"}
    cnt_after = {o.value for o in outcomes if o.model == "counter" and o.started > ready_at}
    assert cnt_after == {1050}
    assert {o.value for o in outcomes if o.model == "counter"} == {50, 1050}

    client = service.client()
    assert _infer_counter(client, 1, model="counter_new") == 8
    assert not client.is_model_ready("text_features")
    index = {(m["name"], m.get("version", "")): m for m in
             client.get_model_repository_index(as_json=True)["models"]}
    assert index[("tabular_classifier", "3")]["state"] == "READY"
    assert ("tabular_classifier", "2") not in index
    assert index[("text_features", "1")]["state"] == "UNAVAILABLE"
    client.close()
    retired = {(e["model"], e["version"]) for e in agent.events
               if e["msg"] == "model version retired"}
    assert retired == {("tabular_classifier", "2"), ("counter", "1"), ("text_features", "1")}


def test_sigterm_drains_in_flight_requests(service_factory: Any) -> None:
    service = service_factory({"drain_timeout_s": 20})
    agent, notify = service.agent, service.notify
    notify.wait_for("READY=1")
    agent.wait_serving()
    client = service.client()
    iters = int(2.0 / _seconds_per_iteration(client))

    results: dict[int, tuple[float, float, int | str]] = {}

    def slow(i: int) -> None:
        c = service.client()
        t0 = time.monotonic()
        try:
            value: int | str = _infer_counter(c, iters + i, timeout=60)
        except InferenceServerException as exc:
            value = repr(exc)
        results[i] = (t0, time.monotonic(), value)
        c.close()

    # A client holding a stream open (idle) must not hold up the exit either.
    streamed: list[Any] = []
    stream_client = service.client()
    stream_client.start_stream(lambda result, error: streamed.append(error or result))
    inp = grpcclient.InferInput("iters", [1], "INT64")
    inp.set_data_from_numpy(np.array([4], dtype=np.int64))
    stream_client.async_stream_infer("counter", [inp])
    deadline = time.monotonic() + 10
    while not streamed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(streamed[0].as_numpy("count")[0]) == 4

    threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all three are running, on three of the model's four instances
    mark = len(notify.messages)
    t_term = time.monotonic()
    agent.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", after=mark, timeout=5)
    # A request after SIGTERM is refused.
    with pytest.raises(InferenceServerException) as refused:
        _infer_counter(client, 1, timeout=5)
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    for t in threads:
        t.join(30)
    assert agent.wait_exit(15) == 0
    exited = time.monotonic()
    # Every slow request was in flight across the SIGTERM and completed correctly.
    assert sorted(results) == [0, 1, 2]
    for i, (started, ended, value) in results.items():
        assert value == iters + i, results
        assert started < t_term < ended - 0.5
    # The agent exits once the last one is done, not at the end of drain_timeout_s (20 s);
    # the margins are wide because a loaded 2-core CI machine stretches everything.
    last = max(ended for _, ended, _ in results.values())
    assert exited - last < 8.0 and exited - t_term < 16, (exited - last, exited - t_term)
    client.close()
    stream_client.stop_stream(cancel_requests=True)
    stream_client.close()
