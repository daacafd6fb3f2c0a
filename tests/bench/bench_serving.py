"""Serving benchmark: raw onnxruntime vs a grpc.aio echo floor vs the agent, side by side.

Prints ONE table, measured in one run, then the targets of issue 22 as ratios
with PASS/MISS, each beside the floor measured in the same run where there is
one. It is a program, not a test (nothing here is collected by
pytest; tests/test_bench_smoke.py only checks that a --quick run prints).

    .venv/bin/python tests/bench/bench_serving.py                # full run (~8 min)
    .venv/bin/python tests/bench/bench_serving.py --quick --models tiny
    .venv/bin/python tests/bench/bench_serving.py --duration 10 --json out.json

Rows (per model and client concurrency):
  raw        onnxruntime in this process, no gRPC; concurrency = threads calling
             session.run on one session (default session options, as the agent).
  raw-1t     the same with intra_op_num_threads = 1 (one core per run).
  raw-b16    raw, one thread issuing batches of 16 (samples/s is what counts).
  echo       tests/bench/echo_server.py: grpc.aio + the agent's protos, no model
             (the Python gRPC floor).
  echo+hop   the same with --off-loop: numpy and onnxruntime imported, each
             answer built on a worker thread (the floor of any Python server
             that keeps inference off its event loop, as the agent must).
  agent      `edge-agent serve`, config.pbtxt without dynamic_batching.
  agent+db   `edge-agent serve`, with dynamic_batching.

Models, built here deterministically into a temporary repository:
  tiny  the example tabular classifier (copied from models/tabular_classifier),
  conv  a small conv net on 3x64x64 (a few ms per request on this CPU),
  mlp   six 1024x1024 FP32 layers with ReLU (batch-friendly).

Load generator: separate client processes (tritonclient and agent.wire cannot
share a process) running asyncio with raw grpc.aio calls on tritonclient's
service_pb2 messages; the request is serialised once, every response is
parsed. The same client code drives echo and agent. ``--client tritonclient``
uses tritonclient.grpc.aio's InferenceServerClient.infer instead, and
``--client-procs N`` splits concurrencies >= 8 over N client processes.

Every server and client process is started here and stopped by its PID;
every load loop is bounded in time and in request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.agent_process import AgentProcess, write_toml  # noqa: E402
from tests.processes import LoggedProcess  # noqa: E402

PYTHON = sys.executable
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
EXAMPLE_MODELS = REPO_ROOT / "models"
MAX_REQUESTS_PER_S = 50_000  # cap on requests per cell: duration x this
BATCHED_CONCURRENCY = 8  # concurrencies from this up may be split over --client-procs

# ORT type string -> protocol datatype, for the tensors the bench models use.
_ORT_TYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
_ITEM_SIZES = {"FP32": 4, "INT64": 8}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

Tensor = tuple[str, str, list[int]]  # name, datatype, dims without the batch dimension


@dataclass
class BenchModel:
    name: str
    description: str
    onnx_bytes: bytes
    max_batch_size: int
    preferred_batch_size: int
    max_queue_delay_us: int
    instances: int = 0  # 0: no instance_group, the agent's default
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)

    def config_pbtxt(self, batching: bool) -> str:
        text = (
            f'name: "{self.name}"\n'
            'platform: "onnxruntime_onnx"\n'
            f"max_batch_size: {self.max_batch_size}\n"
        )
        if self.instances:
            text += f"instance_group [ {{ count: {self.instances} kind: KIND_CPU }} ]\n"
        if batching:
            text += (
                "dynamic_batching {\n"
                f"  preferred_batch_size: [ {self.preferred_batch_size} ]\n"
                f"  max_queue_delay_microseconds: {self.max_queue_delay_us}\n"
                "}\n"
            )
        return text

    def input_arrays(self, batch: int = 1) -> dict[str, Any]:
        import numpy as np

        rng = np.random.RandomState(1234)
        return {
            name: rng.standard_normal((batch, *dims)).astype(np.float32)
            for name, _datatype, dims in self.inputs
        }


def _finish_model(graph: Any) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="edge-agent tests/bench/bench_serving.py",
    )
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def build_conv() -> bytes:
    """3x64x64 image -> 3 stages of 2 (3x3 conv + ReLU) and a 2x2 max-pool -> 10 logits."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(7)
    inits = []
    nodes = []
    prev, cin, k = "image", 3, 0
    for stage, cout in enumerate((32, 64, 128)):
        for _ in range(2):
            w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(
                np.float32
            )
            b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
            nodes.append(
                helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], pads=[1, 1, 1, 1])
            )
            nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"]))
            prev, cin, k = f"r{k}", cout, k + 1
        nodes.append(
            helper.make_node("MaxPool", [prev], [f"p{stage}"], kernel_shape=[2, 2], strides=[2, 2])
        )
        prev = f"p{stage}"
    fw = (rng.standard_normal((cin, 10)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(fw, "fw"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _finish_model(graph)


def build_mlp() -> bytes:
    """x[B,1024] -> six 1024x1024 MatMul+Add layers, ReLU between them -> y[B,1024]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(11)
    inits = []
    nodes = []
    prev = "x"
    for i in range(6):
        w = (rng.standard_normal((1024, 1024)) * np.sqrt(2 / 1024)).astype(np.float32)
        b = (rng.standard_normal(1024) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == 5 else f"a{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out]))
        if i < 5:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        inits,
    )
    return _finish_model(graph)


def tiny_model_bytes() -> bytes:
    """The example tabular classifier, latest version, as committed in models/."""
    root = EXAMPLE_MODELS / "tabular_classifier"
    latest = max((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return (latest / "model.onnx").read_bytes()


MODEL_BUILDERS: dict[str, tuple[str, Callable[[], bytes], int]] = {
    # name: (description, builder, max_queue_delay_microseconds for the batching variant)
    # asyncio's epoll waits in whole milliseconds: a delay under 1000 us waits ~1 ms anyway.
    "tiny": ("example tabular classifier, 8 features", tiny_model_bytes, 1000),
    "conv": ("conv net 3x64x64, 6 convs", build_conv, 500),
    "mlp": ("MLP 6x1024x1024 FP32", build_mlp, 2000),
}


def _graph_tensors(nodes: Sequence[Any]) -> list[Tensor]:
    return [(n.name, _ORT_TYPES[n.type], [int(d) for d in n.shape[1:]]) for n in nodes]


def build_models(names: Sequence[str]) -> list[BenchModel]:
    import onnxruntime as ort

    models = []
    for name in names:
        description, builder, delay_us = MODEL_BUILDERS[name]
        data = builder()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        models.append(
            BenchModel(
                name=name,
                description=description,
                onnx_bytes=data,
                max_batch_size=32,
                preferred_batch_size=16,
                max_queue_delay_us=delay_us,
                inputs=_graph_tensors(session.get_inputs()),
                outputs=_graph_tensors(session.get_outputs()),
            )
        )
    return models


def write_repository(root: Path, models: Sequence[BenchModel], batching: bool) -> Path:
    for m in models:
        (root / m.name / "1").mkdir(parents=True)
        (root / m.name / "1" / "model.onnx").write_bytes(m.onnx_bytes)
        (root / m.name / "config.pbtxt").write_text(m.config_pbtxt(batching))
    return root


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    model: str
    concurrency: int
    server: str
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    batch: int = 1  # samples per request
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    server_cpu_pct: float | None = None
    client_cpu_pct: float | None = None
    rss_idle_mb: float | None = None
    rss_load_mb: float | None = None
    ready_log_ms: float | None = None
    ready_rpc_ms: float | None = None
    first_error: str = ""
    load1: float | None = None  # 1-minute load average when measured (the box is shared)
    latencies_ns: list[int] = field(default_factory=list, repr=False)

    def merged(self, other: Cell) -> Cell:
        """This cell and a later round of it, pooled."""
        latencies = self.latencies_ns + other.latencies_ns
        p50, p99 = percentiles(latencies)
        elapsed = self.elapsed_s + other.elapsed_s

        def mean(a: float | None, b: float | None) -> float | None:
            if a is None or b is None:
                return a if b is None else b
            return (a * self.elapsed_s + b * other.elapsed_s) / elapsed

        return Cell(
            model=self.model,
            concurrency=self.concurrency,
            server=self.server,
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            elapsed_s=elapsed,
            batch=self.batch,
            p50_us=p50,
            p99_us=p99,
            server_cpu_pct=mean(self.server_cpu_pct, other.server_cpu_pct),
            client_cpu_pct=mean(self.client_cpu_pct, other.client_cpu_pct),
            rss_idle_mb=self.rss_idle_mb,
            rss_load_mb=max(
                (v for v in (self.rss_load_mb, other.rss_load_mb) if v is not None),
                default=None,
            ),
            ready_log_ms=self.ready_log_ms,
            ready_rpc_ms=self.ready_rpc_ms,
            first_error=self.first_error or other.first_error,
            load1=mean(self.load1, other.load1),
            latencies_ns=latencies,
        )

    @property
    def infer_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.infer_per_s * self.batch


def percentiles(latencies_ns: Sequence[int]) -> tuple[float, float]:
    if not latencies_ns:
        return float("nan"), float("nan")
    ordered = sorted(latencies_ns)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return pick(0.50), pick(0.99)


# --------------------------------------------------------------------------------------------
# Raw onnxruntime, in this process
# --------------------------------------------------------------------------------------------


def make_session(data: bytes, intra_op_threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()  # the agent's defaults: ORT picks threads, all optimisations
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 0
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def _thread_load(
    session: Any, feeds: dict[str, Any], threads: int, duration: float, max_count: int
) -> tuple[list[int], float, int]:
    """``threads`` threads call session.run until ``duration`` or ``max_count``."""
    latencies: list[list[int]] = [[] for _ in range(threads)]
    remaining = [max_count]
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration
    perf_ns = time.perf_counter_ns

    def body(out: list[int]) -> None:
        run = session.run
        while time.perf_counter() < deadline:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            t0 = perf_ns()
            run(None, feeds)
            out.append(perf_ns() - t0)

    workers = [threading.Thread(target=body, args=(lat,)) for lat in latencies]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + 60)
    elapsed = time.perf_counter() - start
    merged = [x for lat in latencies for x in lat]
    return merged, elapsed, 0


def bench_raw(
    model: BenchModel, server: str, intra: int, batch: int, concurrency: int, opts: Options
) -> Cell:
    session = make_session(model.onnx_bytes, intra)
    feeds = model.input_arrays(batch)
    proc = _self_process()
    _thread_load(session, feeds, concurrency, opts.warmup, int(opts.warmup * MAX_REQUESTS_PER_S))
    cpu0 = _cpu_seconds(proc)
    lat, elapsed, _ = _thread_load(
        session, feeds, concurrency, opts.duration, int(opts.duration * MAX_REQUESTS_PER_S)
    )
    cpu = _cpu_seconds(proc) - cpu0
    p50, p99 = percentiles(lat)
    return Cell(
        model=model.name,
        concurrency=concurrency,
        server=server,
        requests=len(lat),
        elapsed_s=elapsed,
        batch=batch,
        p50_us=p50,
        p99_us=p99,
        server_cpu_pct=100.0 * cpu / elapsed,
        latencies_ns=lat,
    )


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _self_process() -> Any:
    import psutil

    return psutil.Process(os.getpid())


def _cpu_seconds(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:  # exited
        return 0.0


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoProcess(LoggedProcess):
    """tests/bench/echo_server.py as a child process, read like AgentProcess."""

    name = "echo server"
    tail_lines = 20

    def __init__(self, address: str, outputs_json: Path, off_loop: bool = False) -> None:
        args = [PYTHON, str(ECHO_SERVER), "--address", address, "--outputs", str(outputs_json)]
        super().__init__(args + (["--off-loop"] if off_loop else []), REPO_ROOT)

    def stop(self, timeout: float = 20.0) -> int:
        return self.terminate(timeout)


ServerProc = AgentProcess | EchoProcess


def _server_ready_rpc(address: str, timeout: float) -> bool:
    import grpc
    from tritonclient.grpc import service_pb2

    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=service_pb2.ServerReadyResponse.FromString,
        )
        response = call(service_pb2.ServerReadyRequest(), timeout=timeout)
        return bool(response.ready)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


@dataclass
class RunningServer:
    name: str
    proc: ServerProc
    address: str
    ready_log_ms: float
    ready_rpc_ms: float
    rss_idle_mb: float


def start_server(name: str, spawn: Callable[[str], ServerProc], settle_s: float) -> RunningServer:
    """Spawn on a free port; time spawn -> serving log line and -> first ServerReady true."""
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    proc = spawn(address)
    stamps: dict[str, float] = {}

    def wait_log() -> None:
        try:
            proc.wait_serving(60)
            stamps["log"] = time.perf_counter()
        except (RuntimeError, TimeoutError) as exc:
            stamps["error"] = 0.0
            print(f"{name}: {exc}", file=sys.stderr)

    waiter = threading.Thread(target=wait_log, daemon=True)
    waiter.start()
    try:
        deadline = t0 + 60
        ready_at = None
        while time.perf_counter() < deadline and "error" not in stamps:
            if _server_ready_rpc(address, 0.5):
                ready_at = time.perf_counter()
                break
            time.sleep(0.005)
        waiter.join(60)
        if ready_at is None or "log" not in stamps:
            raise RuntimeError(f"{name} did not become ready")
        time.sleep(settle_s)
        rss = _rss_mb(proc.pid)
    except BaseException:
        proc.stop()
        raise
    return RunningServer(
        name,
        proc,
        address,
        ready_log_ms=(stamps["log"] - t0) * 1000,
        ready_rpc_ms=(ready_at - t0) * 1000,
        rss_idle_mb=rss,
    )


def agent_spawner(
    repo: Path, state: Path, config_dir: Path, intra_op_threads: int = 0
) -> Callable[[str], ServerProc]:
    def spawn(address: str) -> ServerProc:
        config = write_toml(
            config_dir / f"agent-{address.rpartition(':')[2]}.toml",
            {
                "server": {"address": address},
                "repository": {"path": str(repo)},
                "state": {"dir": str(state)},
                # The bench builds its models unsigned; signing is measured elsewhere.
                "signing": {"allow_unsigned_models": True},
                "runtime": {"intra_op_threads": intra_op_threads},
                "telemetry": {"prometheus_address": ""},
            },
        )
        return AgentProcess(config)

    return spawn


def echo_spawner(outputs_json: Path, off_loop: bool = False) -> Callable[[str], ServerProc]:
    def spawn(address: str) -> ServerProc:
        return EchoProcess(address, outputs_json, off_loop)

    return spawn


# --------------------------------------------------------------------------------------------
# Load generator: client worker processes
# --------------------------------------------------------------------------------------------


class ClientPool:
    """N client worker processes (this file with --client-worker), JSON lines on stdio."""

    def __init__(self, count: int, client: str) -> None:
        import psutil

        self.procs = [
            subprocess.Popen(
                [PYTHON, str(Path(__file__).resolve()), "--client-worker", "--client", client],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def run(self, shares: Sequence[int], command: dict[str, Any]) -> list[dict[str, Any]]:
        used = [(p, c) for p, c in zip(self.procs, shares, strict=False) if c > 0]
        for p, c in used:
            assert p.stdin is not None
            p.stdin.write(json.dumps({**command, "concurrency": c}) + "\n")
            p.stdin.flush()
        results = []
        for p, _ in used:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"client worker {p.pid} exited ({p.poll()})")
            results.append(json.loads(line))
        return results

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                assert p.stdin is not None
                try:
                    p.stdin.close()
                    p.wait(10)
                except (subprocess.TimeoutExpired, BrokenPipeError):
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(10)


def client_worker_main(client: str) -> None:
    """Runs in a client process: one JSON command per stdin line, one JSON result back."""
    channels: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    for line in sys.stdin:
        command = json.loads(line)
        runner = _run_tritonclient if client == "tritonclient" else _run_raw_grpc
        result = loop.run_until_complete(runner(command, channels))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    for ch in channels.values():
        loop.run_until_complete(ch.close())
    loop.close()


@dataclass
class _LoopState:
    left: int
    errors: int = 0
    first_error: str = ""

    def fail(self, why: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or why[:300]


async def _load_loop(
    call: Callable[[], Any],
    check: Callable[[Any], str],
    concurrency: int,
    duration: float,
    max_count: int,
    starts: list[int] | None = None,
) -> tuple[list[int], int, str, float]:
    """``concurrency`` coroutines call back to back until ``duration`` or ``max_count``;
    ``starts`` gets each request's start (ns after the first), beside its latency."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    latencies: list[int] = []
    state = _LoopState(left=max_count)
    perf_ns = time.perf_counter_ns
    origin = perf_ns()

    async def one() -> None:
        while state.left > 0 and loop.time() < end:
            state.left -= 1
            t0 = perf_ns()
            try:
                response = await call()
            except Exception as exc:
                state.fail(repr(exc))
                await asyncio.sleep(0.001)
                continue
            latencies.append(perf_ns() - t0)
            if starts is not None:
                starts.append(t0 - origin)
            problem = check(response)
            if problem:
                state.fail(problem)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return latencies, state.errors, state.first_error, elapsed


def _input_arrays(command: dict[str, Any]) -> list[tuple[str, str, list[int], bytes]]:
    import numpy as np

    rng = np.random.RandomState(1234)
    out = []
    for name, datatype, dims in command["inputs"]:
        shape = [command["batch"], *dims]
        out.append((name, datatype, shape, rng.standard_normal(shape).astype(np.float32).tobytes()))
    return out


async def _run_raw_grpc(command: dict[str, Any], channels: dict[str, Any]) -> dict[str, Any]:
    import grpc
    from tritonclient.grpc import service_pb2

    address = command["address"]
    channel = channels.get(address)
    if channel is None:
        channel = channels[address] = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 80 * 1024 * 1024),
                ("grpc.max_send_message_length", 80 * 1024 * 1024),
            ],
        )
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,  # the request is serialised once, below
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    request = service_pb2.ModelInferRequest(model_name=command["model"])
    for name, datatype, shape, raw in _input_arrays(command):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    payload = request.SerializeToString()
    expected = [n for _name, n in command["output_bytes"]]

    def check(response: Any) -> str:
        sizes = [len(r) for r in response.raw_output_contents]
        return "" if sizes == expected else f"output sizes {sizes} != {expected}"

    def call() -> Any:
        return infer(payload)

    return await _measure(call, check, command)


