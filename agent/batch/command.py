"""``edge-agent batch``: the argument parser and the command (no heavy imports here)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

INSTALL_HINT = (
    "edge-agent batch needs pyarrow: pip install 'edge-agent[batch]' (or pip install pyarrow)"
)


def add_batch_parser(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser(
        "batch",
        help="score a file (Parquet, CSV, Arrow/Feather, NPY/NPZ, JSON Lines) with a verified "
        "model version; resumable",
        description="Score every row of INPUT with a signature-verified model version and "
        "write OUTPUT. Interrupted (Ctrl-C, SIGTERM, a crash), the same command resumes where "
        "it stopped.",
    )
    p.add_argument("model", help="model name in the repository")
    p.add_argument("input", type=Path, help="input file")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output file (format from its suffix; parquet if none)")
    p.add_argument("--version", type=int, help="model version (default: the latest the "
                   "model's version policy serves)")
    p.add_argument("--config", type=Path, help="agent TOML config (repository, trust "
                   "store, runtime settings)")
    p.add_argument("--repository", type=Path, help="model repository (default: the config's)")
    p.add_argument("--input-format", choices=["parquet", "csv", "arrow", "feather", "npy",
                                              "npz", "jsonl"])
    p.add_argument("--output-format", choices=["parquet", "csv", "arrow", "feather", "npy",
                                               "npz", "jsonl"])
    p.add_argument("--map", action="append", default=[], metavar="INPUT=COL[,COL...]",
                   help="columns for a model input (repeatable); default: a column named "
                   "like the input, or INPUT_0..INPUT_{N-1}")
    p.add_argument("--outputs", default="", metavar="NAME[,NAME...]",
                   help="model outputs to write (default: all)")
    p.add_argument("--keep", default="", metavar="COL[,COL...]",
                   help="input columns copied to the output (row ids)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows a batch (default 4096)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the "
                   "config's runtime.intra_op_threads)")
    p.add_argument("--rejects", type=Path, metavar="FILE",
                   help="write bad rows here (JSON Lines) and go on, instead of stopping")
    p.add_argument("--work-dir", type=Path, help="where parts and the progress record live "
                   "(default: .OUTPUT.batch beside the output)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="score an unsigned model (only if the config sets "
                   "signing.allow_unsigned_models)")
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default="auto",
                   help="progress on stderr: a bar on a terminal, lines otherwise (auto)")
    p.set_defaults(func=handler)


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C: finished parts stay, the run resumes


def run_batch(args: argparse.Namespace, read_config: Callable[..., Any]) -> int:
    from agent.errors import AgentError, ConfigError

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return EXIT_CONFIG
    from agent.batch.plan import split_names
    from agent.batch.runner import BatchOptions, run

    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    options = BatchOptions(
        model=args.model, input=args.input, output=args.output, version=args.version,
        repository=args.repository, input_format=args.input_format,
        output_format=args.output_format, maps=tuple(args.map),
        outputs=split_names(args.outputs), keep=split_names(args.keep),
        batch_size=args.batch_size, threads=args.threads, rejects=args.rejects,
        work_dir=args.work_dir, allow_unsigned=args.allow_unsigned, progress=args.progress,
    )
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = run(options, config)
    except KeyboardInterrupt:
        print("edge-agent batch: interrupted; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"edge-agent batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent batch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.interrupted:
        return EXIT_INTERRUPTED
    resumed = f" (resumed at batch {result.resumed_at})" if result.resumed_at else ""
    print(
        f"edge-agent batch: {result.rows_out:,} rows scored, {result.rejected:,} rejected, "
        f"{result.batches} batch(es){resumed}, {result.seconds:.1f} s -> {args.output}",
        file=sys.stderr,
    )
    return 0
