"""``edge-agent batch`` through the real command: signed models, real files, real signals.

Every run is a child process (``python -m agent.cli batch``), killed with real
SIGKILL / SIGINT where the test says so; outputs are compared byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.agent_process import REPO_ROOT, write_toml  # noqa: E402

MODELS = REPO_ROOT / "models"
MODEL = "tabular_classifier"


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / MODEL, repo / MODEL)
    return repo


def _config(tmp_path: Path, repo: Path, **signing: object) -> Path:
    return write_toml(tmp_path / "agent.toml", {
        "repository": {"path": str(repo)},
        "signing": {"trust_dir": str(MODELS / "keys" / "trusted"), **signing},
    })


def _features(rows: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def _parquet(path: Path, x: np.ndarray, row_group: int = 10_000) -> Path:
    table = pa.table({
        "id": np.arange(len(x), dtype=np.int64),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
    })
    pq.write_table(table, path, row_group_size=row_group)
    return path


def _args(config: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "batch", MODEL, str(src), "-o", str(out),
            "--config", str(config), "--progress", "plain", *extra]


def _batch(config: Path, src: Path, out: Path, *extra: str, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_args(config, src, out, *extra), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _parts(work: Path) -> int:
    try:
        return sum(1 for n in os.listdir(work) if n.startswith("part-") and n.endswith(".arrow"))
    except FileNotFoundError:
        return 0


def _interrupt_midway(config: Path, src: Path, out: Path, sig: int, *extra: str) -> tuple[int, str]:
    """Start a run, send ``sig`` once a few parts are on disk; (exit status, stderr)."""
    work = out.parent / f".{out.name}.batch"
    proc = subprocess.Popen(_args(config, src, out, *extra), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _parts(work) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode, err


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path]:
    repo = _repo(tmp_path)
    return repo, _config(tmp_path, repo)


def _reference(x: np.ndarray) -> np.ndarray:
    """The model's probabilities for ``x``, from onnxruntime directly on the signed file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODELS / MODEL / "2" / "model.onnx"), so)
    return np.asarray(sess.run(["probabilities"], {"features": x})[0])


def test_parquet_killed_and_resumed_is_byte_identical(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    x = _features(400_000)
    src = _parquet(tmp_path / "in.parquet", x, row_group=25_000)
    common = ("--batch-size", "1000", "--threads", "1", "--keep", "id")
    ref = tmp_path / "ref.parquet"
    done = _batch(config, src, ref, *common)
    assert done.returncode == 0, done.stderr
    assert "rows/s" in done.stderr and "ETA" in done.stderr

    out = tmp_path / "out.parquet"
    status, _ = _interrupt_midway(config, src, out, signal.SIGKILL, *common)
    assert status == -signal.SIGKILL
    assert not out.exists()
    work = tmp_path / ".out.parquet.batch"
    finished = _parts(work)
    assert 5 <= finished < 400
    # A power cut can leave a renamed part that never reached the disk whole (parts are
    # not fsynced): a torn part and every later one are scored again.
    (torn,) = work.glob(f"part-{finished - 3:08d}-*.arrow")
    torn.write_bytes(torn.read_bytes()[:100])
    resumed = _batch(config, src, out, *common)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {finished - 3} finished batch(es)" in resumed.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert not work.exists()  # parts are gone once the output is whole

    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(len(x)))
    probs = np.asarray(table.column("probabilities").combine_chunks().flatten()).reshape(-1, 3)
    np.testing.assert_allclose(probs[:5000], _reference(x[:5000]), rtol=1e-5, atol=1e-6)