async def _run_tritonclient(command: dict[str, Any], channels: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc.aio as aioclient

    address = command["address"]
    client = channels.get(address)
    if client is None:
        client = channels[address] = aioclient.InferenceServerClient(address)
    inputs = []
    for name, datatype, shape, raw in _input_arrays(command):
        tensor = aioclient.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(shape))
        inputs.append(tensor)
    expected = [n for _name, n in command["output_bytes"]]
    names = [name for name, _n in command["output_bytes"]]

    def check(result: Any) -> str:
        sizes = [result.as_numpy(n).nbytes for n in names]
        return "" if sizes == expected else f"output sizes {sizes} != {expected}"

    def call() -> Any:
        return client.infer(command["model"], inputs)

    return await _measure(call, check, command)


async def _measure(
    call: Callable[[], Any], check: Callable[[Any], str], command: dict[str, Any]
) -> dict[str, Any]:
    c = command["concurrency"]
    await _load_loop(call, check, c, command["warmup"], int(command["warmup"] * MAX_REQUESTS_PER_S))
    cpu0 = time.process_time()
    starts: list[int] | None = [] if command.get("timeline") else None
    start_wall = time.time()
    lat, errors, first_error, elapsed = await _load_loop(
        call, check, c, command["duration"], int(command["duration"] * MAX_REQUESTS_PER_S),
        starts,
    )
    cpu = time.process_time() - cpu0
    return {
        "start_wall": start_wall,
        "starts_ns": starts or [],
        "latencies_ns": lat,
        "errors": errors,
        "first_error": first_error,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
    }


