"""Fuzz ModelInfer and ModelStreamInfer against a real agent process (issue 17, campaign 1).

Requests are built with hypothesis from tritonclient's own ``service_pb2``
messages (never the agent's, so this process holds one protobuf pool) and sent
over a raw gRPC stub: random datatypes, shapes (0, negatives, 2**62, ...), byte
counts, ``raw_input_contents`` against typed ``contents``, parameters, model
names and versions, requested outputs, inputs repeated under one name.

Verdict, per case: the call ends before its deadline (no hang); it is answered
OK, or rejected INVALID_ARGUMENT with a non-empty message, or NOT_FOUND for a
model (version) that is not served; and right after it the agent is still
running and answers a good request (no crash).

    python tests/bench/fuzz_grpc.py --cases 10000 [--seed N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from tests.agent_process import AgentProcess, write_toml  # noqa: E402
from tests.serving_models import serving_config  # noqa: E402

CALL_DEADLINE_S = 10.0
# Served models of the example repository: (input name, datatype, dims without batch)
# per input, the output names, max_batch_size, served versions.
MODELS: dict[str, dict[str, Any]] = {
    "tabular_classifier": {
        "inputs": [("features", "FP32", [8])],
        "outputs": ["probabilities", "label"],
        "batch": 64,
        "versions": {"", "2"},
    },
    "text_features": {
        "inputs": [("tokens", "INT64", [4]), ("category", "BYTES", [1]),
                   ("weight", "FP64", [1])],
        "outputs": ["token_sum", "category_id", "weighted", "category_upper"],
        "batch": 32,
        "versions": {"", "1"},
    },
    "all_dtypes": {
        "inputs": [(f"in_{t.lower()}", t, [-1, -1]) for t in (
            "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
            "UINT64", "FP16", "FP32", "FP64")] + [("in_string", "BYTES", [-1, -1])],
        "outputs": [f"out_{t}" for t in ("bool", "int8", "int16", "int32", "int64", "uint8",
                                          "uint16", "uint32", "uint64", "fp16", "fp32",
                                          "fp64", "string")],
        "batch": 0,
        "versions": {"", "1"},
    },
}
DTYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
          "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32", "FLOAT", "INT128"]
SIZES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
         "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DIMS = st.one_of(
    st.integers(0, 5),
    st.sampled_from([0, -1, -2, 2**31, 2**32 + 1, 2**62, 2**63 - 1, INT64_MIN, 1 << 40]),
    st.integers(INT64_MIN, INT64_MAX),
)
PARAM = st.one_of(
    st.builds(lambda v: service_pb2.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: service_pb2.InferParameter(int64_param=v),
              st.integers(INT64_MIN, INT64_MAX)),
    st.builds(lambda v: service_pb2.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: service_pb2.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: service_pb2.InferParameter(string_param=v), st.text(max_size=20)),
)
PARAM_KEYS = st.one_of(
    st.sampled_from(["binary_data_size", "binary_data", "priority", "timeout", "sequence_id",
                     "sequence_start", "sequence_end", "classification", "shared_memory_region",
                     "shared_memory_byte_size", "shared_memory_offset"]),
    st.text(max_size=12),
)


def params() -> st.SearchStrategy[dict[str, Any]]:
    """Mostly none: a parameter is one more thing that can be wrong."""
    return st.one_of(st.just({}), st.just({}), st.just({}),
                     st.dictionaries(PARAM_KEYS, PARAM, max_size=2))


def _bytes_tensor(count: int, draw: Callable[[Any], Any]) -> bytes:
    """``count`` BYTES elements, each a 4-byte length then its bytes; sometimes a lie."""
    out = bytearray()
    for _ in range(count):
        item = draw(st.binary(max_size=8))
        length = len(item) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
        out += struct.pack("<I", length) + item
    return bytes(out)


@st.composite
def tensor(
    draw: Callable[[Any], Any], model: dict[str, Any] | None,
    spec: tuple[str, str, list[int]] | None = None,
) -> tuple[Any, bytes | None]:
    """One input tensor (mostly near a valid one: ``spec``, or one of the model's) and its
    raw bytes (None: sent in ``contents``)."""
    if spec is not None:
        name, dtype, dims = spec
    elif model is not None and draw(st.integers(0, 4)):
        name, dtype, dims = draw(st.sampled_from(model["inputs"]))
    else:
        name, dtype, dims = draw(st.text(max_size=10)), "FP32", [2]
    if not draw(st.integers(0, 5)):
        dtype = draw(st.sampled_from(DTYPES))
    if model is not None and model["batch"]:
        dims = [draw(st.integers(1, 3)), *dims]
    shape = [d if d >= 0 else draw(st.integers(0, 3)) for d in dims]
    mode = draw(st.integers(0, 9))
    if mode == 0:
        shape = draw(st.lists(DIMS, max_size=5))
    elif mode == 1 and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(DIMS)
    elements = 1
    for d in shape:
        elements *= d
    plausible = 0 <= elements <= 4096
    t = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=shape)
    for key, value in draw(params()).items():
        t.parameters[key].CopyFrom(value)
    count = elements if plausible else draw(st.integers(0, 6))
    if draw(st.integers(0, 7)):  # raw_input_contents
        if dtype == "BYTES":
            raw = _bytes_tensor(count, draw)
        else:
            raw = draw(st.binary(min_size=count * SIZES.get(dtype, 4),
                                 max_size=count * SIZES.get(dtype, 4)))
        fix = draw(st.integers(0, 11))
        if fix == 0:
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif fix == 1:
            raw += draw(st.binary(min_size=1, max_size=9))
        if draw(st.integers(0, 15)) == 0:  # both kinds at once
            t.contents.fp32_contents.extend([1.0] * max(0, min(count, 16)))
        return t, raw
    kind = draw(st.sampled_from(["bool_contents", "int_contents", "int64_contents",
                                 "uint_contents", "uint64_contents", "fp32_contents",
                                 "fp64_contents", "bytes_contents"]))
    n = min(max(0, count + draw(st.integers(-1, 1))), 4096)
    field = getattr(t.contents, kind)
    if kind == "bytes_contents":
        field.extend(draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n)))
    elif kind == "bool_contents":
        field.extend([True] * n)
    elif kind in ("fp32_contents", "fp64_contents"):
        field.extend([draw(st.floats(width=32))] * n)
    elif kind in ("uint_contents", "uint64_contents"):
        field.extend([draw(st.integers(0, 2**32 - 1))] * n)
    else:
        field.extend([draw(st.integers(-(2**31), 2**31 - 1))] * n)
    return t, None


@st.composite
def infer_request(draw: Callable[[Any], Any]) -> Any:
    bad_names = ["", "nope", "../all_dtypes", "all_dtypes/1", "ALL_DTYPES", "x" * 300,
                 "\u00e9t\u00e9", "all_dtypes\x00"]
    name = draw(st.sampled_from(sorted(MODELS) * 8 + bad_names))
    model: dict[str, Any] | None = MODELS.get(name)
    version = "" if draw(st.integers(0, 3)) else draw(st.sampled_from(
        ["1", "2", "0", "-1", "01", "abc", "99999999999999999999", " 1"]))
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version,
                                            id=draw(st.text(max_size=8)))
    for key, value in draw(params()).items():
        request.parameters[key].CopyFrom(value)
    if model is not None and draw(st.integers(0, 3)):  # every input, in a random order
        specs = draw(st.permutations(model["inputs"]))
        tensors = [draw(tensor(model, spec)) for spec in specs]
    else:
        tensors = draw(st.lists(tensor(model), max_size=4))
    if tensors and not draw(st.integers(0, 7)):  # one input twice, under the same name
        tensors.append(tensors[draw(st.integers(0, len(tensors) - 1))])
    use_raw = any(raw is not None for _, raw in tensors)
    for t, raw in tensors:
        request.inputs.append(t)
        if use_raw:
            request.raw_input_contents.append(raw if raw is not None else b"")
    if use_raw and draw(st.integers(0, 9)) == 0:  # one raw buffer too many or too few
        if draw(st.booleans()):
            request.raw_input_contents.append(b"\0" * 4)
        elif request.raw_input_contents:
            del request.raw_input_contents[-1]
    outputs = model["outputs"] if model is not None else ["y"]
    for _ in range(draw(st.integers(0, 3))):
        out = request.outputs.add(name=draw(st.sampled_from(outputs)) if draw(
            st.integers(0, 4)) else draw(st.text(max_size=8)))
        for key, value in draw(params()).items():
            out.parameters[key].CopyFrom(value)
    return request


def good_request() -> Any:
    request = service_pb2.ModelInferRequest(model_name="tabular_classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(struct.pack("<8f", *range(8)))
    return request


@dataclass
class Tally:
    cases: int = 0
    unary: Counter[str] = field(default_factory=Counter)
    stream: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    bad: list[str] = field(default_factory=list)  # verdict violations, described
    samples: dict[str, str] = field(default_factory=dict)  # a message per status

    def fail(self, what: str, request: Any) -> None:
        text = str(request)
        self.bad.append(f"{what}; request: {text[:600]}")


def served(request: Any) -> bool:
    model = MODELS.get(request.model_name)
    return model is not None and request.model_version in model["versions"]


def judge(code: grpc.StatusCode, message: str, request: Any, tally: Tally, where: str) -> None:
    if code == grpc.StatusCode.OK:
        return
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        tally.hangs += 1
        tally.fail(f"{where}: no answer within {CALL_DEADLINE_S}s", request)
    elif code == grpc.StatusCode.UNAVAILABLE:
        tally.crashes += 1
        tally.fail(f"{where}: UNAVAILABLE {message!r}", request)
    elif code == grpc.StatusCode.NOT_FOUND and served(request):
        tally.fail(f"{where}: NOT_FOUND for a served model: {message!r}", request)
    elif code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        tally.fail(f"{where}: {code.name} {message!r}", request)
    elif not message.strip():
        tally.fail(f"{where}: {code.name} with an empty message", request)


def run_case(stub: Any, agent: AgentProcess, request: Any, stream: list[Any] | None,
             tally: Tally) -> None:
    tally.cases += 1
    if stream is None:
        try:
            stub.ModelInfer(request, timeout=CALL_DEADLINE_S)
            code, message = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, message = exc.code(), exc.details() or ""
        tally.unary[code.name] += 1
        tally.samples.setdefault(code.name, message)
        judge(code, message, request, tally, "ModelInfer")
    else:
        answers = []
        try:
            answers = list(stub.ModelStreamInfer(iter(stream), timeout=CALL_DEADLINE_S))
            code, message = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, message = exc.code(), exc.details() or ""
        if code != grpc.StatusCode.OK:
            tally.stream[f"stream {code.name}"] += 1
            judge(code, message, stream[0], tally, "ModelStreamInfer")
        else:
            for answer in answers:
                tally.stream["error_message" if answer.error_message else "OK"] += 1
                if answer.error_message:
                    tally.samples.setdefault("stream error_message", answer.error_message)
            if len(answers) != len(stream):
                tally.fail(f"ModelStreamInfer: {len(answers)} answers to {len(stream)} "
                           "requests", stream[0])
    # The agent is still up and answers a good request.
    if agent.proc.poll() is not None:
        tally.crashes += 1
        tally.fail(f"agent exited with {agent.proc.returncode}", request)
        raise SystemExit("the agent crashed:\n" + "\n".join(agent.lines[-30:]))
    try:
        stub.ModelInfer(good_request(), timeout=CALL_DEADLINE_S)
    except grpc.RpcError as exc:
        tally.crashes += 1
        tally.fail(f"good request after the case: {exc.code().name} {exc.details()!r}",
                   request)


def start_agent(tmp: Path) -> AgentProcess:
    """An agent on a fresh copy of the example models (built by models/generate_examples.py,
    unsigned: this campaign is about the data plane, not about signatures)."""
    repository = tmp / "models"
    subprocess.run([sys.executable, str(REPO_ROOT / "models" / "generate_examples.py"),
                    str(repository)], check=True, capture_output=True, timeout=120)
    config = write_toml(tmp / "agent.toml", serving_config(tmp, repository))
    return AgentProcess(config).wait_serving(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--stream-share", type=float, default=0.25,
                        help="fraction of cases sent as a ModelStreamInfer stream")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-grpc-"))
    agent = start_agent(tmp)
    tally = Tally()
    started = time.monotonic()
    channel = grpc.insecure_channel(agent.address, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    every = max(1, int(1 / args.stream_share)) if args.stream_share > 0 else 0

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(requests=st.lists(infer_request(), min_size=1, max_size=3))
    def case(requests: list[Any]) -> None:
        as_stream = every and tally.cases % every == every - 1
        if as_stream:
            run_case(stub, agent, requests[0], requests, tally)
        else:
            run_case(stub, agent, requests[0], None, tally)

    try:
        case()
    finally:
        channel.close()
        code = agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    ok = tally.crashes == 0 and tally.hangs == 0 and not tally.bad
    print(f"fuzz_grpc: seed {args.seed}, {tally.cases} cases in {elapsed:.1f} s "
          f"(agent exit code {code})")
    print(f"{'call':<18}{'status':<22}{'count':>8}")
    for status, count in sorted(tally.unary.items()):
        print(f"{'ModelInfer':<18}{status:<22}{count:>8}")
    for status, count in sorted(tally.stream.items()):
        print(f"{'ModelStreamInfer':<18}{status:<22}{count:>8}")
    for status, message in sorted(tally.samples.items()):
        print(f"  e.g. {status}: {message[:150]}")
    print(f"crashes {tally.crashes}  hangs {tally.hangs}  bad rejections {len(tally.bad)}")
    for line in tally.bad[:10]:
        print("  FAIL", line)
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