def test_sigint_stops_cleanly_and_resumes(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    src = _parquet(tmp_path / "in.parquet", _features(300_000))
    common = ("--batch-size", "1000", "--threads", "1")
    ref = tmp_path / "ref.arrow"
    assert _batch(config, src, ref, *common).returncode == 0
    out = tmp_path / "out.arrow"
    status, err = _interrupt_midway(config, src, out, signal.SIGINT, *common)
    assert status == 130, err
    assert "run the same command again to resume" in err
    assert "Traceback" not in err
    assert not out.exists()
    resumed = _batch(config, src, out, *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert out.read_bytes() == ref.read_bytes()


def _read_probabilities(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return np.asarray(z["probabilities"])
    if path.suffix == ".csv":
        t = pacsv.read_csv(path)
        return np.stack([t.column(f"probabilities_{i}").to_numpy() for i in range(3)], axis=1)
    if path.suffix == ".jsonl":
        return np.array([json.loads(line)["probabilities"] for line in path.open()])
    t = pq.read_table(path)
    return np.asarray(t.column("probabilities").combine_chunks().flatten()).reshape(-1, 3)


@pytest.mark.parametrize("fmt", ["csv", "npz", "jsonl", "npy", "arrow"])
def test_round_trips(signed, tmp_path: Path, fmt: str) -> None:
    _repo_dir, config = signed
    x = _features(2_500)
    src = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(pa.table({f"features_{i}": x[:, i] for i in range(8)}), src)
    elif fmt == "npz":
        np.savez(src, features=x)
    elif fmt == "npy":
        np.save(src, x)
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps({"features": row}) + "\n" for row in x.tolist()))
    else:
        with pa.OSFile(str(src), "wb") as sink, pa.ipc.new_file(sink, pa.schema(
                [("features", pa.list_(pa.float32(), 8))])) as w:
            for lo in range(0, len(x), 700):
                w.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(
                    pa.array(x[lo:lo + 700].reshape(-1)), 8)], names=["features"]))
    out = tmp_path / f"out.{'parquet' if fmt in ('npy', 'arrow') else fmt}"
    result = _batch(config, src, out, "--batch-size", "1000", "--outputs",
                    "probabilities" if fmt == "npy" else "")
    assert result.returncode == 0, result.stderr
    got = _read_probabilities(out)
    assert got.shape == (len(x), 3)
    np.testing.assert_allclose(got, _reference(x), rtol=1e-5, atol=1e-6)


def test_missing_column_names_the_input_and_columns(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "x": [0.5, 0.25]}), src)
    result = _batch(config, src, tmp_path / "out.parquet")
    assert result.returncode == 1
    assert "input 'features'" in result.stderr
    assert "no column 'features'" in result.stderr and "features_0 .. features_7" in result.stderr
    assert "--map features=" in result.stderr
    mapped = _batch(config, src, tmp_path / "out.parquet", "--map", "features=x,nope")
    assert mapped.returncode == 1
    assert "column 'x'" in mapped.stderr or "column 'nope'" in mapped.stderr


def _bad_parquet(path: Path) -> Path:
    x = _features(3_000).tolist()
    x[1234] = x[1234][:7]  # one value short
    x[2500][3] = None  # a null element
    table = pa.table({"id": np.arange(3_000), "features": pa.array(x, pa.list_(pa.float32()))})
    pq.write_table(table, path)
    return path


def test_bad_rows_are_named_and_set_aside(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    src = _bad_parquet(tmp_path / "bad.parquet")
    stopped = _batch(config, src, tmp_path / "out.parquet", "--batch-size", "1000")
    assert stopped.returncode == 1
    assert "row 1234, column 'features'" in stopped.stderr
    assert "holds 7 values" in stopped.stderr
    assert "--rejects" in stopped.stderr

    rejects = tmp_path / "rejects.jsonl"
    out = tmp_path / "out.parquet"
    going = _batch(config, src, out, "--batch-size", "1000", "--rejects", str(rejects),
                   "--keep", "id")
    assert going.returncode == 0, going.stderr
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(e["row"], e["column"]) for e in entries] == [(1234, "features"), (2500, "features")]
    assert entries[0]["values"]["id"] == 1234
    assert "null" in entries[1]["error"]
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == 2_998 and 1234 not in ids and 2500 not in ids