@contextmanager
def sample_rss(pid: int, interval: float = 0.1) -> Iterator[list[float]]:
    """Samples a process's RSS (MB) in the background while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def body() -> None:
        while not stop.wait(interval):
            try:
                samples.append(_rss_mb(pid))
            except Exception:
                return

    t = threading.Thread(target=body, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(5)


def bench_server_cell(
    server: RunningServer,
    model: BenchModel,
    concurrency: int,
    pool: ClientPool,
    opts: Options,
) -> Cell:
    import psutil

    if concurrency >= BATCHED_CONCURRENCY and len(pool.procs) > 1:
        n = len(pool.procs)
        shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
    else:
        shares = [concurrency]
    output_bytes = [
        (name, _ITEM_SIZES[dt] * _product(dims)) for name, dt, dims in model.outputs
    ]
    command = {
        "address": server.address,
        "model": model.name,
        "inputs": model.inputs,
        "batch": 1,
        "output_bytes": output_bytes,
        "duration": opts.duration,
        "warmup": opts.warmup,
    }
    sproc = psutil.Process(server.proc.pid)
    with sample_rss(server.proc.pid) as rss:
        cpu0 = _cpu_seconds(sproc)
        t0 = time.perf_counter()
        results = pool.run(shares, command)
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds(sproc) - cpu0
    lat = [x for r in results for x in r["latencies_ns"]]
    p50, p99 = percentiles(lat)
    elapsed = max(r["elapsed_s"] for r in results)
    return Cell(
        model=model.name,
        concurrency=concurrency,
        server=server.name,
        requests=len(lat),
        errors=sum(r["errors"] for r in results),
        first_error=next((r["first_error"] for r in results if r["first_error"]), ""),
        elapsed_s=elapsed,
        p50_us=p50,
        p99_us=p99,
        server_cpu_pct=100.0 * cpu / wall,  # over warm-up + measurement
        client_cpu_pct=100.0 * sum(r["cpu_s"] for r in results) / elapsed,
        rss_idle_mb=server.rss_idle_mb,
        rss_load_mb=max(rss) if rss else None,
        ready_log_ms=server.ready_log_ms,
        ready_rpc_ms=server.ready_rpc_ms,
        latencies_ns=lat,
    )


def _product(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    warmup: float
    settle: float
    models: list[str]
    concurrency: list[int]
    client: str
    client_procs: int
    startup_runs: int
    rounds: int = 1
    instances: int = 0
    intra_op_threads: int = 0
    swap_duration: float = 6.0


SERVER_ORDER = ["raw", "raw-1t", "raw-b16", "echo", "echo+hop", "agent", "agent+db"]


@dataclass
class StartupSample:
    ready_log_ms: float
    ready_rpc_ms: float
    rss_idle_mb: float


def measure_example_startup(tmp: Path, runs: int, settle: float) -> list[StartupSample]:
    """Target (e): the agent on the example repository models/, as shipped."""
    samples = []
    for i in range(runs):
        state = tmp / f"example-state-{i}"
        state.mkdir()
        server = start_server(
            "agent(examples)", agent_spawner(EXAMPLE_MODELS, state, tmp), settle
        )
        server.proc.stop()
        samples.append(
            StartupSample(server.ready_log_ms, server.ready_rpc_ms, server.rss_idle_mb)
        )
    return samples


@dataclass
class SwapResult:
    """Target (h): tiny c4 on the plain agent while version 2 replaces version 1."""

    steady_p99_us: float
    window_p99_us: float
    window_requests: int
    steady_requests: int
    window_s: float
    errors: int
    first_error: str


def bench_hot_swap(
    server: RunningServer, model: BenchModel, repo: Path, pool: ClientPool, opts: Options
) -> SwapResult | None:
    """Load, then SIGHUP with a new version on disk; the window runs from the signal to
    a quarter second after the old version was retired (it drains and is freed then)."""
    if opts.swap_duration <= 0:
        return None
    new = repo / model.name / "2"
    new.mkdir()
    shutil.copyfile(repo / model.name / "1" / "model.onnx", new / "model.onnx")
    output_bytes = [(n, _ITEM_SIZES[dt] * _product(dims)) for n, dt, dims in model.outputs]
    command = {
        "address": server.address,
        "model": model.name,
        "inputs": model.inputs,
        "batch": 1,
        "output_bytes": output_bytes,
        "duration": opts.swap_duration,
        "warmup": opts.warmup,
        "timeline": True,
    }
    marks: dict[str, float] = {}
    proc = server.proc

    def trigger() -> None:
        time.sleep(opts.warmup + opts.swap_duration / 3)
        seen = len(proc.events)
        marks["hup"] = time.time()
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + opts.swap_duration
        while time.monotonic() < deadline:
            if any(
                e.get("msg") == "model version retired" and e.get("model") == model.name
                for e in proc.events[seen:]
            ):
                marks["retired"] = time.time()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=trigger, daemon=True)
    thread.start()
    results = pool.run([4], command)
    thread.join(opts.warmup + 2 * opts.swap_duration + 10)
    if "hup" not in marks:
        return None
    start = marks["hup"]
    end = marks.get("retired", start + opts.swap_duration) + 0.25
    window: list[int] = []
    steady: list[int] = []
    for r in results:
        for began, lat in zip(r["starts_ns"], r["latencies_ns"], strict=True):
            t0 = r["start_wall"] + began / 1e9
            (window if t0 + lat / 1e9 >= start and t0 <= end else steady).append(lat)
    return SwapResult(
        steady_p99_us=percentiles(steady)[1],
        window_p99_us=percentiles(window)[1],
        window_requests=len(window),
        steady_requests=len(steady),
        window_s=end - start,
        errors=sum(r["errors"] for r in results),
        first_error=next((r["first_error"] for r in results if r["first_error"]), ""),
    )


BASELINE_IMPORTS = "import sys, numpy, onnxruntime"


def baseline_rss_mb(settle: float) -> float:
    """Target (g)'s base: idle RSS of a Python that imported numpy and onnxruntime only."""
    proc = subprocess.Popen(
        [PYTHON, "-c", f"{BASELINE_IMPORTS}; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        time.sleep(settle)
        return _rss_mb(proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run(opts: Options) -> dict[str, Any]:
    load_before = os.getloadavg()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    cells: dict[tuple[str, int, str], Cell] = {}
    swap: SwapResult | None = None

    def add(cell: Cell) -> None:
        cell.load1 = os.getloadavg()[0]
        _progress(cell)
        key = (cell.model, cell.concurrency, cell.server)
        cells[key] = cell if key not in cells else cells[key].merged(cell)

    try:
        models = build_models(opts.models)
        for m in models:
            m.instances = opts.instances
        repo_plain = write_repository(tmp / "repo-plain", models, batching=False)
        repo_batch = write_repository(tmp / "repo-batch", models, batching=True)
        outputs_json = tmp / "echo-outputs.json"
        outputs_json.write_text(json.dumps({m.name: m.outputs for m in models}))
        (tmp / "state-plain").mkdir()
        (tmp / "state-batch").mkdir()

        # Servers start one at a time (start-to-ready and idle RSS are measured
        # alone), then stay up together so that every cell of one (model,
        # concurrency) is measured back to back: background load drifts, and
        # the comparison is what matters. Idle servers cost no CPU.
        spawners: list[tuple[str, Callable[[str], ServerProc]]] = [
            ("echo", echo_spawner(outputs_json)),
            ("echo+hop", echo_spawner(outputs_json, off_loop=True)),
            (
                "agent",
                agent_spawner(repo_plain, tmp / "state-plain", tmp, opts.intra_op_threads),
            ),
            (
                "agent+db",
                agent_spawner(repo_batch, tmp / "state-batch", tmp, opts.intra_op_threads),
            ),
        ]
        servers: list[RunningServer] = []
        pool = ClientPool(max(1, opts.client_procs), opts.client)
        try:
            for name, spawn in spawners:
                servers.append(start_server(name, spawn, opts.settle))
            for _round in range(opts.rounds):
                for m in models:
                    for c in opts.concurrency:
                        # raw onnxruntime in this process, then the servers.
                        add(bench_raw(m, "raw", 0, 1, c, opts))
                        add(bench_raw(m, "raw-1t", 1, 1, c, opts))
                        if c == opts.concurrency[0]:
                            add(bench_raw(m, "raw-b16", 0, 16, 1, opts))
                        for server in servers:
                            add(bench_server_cell(server, m, c, pool, opts))
            tiny = next((m for m in models if m.name == "tiny"), None)
            plain = next((s for s in servers if s.name == "agent"), None)
            if tiny is not None and plain is not None:
                swap = bench_hot_swap(plain, tiny, repo_plain, pool, opts)
        finally:
            for server in servers:
                server.proc.stop()
            pool.close()

        # 3. start-up and idle memory with the example models (target e).
        startup = measure_example_startup(tmp, opts.startup_runs, opts.settle)
        base_rss = baseline_rss_mb(opts.settle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "cells": list(cells.values()),
        "startup": startup,
        "swap": swap,
        "base_rss_mb": base_rss,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "started": started,
        "wall_s": time.time() - started,
        "models": {m.name: m for m in models},
    }


def _progress(cell: Cell) -> None:
    print(
        f"  .. {cell.model:<5} c={cell.concurrency:<3} {cell.server:<9}"
        f" {cell.infer_per_s:9.0f}/s p50 {cell.p50_us:8.0f}us",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".0f") -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return format(v, spec)


def print_table(cells: Sequence[Cell]) -> None:
    header = (
        f"{'model':<5} {'conc':>4} {'server':<9} {'infer/s':>8} {'samples/s':>9} "
        f"{'p50 us':>8} {'p99 us':>8} {'srv cpu%':>8} {'cli cpu%':>8} "
        f"{'RSS idle':>8} {'RSS load':>8} {'ready ms log/rpc':>16} {'errors':>6} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    order = {name: i for i, name in enumerate(SERVER_ORDER)}
    models = list(dict.fromkeys(c.model for c in cells))
    rows = sorted(
        cells, key=lambda c: (models.index(c.model), c.concurrency, order.get(c.server, 99))
    )
    previous: tuple[str, int] | None = None
    for c in rows:
        if previous is not None and previous != (c.model, c.concurrency):
            print()
        previous = (c.model, c.concurrency)
        ready = (
            f"{c.ready_log_ms:.0f}/{c.ready_rpc_ms:.0f}"
            if c.ready_log_ms is not None and c.ready_rpc_ms is not None
            else "-"
        )
        print(
            f"{c.model:<5} {c.concurrency:>4} {c.server:<9} {c.infer_per_s:>8.0f} "
            f"{c.samples_per_s:>9.0f} {_fmt(c.p50_us):>8} {_fmt(c.p99_us):>8} "
            f"{_fmt(c.server_cpu_pct):>8} {_fmt(c.client_cpu_pct):>8} "
            f"{_fmt(c.rss_idle_mb, '.1f'):>8} {_fmt(c.rss_load_mb, '.1f'):>8} {ready:>16} "
            f"{c.errors:>6} {_fmt(c.load1, '.1f'):>5}"
        )


@dataclass
class Check:
    target: str
    description: str
    value: float | None
    limit: float
    passed: bool | None  # None: not measured in this run
    detail: str = ""
    floor: bool = False  # what the target's limit is next to, not a target itself
    op: str = "<="


def _find(cells: Sequence[Cell], model: str, server: str, c: int) -> Cell | None:
    for cell in cells:
        if (cell.model, cell.server, cell.concurrency) == (model, server, c):
            return cell
    return None


def compute_checks(
    cells: Sequence[Cell],
    startup: Sequence[StartupSample],
    swap: SwapResult | None = None,
    base_rss_mb: float | None = None,
) -> list[Check]:
    """Issue 22's targets, each with the row it is read from and, where one is
    measured, the floor beside it (what this machine allows any Python server)."""
    checks: list[Check] = []

    def add(target: str, desc: str, value: float | None, op: str, limit: float,
            detail: str = "", floor: bool = False) -> None:
        if value is None:
            checks.append(Check(target, desc, None, limit, None, "not measured", floor, op))
            return
        passed = None if floor else (value <= limit if op == "<=" else value >= limit)
        checks.append(Check(target, desc, value, limit, passed, detail, floor, op))

    def overhead(server: str) -> tuple[float | None, str]:
        raw, echo = _find(cells, "tiny", "raw", 1), _find(cells, "tiny", "echo", 1)
        cell = _find(cells, "tiny", server, 1)
        if not (raw and echo and cell):
            return None, ""
        ratio = (cell.p50_us - raw.p50_us) / max(1e-9, echo.p50_us - raw.p50_us)
        return ratio, (f"({cell.p50_us:.0f} - {raw.p50_us:.0f}) / ({echo.p50_us:.0f} - "
                       f"{raw.p50_us:.0f}) us")

    # (a) tiny c1: the agent's p50 overhead over raw onnxruntime vs the echo server's.
    for server in ("agent", "agent+db"):
        value, detail = overhead(server)
        add("a", f"tiny c1: {server} p50 overhead over raw / echo's", value, "<=", 1.10, detail)
    value, detail = overhead("echo+hop")
    add("a", "floor: echo+hop (echo + a thread hop) / echo's", value, "<=", 1.10, detail, True)

    # (b) tiny c16 throughput vs echo's.
    echo16 = _find(cells, "tiny", "echo", 16)
    for server in ("agent", "agent+db"):
        cell = _find(cells, "tiny", server, 16)
        value = cell.infer_per_s / max(1e-9, echo16.infer_per_s) if cell and echo16 else None
        detail = f"{cell.infer_per_s:.0f} / {echo16.infer_per_s:.0f}" if cell and echo16 else ""
        add("b", f"tiny c16: {server} infer/s / echo's", value, ">=", 1.0, detail)

    # (c) conv c4 / c16 on default settings vs raw onnxruntime's best (batch 1).
    raw_conv = [
        c for c in cells if c.model == "conv" and c.server in ("raw", "raw-1t") and c.batch == 1
    ]
    best = max(raw_conv, key=lambda c: c.samples_per_s, default=None)
    for server in ("agent", "agent+db"):
        for conc in (4, 16):
            cell = _find(cells, "conv", server, conc)
            value = cell.samples_per_s / max(1e-9, best.samples_per_s) if cell and best else None
            detail = (f"{cell.samples_per_s:.0f} / {best.samples_per_s:.0f} ({best.server} "
                      f"c{best.concurrency})" if cell and best else "")
            add("c", f"conv c{conc}: {server} (defaults) / raw best", value, ">=", 0.9, detail)
    # The cores also carry the gRPC server's and the client's CPU per request.
    echo_conv = _find(cells, "conv", "echo", 16)
    if best and echo_conv and best.server_cpu_pct and echo_conv.server_cpu_pct:
        raw_core_s = best.server_cpu_pct / 100 / best.samples_per_s
        grpc_core_s = (
            echo_conv.server_cpu_pct + (echo_conv.client_cpu_pct or 0.0)
        ) / 100 / echo_conv.infer_per_s
        cores = os.cpu_count() or 1
        ceiling = cores / (raw_core_s + grpc_core_s)
        add("c", "floor: CPU ceiling (raw + echo's gRPC CPU) / raw best",
            ceiling / best.samples_per_s, ">=", 0.9,
            f"{cores} cores / ({raw_core_s * 1e3:.2f} + {grpc_core_s * 1e3:.2f} ms) "
            f"= {ceiling:.0f}/s", True)

    # (d) mlp c16 with batching vs raw one request at a time on one thread.
    single = _find(cells, "mlp", "raw-1t", 1)
    cell = _find(cells, "mlp", "agent+db", 16)
    add("d", "mlp c16: agent+db samples/s / raw-1t c1",
        cell.samples_per_s / max(1e-9, single.samples_per_s) if cell and single else None,
        ">=", 2.5, f"{cell.samples_per_s:.0f} / {single.samples_per_s:.0f}"
        if cell and single else "")
    b16 = _find(cells, "mlp", "raw-b16", 1)
    add("d", "floor: raw-b16 samples/s / raw-1t c1 (batching in-process)",
        b16.samples_per_s / max(1e-9, single.samples_per_s) if b16 and single else None,
        ">=", 2.5, f"{b16.samples_per_s:.0f} / {single.samples_per_s:.0f}"
        if b16 and single else "", True)

    # (e) dynamic batching never slower at c1 (p50; 5% for the shared machine's noise).
    for name in dict.fromkeys(c.model for c in cells):
        plain, batched = _find(cells, name, "agent", 1), _find(cells, name, "agent+db", 1)
        add("e", f"{name} c1: agent+db p50 / agent p50",
            batched.p50_us / max(1e-9, plain.p50_us) if plain and batched else None,
            "<=", 1.05, f"{batched.p50_us:.0f} / {plain.p50_us:.0f} us"
            if plain and batched else "")

    # (f) start to READY with the example models; (g) idle RSS over numpy + onnxruntime.
    hop_cell = next((c for c in cells if c.server == "echo+hop"), None)
    if startup:
        ready = statistics.median(max(s.ready_log_ms, s.ready_rpc_ms) for s in startup)
        add("f", "examples: spawn -> ServerReady true (median ms)", ready, "<=", 600.0,
            f"runs: {', '.join(f'{max(s.ready_log_ms, s.ready_rpc_ms):.0f}' for s in startup)}")
        if hop_cell and hop_cell.ready_rpc_ms is not None:
            add("f", "floor: echo+hop (Python, grpc, numpy, onnxruntime) ready ms",
                hop_cell.ready_rpc_ms, "<=", 600.0, "", True)
        rss = statistics.median(s.rss_idle_mb for s in startup)
        add("g", "examples: agent idle RSS - numpy+onnxruntime process (MB)",
            rss - base_rss_mb if base_rss_mb is not None else None, "<=", 12.0,
            f"{rss:.1f} - {base_rss_mb:.1f} MB" if base_rss_mb is not None else "")
        if hop_cell and hop_cell.rss_idle_mb is not None and base_rss_mb is not None:
            add("g", "floor: echo+hop idle RSS - numpy+onnxruntime (grpc, protos)",
                hop_cell.rss_idle_mb - base_rss_mb, "<=", 12.0,
                f"{hop_cell.rss_idle_mb:.1f} - {base_rss_mb:.1f} MB", True)
    else:
        add("f", "examples: spawn -> ServerReady true (median ms)", None, "<=", 600.0)
        add("g", "examples: agent idle RSS - numpy+onnxruntime process (MB)", None, "<=", 12.0)

    # (h) hot swap: p99 in the swap window vs steady state, and no failed request.
    if swap is not None:
        add("h", "hot swap tiny c4: p99 in the window / steady p99",
            swap.window_p99_us / max(1e-9, swap.steady_p99_us), "<=", 1.5,
            f"{swap.window_p99_us:.0f} / {swap.steady_p99_us:.0f} us; window "
            f"{swap.window_s * 1000:.0f} ms, {swap.window_requests} requests")
        add("h", "hot swap tiny c4: failed requests", float(swap.errors), "<=", 0.0,
            swap.first_error[:80])
    else:
        add("h", "hot swap tiny c4: p99 in the window / steady p99", None, "<=", 1.5)
    return checks


def print_checks(checks: Sequence[Check]) -> None:
    print("\nTargets (issue 22; ratios within this run; floor rows: what this machine allows):")
    for ch in checks:
        verdict = "floor" if ch.floor else "n/a" if ch.passed is None else (
            "PASS" if ch.passed else "MISS"
        )
        value = "-" if ch.value is None else f"{ch.value:.3f}"
        print(
            f"  ({ch.target}) {ch.description:<60} {value:>9} {ch.op} {ch.limit:<6g} "
            f"{verdict:<5}  {ch.detail}"
        )


def report(result: dict[str, Any], opts: Options) -> dict[str, Any]:
    cells: list[Cell] = result["cells"]
    startup: list[StartupSample] = result["startup"]
    lb, la = result["load_before"], result["load_after"]
    print()
    print(
        f"edge-agent serving benchmark: {platform.node()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {opts.rounds} round(s) of {opts.duration:g}s/cell "
        f"after {opts.warmup:g}s warm-up; client {opts.client} grpc.aio, "
        f"{opts.client_procs} client process(es) for c>={BATCHED_CONCURRENCY}"
    )
    print(
        f"load average before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after "
        f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; wall {result['wall_s']:.0f}s"
    )
    for m in result["models"].values():
        extra = (
            f"; agent+db: preferred_batch_size [{m.preferred_batch_size}], "
            f"max_queue_delay_microseconds {m.max_queue_delay_us}"
        )
        print(f"  {m.name}: {m.description}, max_batch_size {m.max_batch_size}{extra}")
    print(
        "RSS in MB (idle: after start-up, before load; load: peak while measured); "
        "cpu% of one core; ready: spawn -> serving log line / first ServerReady true; "
        "load: 1-min load average when measured\n"
    )
    print_table(cells)
    if startup:
        print(
            "\nagent on the example models (models/): ready ms log/rpc "
            + ", ".join(f"{s.ready_log_ms:.0f}/{s.ready_rpc_ms:.0f}" for s in startup)
            + "; idle RSS MB "
            + ", ".join(f"{s.rss_idle_mb:.1f}" for s in startup)
        )
    checks = compute_checks(cells, startup, result.get("swap"), result.get("base_rss_mb"))
    print_checks(checks)
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"\nWARNING: {errors} failed requests; first: "
              f"{next(c.first_error for c in cells if c.first_error)}")
    return {
        "options": asdict(opts),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": lb,
        "load_after": la,
        "wall_s": result["wall_s"],
        "cells": [
            {
                **{k: v for k, v in asdict(c).items() if k != "latencies_ns"},
                "infer_per_s": c.infer_per_s,
                "samples_per_s": c.samples_per_s,
            }
            for c in cells
        ],
        "startup_examples": [asdict(s) for s in startup],
        "swap": asdict(result["swap"]) if result.get("swap") else None,
        "base_rss_mb": result.get("base_rss_mb"),
        "checks": [asdict(c) for c in checks],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serving benchmark: raw onnxruntime, a grpc.aio echo floor and the agent."
    )
    parser.add_argument("--quick", action="store_true", help="short cells (smoke run)")
    parser.add_argument("--duration", type=float, help="seconds measured per cell (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per cell (default 1)")
    parser.add_argument(
        "--models", default="tiny,conv,mlp", help="comma-separated subset of tiny,conv,mlp"
    )
    parser.add_argument("--concurrency", default="1,4,16", help="client concurrencies")
    parser.add_argument("--client", choices=["raw", "tritonclient"], default="raw")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help=f"client processes for concurrency >= {BATCHED_CONCURRENCY} (default 1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every cell this often, pooled (default 1)"
    )
    parser.add_argument("--startup-runs", type=int, help="agent starts on models/ (default 3)")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="instance_group count of the bench models (0, default: none, the agent decides)",
    )
    parser.add_argument(
        "--swap-duration",
        type=float,
        help="seconds of tiny c4 load around a hot swap (default 6; --quick 2; 0: skip)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="the agents' runtime.intra_op_threads (0: onnxruntime decides)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_worker:
        client_worker_main(args.client)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_BUILDERS]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    opts = Options(
        duration=args.duration or (0.5 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if args.quick else 1.0),
        settle=0.3 if args.quick else 1.0,
        models=models,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        client=args.client,
        client_procs=args.client_procs,
        startup_runs=args.startup_runs or (1 if args.quick else 3),
        rounds=max(1, args.rounds),
        instances=args.instances,
        intra_op_threads=args.intra_op_threads,
        swap_duration=(
            args.swap_duration if args.swap_duration is not None else (2.0 if args.quick else 6.0)
        ),
    )
    result = run(opts)
    summary = report(result, opts)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
