"""The Python gRPC floor for the serving benchmark: a minimal grpc.aio server.

It speaks the same protocol as the agent, with the agent's own generated
protobuf modules (``agent.wire``), but runs no model: ModelInfer answers with
output tensors named, typed and shaped like the model's outputs (batch
dimension taken from the first input), filled with zero bytes of exactly the
size the model would return. What is left is the cost of grpc.aio, protobuf
parsing and response construction: no server can do less per request in
Python.

``--off-loop`` gives the floor of a Python server that runs its models the way
the agent must: it imports numpy and onnxruntime (what any server using
onnxruntime's Python API carries in memory) and builds each answer on a worker
thread, not on the event loop (one hop there and back per request, what
keeping blocking inference off the loop costs at least). It runs no model
either.

Usage (started by bench_serving.py, one process per run)::

    python tests/bench/echo_server.py --address 127.0.0.1:PORT --outputs outputs.json [--off-loop]

``outputs.json`` maps model name to ``[[name, datatype, [dims without batch]], ...]``.
Like the agent, it logs one JSON line ``{"msg": "serving", "addresses": [...]}``
to stderr once it accepts requests, and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from agent.wire import grpc_service_pb2 as pb
from agent.wire import grpc_service_pb2_grpc as pb_grpc

_ITEM_SIZES = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}

Outputs = list[tuple[str, str, list[int]]]


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, Outputs], off_loop: bool = False) -> None:
        self._models = models
        self._worker = ThreadPoolExecutor(1, "echo-worker") if off_loop else None
        # (model, batch) -> (output tensor metadata, raw contents): built once.
        self._cache: dict[tuple[str, int], tuple[list[Any], list[bytes]]] = {}

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._models)

    def _outputs(self, model: str, batch: int) -> tuple[list[Any], list[bytes]]:
        key = (model, batch)
        cached = self._cache.get(key)
        if cached is None:
            tensors = []
            raws = []
            for name, datatype, dims in self._models[model]:
                shape = [batch, *dims]
                count = 1
                for d in shape:
                    count *= d
                tensors.append(
                    pb.ModelInferResponse.InferOutputTensor(
                        name=name, datatype=datatype, shape=shape
                    )
                )
                raws.append(bytes(count * _ITEM_SIZES[datatype]))
            cached = self._cache[key] = (tensors, raws)
        return cached

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        if request.model_name not in self._models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        if self._worker is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._worker, self._answer, request)
        return self._answer(request)

    def _answer(self, request: Any) -> pb.ModelInferResponse:
        inputs = request.inputs
        batch = inputs[0].shape[0] if inputs and inputs[0].shape else 1
        tensors, raws = self._outputs(request.model_name, batch)
        response = pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=request.model_version or "1",
            id=request.id,
            outputs=tensors,
        )
        response.raw_output_contents.extend(raws)
        return response


async def serve(address: str, models: dict[str, Outputs], off_loop: bool) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 80 * 1024 * 1024),
            ("grpc.max_send_message_length", 80 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = EchoServicer(models, off_loop)  # type: ignore[abstract]  # only the RPCs a client calls
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"echo_server: cannot listen on {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    bound = f"{address.rpartition(':')[0]}:{port}"
    print(
        json.dumps({"ts": time.time(), "msg": "serving", "addresses": [bound]}),
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--outputs", type=Path, required=True)
    parser.add_argument(
        "--off-loop",
        action="store_true",
        help="import numpy and onnxruntime, and answer on a worker thread",
    )
    args = parser.parse_args()
    if args.off_loop:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
    raw = json.loads(args.outputs.read_text())
    models = {m: [(n, d, list(dims)) for n, d, dims in outs] for m, outs in raw.items()}
    asyncio.run(serve(args.address, models, args.off_loop))


if __name__ == "__main__":
    main()
