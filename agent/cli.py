"""The ``edge-agent`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import AgentError, ConfigError
from agent.signing.cli import add_signing_commands
from agent.telemetry.cli import add_telemetry_commands

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _serve(args: argparse.Namespace) -> int:
    from agent.app import read_config, serve
    from agent.common.logs import configure_logging

    overrides: dict[str, dict[str, Any]] = {}
    if args.address is not None:
        overrides.setdefault("server", {})["address"] = args.address
    if args.unix_socket is not None:
        overrides.setdefault("server", {})["unix_socket"] = args.unix_socket
    if args.repository is not None:
        overrides.setdefault("repository", {})["path"] = args.repository
    if args.model_control is not None:
        overrides.setdefault("repository", {})["model_control"] = args.model_control
    if args.log_level is not None:
        overrides.setdefault("logging", {})["level"] = args.log_level
    try:
        config = read_config(args.config, overrides)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    try:
        asyncio.run(serve(config, args.config, overrides))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from agent.app import read_config
    from agent.startup_checks import check_startup

    try:
        config = read_config(args.config)
        # The checks `serve` runs before it starts (paths, permissions, keys).
        warnings = [] if args.schema_only else check_startup(config)
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        print(f"edge-agent: warning: {warning}", file=sys.stderr)
    print(f"OK {config.source}{' (schema only)' if args.schema_only else ''}")
    return 0


EXIT_CODES_EPILOG = """exit status:
  0  success (check-config: serve would start with this config)
  1  a failure other than the configuration (e.g. a model that cannot be served)
  2  a configuration error: the config file, a flag (bad arguments too), or a path
     or file it names (relative paths resolve against the working directory; the
     message names the key)
(sign and verify have their own codes: see their --help)"""


def _batch(args: argparse.Namespace) -> int:
    from agent.app import read_config
    from agent.batch.command import run_batch

    return run_batch(args, read_config)


def _optimize(args: argparse.Namespace) -> int:
    import json

    from agent.app import make_reader, read_config
    from agent.serving.onnx_runtime import SessionOptions
    from agent.serving.optimizer import OptimizingReader, describe

    try:
        config = read_config(args.config)
        rt = config.runtime
        options = SessionOptions(
            rt.intra_op_threads, rt.inter_op_threads, rt.graph_optimization,
            rt.execution_providers,
        )
        reader = OptimizingReader(make_reader(config), Path(config.state.dir), options)
        version_dir = Path(config.repository.path) / args.model / str(args.version)
        if not version_dir.is_dir():
            print(f"edge-agent: no version directory {version_dir}", file=sys.stderr)
            return EXIT_FAILURE
        if not reader.opted_in(version_dir):
            print(f"edge-agent: {version_dir} has no signed optimize.json", file=sys.stderr)
            return EXIT_FAILURE
        outcome = reader.optimize(version_dir, rebuild=args.rebuild)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(outcome.record.summary()) if args.json else describe(outcome))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Serve signed ONNX models over Triton's gRPC protocol; take verified "
        "updates over MQTT.",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the agent (the systemd service runs this)")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: /etc/edge-agent/agent.toml if it exists, else the "
        "embedded defaults)",
    )
    serve.add_argument("--address", help="HOST:PORT to listen on (default 127.0.0.1:8001)")
    serve.add_argument("--unix-socket", help="also listen on this unix socket path")
    serve.add_argument("--repository", help="model repository directory (default ./models)")
    serve.add_argument(
        "--model-control", choices=["none", "explicit"], help="allow load/unload RPCs"
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides logging.level"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check-config",
        help="run the checks serve runs at start-up (the config, and the paths and files "
        "it names) and exit",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: /etc/edge-agent/agent.toml if it exists, else the "
        "embedded defaults)",
    )
    check.add_argument(
        "--schema-only",
        action="store_true",
        help="check only the file's keys and values, not the paths it names (for a config "
        "meant for another machine)",
    )
    check.set_defaults(func=_check_config)

    opt = sub.add_parser(
        "optimize",
        help="prepare and check this device's faster variants of a model version",
        description="Build the variants a version's signed optimize.json allows (graph, "
        "int8), keep one only if it reproduces the signed validation vectors and is faster "
        "here; the agent serves it from its next load of the version (docs/optimize.md).",
    )
    opt.add_argument("model", help="model name in the repository")
    opt.add_argument("version", type=int, help="its version (a signed version directory)")
    opt.add_argument("--config", type=Path, help="agent TOML config (repository, runtime)")
    opt.add_argument("--rebuild", action="store_true", help="decide again, ignoring the store")
    opt.add_argument("--json", action="store_true", help="print the summary as JSON")
    opt.set_defaults(func=_optimize)

    add_signing_commands(sub)
    add_telemetry_commands(sub)
    from agent.batch.command import add_batch_parser  # light: argparse only

    add_batch_parser(sub, _batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
