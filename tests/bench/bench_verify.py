"""Benchmark: model-directory verification throughput and memory vs ``sha256sum``.

Builds a signed version directory of the given size in a temporary directory
(one large ``model.onnx`` plus a few small files), then measures, with a warm
page cache and best of ``--repeat`` runs:

* ``sha256sum`` over the same files (a subprocess),
* ``verify_version`` streaming every file (in a child process, so its peak RSS
  is its own),
* ``verify_version`` with ``load=["model.onnx"]`` (the model read into memory
  once, as the loader does).

Prints a table of throughput, ratio to sha256sum and peak RSS, and deletes the
directory afterwards. Usage::

    .venv/bin/python tests/bench/bench_verify.py [--size-mb 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
SMALL_FILES = {
    "profile.json": b'{"mean": [0.0, 1.0], "std": [1.0, 1.0]}',
    "validation/inputs.bin": os.urandom(64 * 1024),
    "validation/expected.bin": os.urandom(16 * 1024),
}


@dataclass
class Row:
    name: str
    seconds: float
    peak_rss_mib: float | None
    baseline_rss_mib: float | None = None


def build_version(root: Path, size_mib: int) -> Path:
    version = root / "bench" / "1"
    (version / "validation").mkdir(parents=True)
    block = os.urandom(16 * MIB)
    with (version / "model.onnx").open("wb") as handle:
        remaining = size_mib * MIB
        while remaining:
            count = min(remaining, len(block))
            handle.write(block[:count])
            remaining -= count
            # Vary the blocks so the file is not one repeated pattern.
            block = block[1:] + block[:1]
    for name, data in SMALL_FILES.items():
        (version / name).write_bytes(data)
    return version


def sign(version: Path, key_dir: Path) -> Path:
    from agent.signing import keys
    from agent.signing.version_dir import sign_version

    pair = keys.write_key_pair(key_dir, "bench")
    sign_version(version, keys.load_private_key(pair.private_key))
    return pair.public_key


def files_of(version: Path) -> list[Path]:
    return sorted(p for p in version.rglob("*") if p.is_file() and p.name != "model.sig")


def time_sha256sum(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL, timeout=3600
    )
    return time.perf_counter() - start


def child(version: Path, public_key: Path, load: list[str]) -> None:
    """Run in a separate process: verify once, print seconds and RSS as JSON."""
    from agent.signing import keys
    from agent.signing.version_dir import verify_version

    trust = keys.TrustStore.from_public_key_files([public_key])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    verified = verify_version(version, trust, load=load)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_kib": peak,
                "baseline_kib": baseline,
                "bytes": verified.total_bytes,
            }
        )
    )


def time_verify(version: Path, public_key: Path, load: list[str]) -> tuple[float, float, float]:
    command = [sys.executable, __file__, "--child", str(version), str(public_key)]
    for name in load:
        command += ["--load", name]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=3600)
    result = json.loads(output.stdout)
    return result["seconds"], result["peak_kib"] / 1024, result["baseline_kib"] / 1024


def best_verify(version: Path, public_key: Path, load: list[str], repeat: int) -> Row:
    runs = [time_verify(version, public_key, load) for _ in range(repeat)]
    seconds = min(r[0] for r in runs)
    label = "verify_version (streaming)" if not load else f"verify_version load={load}"
    return Row(label, seconds, max(r[1] for r in runs), min(r[2] for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512, help="model size in MiB (512)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where to build the model")
    parser.add_argument("--child", nargs=2, metavar=("VERSION_DIR", "PUBLIC_KEY"))
    parser.add_argument("--load", action="append", default=[])
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.load)
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.tmp_dir))
    try:
        version = build_version(root, args.size_mb)
        public_key = sign(version, root / "keys")
        files = files_of(version)
        total = sum(p.stat().st_size for p in files)
        time_sha256sum(files)  # warm the page cache for everyone
        sha = Row("sha256sum", min(time_sha256sum(files) for _ in range(args.repeat)), None)
        rows = [
            sha,
            best_verify(version, public_key, [], args.repeat),
            best_verify(version, public_key, ["model.onnx"], args.repeat),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = total / 1e6
    print(
        f"model directory: {len(files)} files, {total / MIB:.0f} MiB; warm page cache; "
        f"best of {args.repeat}; {os.cpu_count()} CPUs"
    )
    header = f"{'method':<40} {'seconds':>8} {'MB/s':>8} {'vs sha256sum':>13} {'peak RSS':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        rss = f"{row.peak_rss_mib:.0f} MiB" if row.peak_rss_mib is not None else "-"
        ratio = sha.seconds / row.seconds
        print(
            f"{row.name:<40} {row.seconds:>8.3f} {mb / row.seconds:>8.0f} {ratio:>12.0%} {rss:>10}"
        )
    baseline = rows[1].baseline_rss_mib
    if baseline is not None:
        print(
            f"(verifier RSS before verifying, after imports: {baseline:.0f} MiB; "
            "streaming adds a bounded 1 MiB buffer, load= adds the loaded file)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