def test_csv_wrong_value_and_unreadable_jsonl_line(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    x = _features(50)
    cols = {f"features_{i}": [str(v) for v in x[:, i]] for i in range(8)}
    cols["features_5"][17] = "n/a"
    src = tmp_path / "in.csv"
    pacsv.write_csv(pa.table(cols), src)
    result = _batch(config, src, tmp_path / "out.parquet")
    assert result.returncode == 1
    assert "row 17, column 'features_5': 'n/a' is not a valid FP32 value" in result.stderr

    lines = [json.dumps({"features": row}) for row in x.tolist()]
    lines[9] = '{"features": [1, 2,'  # cut off
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    result = _batch(config, src, tmp_path / "out.jsonl", "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    (entry,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert entry["row"] == 9 and "not valid JSON" in entry["error"]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 49


def test_tampered_or_unsigned_model_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    config = _config(tmp_path, repo)
    src = _parquet(tmp_path / "in.parquet", _features(100))
    model = repo / MODEL / "2" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x01
    model.write_bytes(bytes(data))
    out = tmp_path / "out.parquet"
    tampered = _batch(config, src, out)
    assert tampered.returncode == 1
    assert "model.onnx: content does not match the signature" in tampered.stderr
    assert not out.exists()

    (repo / MODEL / "2" / "model.sig").unlink()
    unsigned = _batch(config, src, out)
    assert unsigned.returncode == 1 and "model.sig" in unsigned.stderr
    # --allow-unsigned is refused unless the agent config allows unsigned models.
    refused = _batch(config, src, out, "--allow-unsigned")
    assert refused.returncode == 2
    assert "signing.allow_unsigned_models" in refused.stderr
    assert not out.exists()
    shutil.copy(MODELS / MODEL / "2" / "model.onnx", model)
    allowing = _config(tmp_path, repo, allow_unsigned_models=True)
    ok = _batch(allowing, src, out, "--allow-unsigned")
    assert ok.returncode == 0, ok.stderr
    assert pq.read_table(out).num_rows == 100


def test_job_file_runs_like_the_command_line(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    x = _features(1_500)
    src = _parquet(tmp_path / "in.parquet", x)
    out = tmp_path / "scores.jsonl"
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'model = "{MODEL}"\ninput = "{src}"\noutput = "{out}"\nconfig = "{config}"\n'
        'keep = ["id"]\noutputs = ["label"]\nbatch_size = 500\nprogress = "none"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "batch", "--job", str(job)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(1_500)) and set(rows[0]) == {"id", "label"}
    np.testing.assert_array_equal([r["label"] for r in rows], _reference(x).argmax(axis=1))
    job.write_text(job.read_text() + "bacth_size = 3\n")
    bad = subprocess.run(
        [sys.executable, "-m", "agent.cli", "batch", "--job", str(job)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "unknown key 'bacth_size'" in bad.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_batch_template_verifies_and_is_hardened(tmp_path: Path) -> None:
    entry_point = Path(sys.executable).with_name("edge-agent")
    service = (REPO_ROOT / "systemd" / "edge-agent-batch@.service").read_text()
    assert service.count("ExecStart=/usr/local/bin/edge-agent batch --job ") == 1
    assert "\nMemoryDenyWriteExecute=" not in service  # onnxruntime needs W+X pages
    unit = tmp_path / "edge-agent-batch@nightly.service"
    unit.write_text(service.replace("/usr/local/bin/edge-agent", str(entry_point)))
    timer = tmp_path / "edge-agent-batch@nightly.timer"
    shutil.copy(REPO_ROOT / "systemd" / "edge-agent-batch@.timer", timer)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit), str(timer)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                if "edge-agent-batch" in line]
    assert verify.returncode == 0 and problems == [], problems
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    import re

    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout[-500:]
    assert float(match.group(1)) <= 2.0


def _peak_rss_kib(config: Path, src: Path, out: Path) -> int:
    """Run the command in a child that reports its own peak RSS (KiB) on its last line."""
    code = (
        "import resource, sys\nfrom agent.cli import main\n"
        f"rc = main(['batch', {MODEL!r}, {str(src)!r}, '-o', {str(out)!r}, '--config', "
        f"{str(config)!r}, '--keep', 'id', '--progress', 'none'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1])


def test_memory_stays_bounded_by_batches_not_the_file(signed, tmp_path: Path) -> None:
    _repo_dir, config = signed
    small = _parquet(tmp_path / "small.parquet", _features(100_000), row_group=65_536)
    big = tmp_path / "big.parquet"
    schema = pa.schema([("id", pa.int64()), ("features", pa.list_(pa.float32(), 8))])
    with pq.ParquetWriter(big, schema) as writer:  # 3 M rows, about 110 MB on disk
        for lo in range(0, 3_000_000, 500_000):
            x = _features(500_000, seed=lo)
            writer.write_table(pa.table({
                "id": np.arange(lo, lo + 500_000),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
            }, schema=schema), row_group_size=65_536)
    size_mib = big.stat().st_size / 2**20
    assert size_mib > 80
    small_rss = _peak_rss_kib(config, small, tmp_path / "small-out.parquet")
    big_rss = _peak_rss_kib(config, big, tmp_path / "big-out.parquet")
    # 30x the rows: the peak may grow by a fraction of the file, not by the file.
    assert (big_rss - small_rss) / 1024 < size_mib / 3, (small_rss, big_rss, size_mib)
    assert pq.ParquetFile(tmp_path / "big-out.parquet").metadata.num_rows == 3_000_000
