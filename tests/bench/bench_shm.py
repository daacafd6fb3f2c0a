"""System shared memory vs plain gRPC, 4 MB input and output tensors, one local client.

Starts a real agent (server.shared_memory = "system") on a one-model repository
(``x`` FP32 [1, 1M] -> ``y`` = x + 1) and runs tritonclient's synchronous client
for a fixed time each way, then prints both throughputs and their ratio.

Run: .venv/bin/python -m tests.bench.bench_shm [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper, numpy_helper

from tests.agent_process import AgentProcess, write_toml
from tests.serving_models import make_repository, serving_config

ELEMENTS = 1 << 20  # FP32: 4 MiB
MAX_REQUESTS = 100_000  # bound on each loop besides its time


def _model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ELEMENTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ELEMENTS])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _rate(call: Any, seconds: float) -> tuple[float, int]:
    call()  # warm
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and count < MAX_REQUESTS:
        call()
        count += 1
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per path")
    args = parser.parse_args()
    x = np.random.default_rng(0).random((1, ELEMENTS), dtype=np.float32)
    nbytes = x.nbytes
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        repo = make_repository(tmp / "models", {"add_one": (_model(), None)})
        config = serving_config(tmp, repo, server={"shared_memory": "system"})
        with AgentProcess(write_toml(tmp / "agent.toml", config)) as agent:
            agent.wait_serving()
            client = grpcclient.InferenceServerClient(agent.address)
            key_in, key_out = f"/bench_shm_in_{os.getpid()}", f"/bench_shm_out_{os.getpid()}"
            h_in = shm.create_shared_memory_region("in", key_in, nbytes)
            h_out = shm.create_shared_memory_region("out", key_out, nbytes)
            try:
                plain_in = grpcclient.InferInput("x", [1, ELEMENTS], "FP32")
                plain_in.set_data_from_numpy(x)
                plain_out = grpcclient.InferRequestedOutput("y")

                def plain() -> None:
                    r = client.infer("add_one", [plain_in], outputs=[plain_out])
                    r.as_numpy("y")

                client.register_system_shared_memory("in", key_in, nbytes)
                client.register_system_shared_memory("out", key_out, nbytes)
                shm_in = grpcclient.InferInput("x", [1, ELEMENTS], "FP32")
                shm_in.set_shared_memory("in", nbytes)
                shm_out = grpcclient.InferRequestedOutput("y")
                shm_out.set_shared_memory("out", nbytes)

                def shared() -> None:
                    shm.set_shared_memory_region(h_in, [x])
                    client.infer("add_one", [shm_in], outputs=[shm_out])
                    shm.get_contents_as_numpy(h_out, np.float32, [1, ELEMENTS])

                shared()
                y = shm.get_contents_as_numpy(h_out, np.float32, [1, ELEMENTS])
                assert np.array_equal(y, x + 1), "shared memory output differs"
                plain_rate, n_plain = _rate(plain, args.seconds)
                shm_rate, n_shm = _rate(shared, args.seconds)
                client.unregister_system_shared_memory()
            finally:
                client.close()
                shm.destroy_shared_memory_region(h_in)
                shm.destroy_shared_memory_region(h_out)
    print(f"{'path':<28}{'req/s':>10}{'requests':>10}")
    print(f"{'plain gRPC (4 MiB in/out)':<28}{plain_rate:>10.1f}{n_plain:>10}")
    print(f"{'system shared memory':<28}{shm_rate:>10.1f}{n_shm:>10}")
    print(f"ratio shm / plain: {shm_rate / plain_rate:.2f}x (target >= 3.0x)")


if __name__ == "__main__":
    main()
