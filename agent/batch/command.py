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
    p.add_argument("model", nargs="?", help="model name in the repository")
    p.add_argument("input", type=Path, nargs="?", help="input file")
    p.add_argument("-o", "--output", type=Path,
                   help="output file (format from its suffix; parquet if none)")
    p.add_argument("--job", type=Path, metavar="FILE",
                   help="a TOML job file (keys: model, input, output and the long options "
                   "below with _ for -; what the command line gives wins), as the "
                   "edge-agent-batch@.service template runs")
    p.add_argument("--version", type=int, help="model version (default: the latest the "
                   "model's version policy serves)")
    p.add_argument("--config", type=Path, help="agent TOML config (repository, trust "
                   "store, runtime settings)")
    p.add_argument("--repository", type=Path, help="model repository (default: the config's)")
    p.add_argument("--input-format", choices=["parquet", "csv", "arrow", "feather", "npy",
                                              "npz", "jsonl"],
                   help="input file format (default: from the suffix)")
    p.add_argument("--output-format", choices=["parquet", "csv", "arrow", "feather", "npy",
                                               "npz", "jsonl"],
                   help="output file format (default: from the suffix)")
    p.add_argument("--map", action="append", metavar="INPUT=COL[,COL...]",
                   help="columns for a model input (repeatable); default: a column named "
                   "like the input, or INPUT_0..INPUT_{N-1}")
    p.add_argument("--outputs", metavar="NAME[,NAME...]",
                   help="model outputs to write (default: all)")
    p.add_argument("--keep", metavar="COL[,COL...]",
                   help="input columns copied to the output (row ids)")
    p.add_argument("--batch-size", type=int, help="rows a batch (default 4096)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the "
                   "config's runtime.intra_op_threads)")
    p.add_argument("--rejects", type=Path, metavar="FILE",
                   help="write bad rows here (JSON Lines) and go on, instead of stopping")
    p.add_argument("--work-dir", type=Path, help="where parts and the progress record live "
                   "(default: .OUTPUT.batch beside the output)")
    p.add_argument("--allow-unsigned", action="store_true", default=None,
                   help="score an unsigned model (only if the config sets "
                   "signing.allow_unsigned_models)")
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"],
                   help="progress on stderr: a bar on a terminal, lines otherwise (auto)")
    p.set_defaults(func=handler)


# Job file key -> (argparse destination, type); lists may be given as TOML arrays.
_JOB_KEYS: dict[str, tuple[str, type]] = {
    "model": ("model", str), "input": ("input", Path), "output": ("output", Path),
    "config": ("config", Path), "version": ("version", int), "repository": ("repository", Path),
    "input_format": ("input_format", str), "output_format": ("output_format", str),
    "map": ("map", list), "outputs": ("outputs", list), "keep": ("keep", list),
    "batch_size": ("batch_size", int), "threads": ("threads", int),
    "rejects": ("rejects", Path), "work_dir": ("work_dir", Path),
    "allow_unsigned": ("allow_unsigned", bool), "progress": ("progress", str),
}


def apply_job(args: argparse.Namespace) -> None:
    """Fill what the command line left out from ``args.job``; raises ConfigError naming the
    file and key."""
    import tomllib

    from agent.errors import ConfigError

    if args.job is None:
        return
    try:
        job = tomllib.loads(args.job.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"job file {args.job}: {exc}") from None
    for key, value in job.items():
        if key not in _JOB_KEYS:
            raise ConfigError(f"job file {args.job}: unknown key '{key}'")
        dest, kind = _JOB_KEYS[key]
        if kind is list:
            if isinstance(value, str):
                value = [value]
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"job file {args.job}: key '{key}' must be a list of strings")
            if dest != "map":
                value = ",".join(value)
        elif kind is Path:
            if not isinstance(value, str):
                raise ConfigError(f"job file {args.job}: key '{key}' must be a path string")
            value = Path(value)
        elif kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"job file {args.job}: key '{key}' must be an integer")
        elif kind is bool and not isinstance(value, bool):
            raise ConfigError(f"job file {args.job}: key '{key}' must be true or false")
        elif kind is str and not isinstance(value, str):
            raise ConfigError(f"job file {args.job}: key '{key}' must be a string")
        if getattr(args, dest) is None:
            setattr(args, dest, value)


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
        apply_job(args)
        for flag, value in (("MODEL", args.model), ("INPUT", args.input),
                            ("-o/--output", args.output)):
            if value is None:
                raise ConfigError(f"{flag} is required (on the command line or in --job)")
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"edge-agent batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    options = BatchOptions(
        model=args.model, input=args.input, output=args.output, version=args.version,
        repository=args.repository, input_format=args.input_format,
        output_format=args.output_format, maps=tuple(args.map or ()),
        outputs=split_names(args.outputs), keep=split_names(args.keep),
        batch_size=4096 if args.batch_size is None else args.batch_size,
        threads=args.threads, rejects=args.rejects,
        work_dir=args.work_dir, allow_unsigned=bool(args.allow_unsigned),
        progress=args.progress or "auto",
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
