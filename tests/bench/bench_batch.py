"""Benchmark: ``edge-agent batch`` throughput against a raw onnxruntime loop.

For each model (the example ``tabular_classifier``, a tiny MLP where file work
dominates, and a generated wider MLP, 256 -> 1024 -> 1024 -> 16, where the
model does) it writes a Parquet file of random rows, signs the model into a
temporary repository with the demo key, then times, best of ``--repeat``:

* raw: the whole input already in memory as one NumPy array, ``session.run``
  over it in slices of ``--batch-size`` rows (same threads, same graph
  optimisation), nothing written;
* batch: the batch runner end to end (verify the model, read Parquet, convert,
  score, write parts durably, write the Parquet output).

Prints one table: rows/s, the ratio batch / raw, and the CPU seconds each used
(all threads of the process; less disturbed by other load than wall time). Usage::

    .venv/bin/python tests/bench/bench_batch.py [--rows 200000] [--batch-size 4096]
        [--threads 1,2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from agent.app import read_config  # noqa: E402
from agent.batch.runner import BatchOptions, run  # noqa: E402
from agent.signing.keys import load_private_key  # noqa: E402
from agent.signing.version_dir import sign_version  # noqa: E402

MODELS = REPO_ROOT / "models"


def wide_mlp(width_in: int = 256, hidden: int = 1024, out: int = 16) -> bytes:
    rng = np.random.default_rng(5)
    dims = [width_in, hidden, hidden, out]
    nodes, inits = [], []
    prev = "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = np.zeros(dims[i + 1], np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["scores"]))
    graph = helper.make_graph(
        nodes, "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _repo(root: Path) -> Path:
    repo = root / "models"
    shutil.copytree(MODELS / "tabular_classifier", repo / "tabular_classifier")
    version = repo / "wide_mlp" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(wide_mlp())
    key = load_private_key(MODELS / "keys" / "demo-model-signing.key.pem")
    sign_version(version, key)
    return repo


def _data(path: Path, rows: int, width: int, name: str) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)
    pq.write_table(pa.table({name: column}), path, row_group_size=65536)
    return x


def _raw(
    model: Path, name: str, x: np.ndarray, batch: int, threads: int
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the loop."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    sess.run(None, {name: x[:batch]})
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, len(x), batch):
        sess.run(None, {name: x[lo : lo + batch]})
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--wide-rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        repo = _repo(root)
        (root / "agent.toml").write_text(
            f'[repository]\npath = "{repo}"\n'
            f'[signing]\ntrust_dir = "{MODELS / "keys" / "trusted"}"\n'
        )
        config = read_config(root / "agent.toml")
        cases = [("tabular_classifier", 2, "features", 8, args.rows),
                 ("wide_mlp", 1, "x", 256, args.wide_rows)]
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; best of "
              f"{args.repeat}, raw and batch alternating")
        print(f"{'model':<20} {'rows':>8} {'batch':>6} {'threads':>7} {'raw rows/s':>12} "
              f"{'batch rows/s':>13} {'ratio':>6} {'raw cpu s':>10} {'batch cpu s':>12}")
        for name, version, tensor, width, rows in cases:
            src = root / f"{name}.parquet"
            x = _data(src, rows, width, tensor)
            model_file = repo / name / str(version) / "model.onnx"
            for t in threads:
                # Raw and batch runs alternate, so that load from other processes on the
                # machine hits both alike; the best of each is compared.
                raws, times, raw_cpus, cpus = [], [], [], []
                for i in range(args.repeat):
                    wall, cpu = _raw(model_file, tensor, x, args.batch_size, t)
                    raws.append(wall)
                    raw_cpus.append(cpu)
                    out = root / f"out-{name}-{t}-{i}.parquet"
                    start, cpu = time.perf_counter(), time.process_time()
                    result = run(BatchOptions(model=name, input=src, output=out,
                                              batch_size=args.batch_size, threads=t,
                                              progress="none"), config, io.StringIO())
                    times.append(time.perf_counter() - start)
                    cpus.append(time.process_time() - cpu)
                    assert result.rows_out == rows
                    out.unlink()
                raw = min(raws)
                best = min(times)
                print(f"{name:<20} {rows:>8} {args.batch_size:>6} {t:>7} {rows / raw:>12,.0f} "
                      f"{rows / best:>13,.0f} {raw / best:>6.2f} {min(raw_cpus):>10.2f} "
                      f"{min(cpus):>12.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
