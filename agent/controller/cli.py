"""The ``edge-controller`` command line: keygen, publish, deploy, serve, status."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent import __version__
from agent.controller.rollout_cli import add_drive_options, add_rollout_options
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.controller.config import ControllerConfig
    from agent.controller.deploy import IssuedDeployment

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_CODES_EPILOG: Final = """exit status:
  0  success
  1  a failure other than the configuration (e.g. the broker cannot be reached)
  2  a configuration error: the config file, a flag (bad arguments too), or a path or
     file it names (relative paths resolve against the working directory; the message
     names the key)
  3  what was asked for does not exist (a device, a published version, a rollout)"""


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config keys set by flags (``None`` flags are left to the file and the defaults)."""
    table = {
        "host": ("broker", "host"),
        "port": ("broker", "port"),
        "client_id": ("broker", "client_id"),
        "tls_ca": ("broker", "tls_ca"),
        "tls_cert": ("broker", "tls_cert"),
        "tls_key": ("broker", "tls_key"),
        "prefix": ("fleet", "prefix"),
        "share_group": ("fleet", "share_group"),
        "max_chunk_bytes": ("fleet", "max_chunk_bytes"),
        "max_bytes_per_s": ("fleet", "max_bytes_per_s"),
        "store": ("store", "dir"),
        "status_file": ("store", "status_file"),
        "key": ("deploy", "key"),
        "passphrase_file": ("deploy", "passphrase_file"),
        "trust_dir": ("signing", "trust_dir"),
    }
    out: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in table.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    return out


def _config(args: argparse.Namespace) -> ControllerConfig:
    from agent.controller.config import read_controller_config

    return read_controller_config(args.config, _overrides(args))


def _fail(exc: Exception) -> int:
    code = getattr(exc, "code", "")
    print(f"edge-controller: FAILED{' ' + code if code else ''}: {exc}", file=sys.stderr)
    return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE


# --------------------------------------------------------------------------- commands


def run_keygen(args: argparse.Namespace) -> int:
    from agent.signing import keys

    try:
        passphrase = (
            keys.read_passphrase_file(args.passphrase_file) if args.passphrase_file else None
        )
        pair = keys.write_key_pair(args.out_dir, args.name, passphrase)
    except AgentError as exc:
        return _fail(exc)
    print(f"private key {pair.private_key} (mode 0600): keep it on the controller")
    print(f"public key  {pair.public_key}: install it in each agent's deployment trust directory")
    print(f"key id      {pair.key_id}")
    return EXIT_OK


def run_publish(args: argparse.Namespace) -> int:
    from agent.controller.progress import ByteProgress
    from agent.controller.store import ArtifactStore

    # Only for a person watching: a pipe or a file (scripts, logs) gets no bar.
    bar = ByteProgress(sys.stderr, f"{args.model} v{args.version}") if sys.stderr.isatty() else None
    try:
        config = _config(args)
        trust = _trust_store(config)
        manifest = ArtifactStore(config.store_dir).publish(
            args.version_dir,
            args.model,
            args.version,
            trust,
            args.config_pbtxt,
            progress=bar.update if bar is not None else None,
        )
    except AgentError as exc:
        if bar is not None:
            bar.close()  # the error starts on a line of its own
        return _fail(exc)
    if bar is not None:
        bar.close()
    print(
        f"published {manifest.name} version {manifest.version}: {len(manifest.files)} files"
        f"{' + config.pbtxt' if manifest.config else ''}, {manifest.total_bytes} bytes, "
        f"signed by {manifest.signed_by}"
    )
    return EXIT_OK


def _trust_store(config: ControllerConfig) -> Any:
    """The model-signing trust store; a missing or empty one is a config error (exit 2)."""
    from agent.common.paths import resolved
    from agent.signing.keys import TrustStore, TrustStoreError

    try:
        return TrustStore.from_directory(config.trust_dir)
    except TrustStoreError as exc:
        raise ConfigError(
            f"{config.source}: key 'signing.trust_dir' (--trust-dir): "
            f"{resolved(str(config.trust_dir))}: {exc}; copy the model-signing public keys "
            "(*.pem) there, or point the key at them"
        ) from None


async def _publish_deployment(
    config: ControllerConfig, issued: IssuedDeployment, timeout: float
) -> None:
    from agent.controller.deploy import publish_deployment
    from agent.mqtt.client import MqttClient

    client = MqttClient(config.broker)
    await client.start()
    try:
        await client.wait_connected(timeout)
        await asyncio.wait_for(publish_deployment(client, config.prefix, issued), timeout)
    finally:
        await client.stop()


def run_deploy(args: argparse.Namespace) -> int:
    from agent.controller.deploy import issue_deployment
    from agent.controller.store import ArtifactNotFoundError, ArtifactStore
    from agent.mqtt.client import MqttError
    from agent.signing import keys

    try:
        config = _config(args)
        if config.deploy_key is None:
            raise ConfigError("no deployment key: pass --key or set 'deploy.key'")
        if (args.group is None) == (not args.device):
            raise ConfigError("name the devices: --device ID (repeatable) or --group G")
        if args.group is not None:
            from agent.controller.rollout_cli import run_deploy_group

            return run_deploy_group(config, args)
        passphrase = (
            keys.read_passphrase_file(config.passphrase_file) if config.passphrase_file else None
        )
        key = keys.load_private_key(config.deploy_key, passphrase)
        issued = issue_deployment(
            ArtifactStore(config.store_dir),
            args.model,
            args.version,
            args.device,
            key,
            expires_in_s=args.expires_in if args.expires_in is not None else config.expires_in_s,
            allow_downgrade=args.allow_downgrade,
            probation_s=args.probation if args.probation is not None else config.probation_s,
        )
    except ArtifactNotFoundError as exc:
        _fail(exc)
        return EXIT_NOT_FOUND
    except AgentError as exc:
        return _fail(exc)
    try:
        asyncio.run(_publish_deployment(config, issued, args.timeout))
    except (MqttError, TimeoutError) as exc:
        print(
            f"edge-controller: FAILED: deployment {issued.deployment_id} signed but not "
            f"published: {exc or 'timed out'}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(
        f"deployed {args.model} version {args.version} to {', '.join(args.device)}: "
        f"deployment {issued.deployment_id} sequence {issued.sequence} "
        f"expires_at {issued.deployment['expires_at']}"
    )
    return EXIT_OK


def run_rollout_command(args: argparse.Namespace) -> int:
    from agent.controller.rollout_cli import run_rollout

    try:
        config = _config(args)
    except AgentError as exc:
        return _fail(exc)
    return run_rollout(config, args)


def run_serve(args: argparse.Namespace) -> int:
    from agent.common.logs import configure_logging
    from agent.controller.service import serve

    try:
        config = _config(args)
    except AgentError as exc:
        return _fail(exc)
    configure_logging(args.log_level, args.log_format)
    try:
        asyncio.run(serve(config))
    except AgentError as exc:
        return _fail(exc)
    return EXIT_OK


def _load_devices(config: ControllerConfig) -> dict[str, Any]:
    """The devices of the status file ``serve`` writes; raises OSError/ValueError."""
    from agent.controller.status import load_status

    devices: dict[str, Any] = load_status(config.status_file).get("devices", {})
    return devices


def _fleet_rows(config: ControllerConfig, group: str | None) -> list[Any]:
    from agent.controller.fleetview import fleet_rows, resolve_group

    devices = _load_devices(config)
    only = None
    if group is not None:
        try:
            only = resolve_group(group, config.groups, devices)
        except KeyError:
            raise ConfigError(
                f"no group {group!r} (declared: {', '.join(sorted(config.groups)) or 'none'}; "
                "or tag:<tag>)"
            ) from None
    return fleet_rows(devices, config.groups, only)


def _no_status(exc: Exception) -> int:
    print(
        f"edge-controller: no status yet ({exc}); `edge-controller serve` writes it",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def run_status(args: argparse.Namespace) -> int:
    from agent.controller.fleetview import table_lines

    try:
        config = _config(args)
        if args.device is not None:
            devices = _load_devices(config)
        else:
            rows = _fleet_rows(config, args.group)
    except AgentError as exc:
        return _fail(exc)
    except (OSError, ValueError) as exc:
        return _no_status(exc)
    if args.device is not None:
        entry = devices.get(args.device)
        if entry is None:
            print(f"edge-controller: no reports from device {args.device!r}", file=sys.stderr)
            return EXIT_NOT_FOUND
        if args.json:
            print(json.dumps(entry, indent=2, sort_keys=True))
        else:
            from agent.controller.fleetview import device_lines

            print("\n".join(device_lines(args.device, entry, config.groups)))
        return EXIT_OK
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2, sort_keys=True))
        return EXIT_OK
    print("\n".join(table_lines(rows)))
    from agent.controller.status import load_status, unverified_lines

    try:
        extra = unverified_lines(load_status(config.status_file))
    except (OSError, ValueError):  # replaced meanwhile: the table is what matters
        extra = []
    if extra:
        print("\n".join(extra))
    return EXIT_OK


def run_watch(args: argparse.Namespace) -> int:
    """Redraw the status table every ``--interval`` seconds until Ctrl-C (or ``--count``)."""
    import time

    from agent.controller.fleetview import table_lines

    try:
        config = _config(args)
    except AgentError as exc:
        return _fail(exc)
    tty = sys.stdout.isatty() and not args.json
    shown = 0
    try:
        while args.count is None or shown < args.count:
            if shown:
                time.sleep(args.interval)
            try:
                rows = _fleet_rows(config, args.group)
                if args.json:
                    lines = [json.dumps([row.to_json() for row in rows], sort_keys=True)]
                else:
                    stamp = time.strftime("%H:%M:%S")
                    lines = [f"edge-controller watch  {stamp}  (Ctrl-C to quit)"]
                    lines += table_lines(rows)
            except AgentError as exc:
                return _fail(exc)
            except (OSError, ValueError) as exc:
                lines = [f"no status yet ({exc}); waiting for `edge-controller serve`"]
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear screen
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            shown += 1
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("controller configuration (flags override the file)")
    group.add_argument(
        "--config",
        type=Path,
        help="TOML file (default /etc/edge-agent/controller.toml if it exists)",
    )
    group.add_argument("--host", help="broker host (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="broker port (default 1883)")
    group.add_argument("--client-id", help="MQTT client id")
    group.add_argument("--tls-ca", type=Path, help="CA bundle of the broker certificate")
    group.add_argument("--tls-cert", type=Path, help="controller client certificate")
    group.add_argument("--tls-key", type=Path, help="controller client key")
    group.add_argument("--prefix", help="topic prefix (default edge)")
    group.add_argument("--share-group", help="shared subscription group")
    group.add_argument("--store", type=Path, help="artifact store directory")
    group.add_argument("--status-file", type=Path, help="status JSON (default STORE/status.json)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-controller",
        description="Fleet controller for edge-agent: publish signed model versions, sign and "
        "send deployments, serve model chunks over MQTT, follow device status.",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-controller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common()

    keygen = sub.add_parser("keygen", help="make the ECDSA P-256 deployment key pair")
    keygen.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where the key pair goes"
    )
    keygen.add_argument("--name", default="deployment", help="file name stem (default deployment)")
    keygen.add_argument(
        "--passphrase-file", type=Path, metavar="F", help="encrypt the private key with this"
    )
    keygen.set_defaults(func=run_keygen)

    publish = sub.add_parser(
        "publish",
        parents=[common],
        help="verify a signed version directory and add it to the store "
        "(with a progress bar on stderr if it is a terminal)",
    )
    publish.add_argument(
        "version_dir", type=Path, metavar="VERSION_DIR", help="a signed version directory"
    )
    publish.add_argument("--model", required=True, help="model name")
    publish.add_argument("--version", type=int, required=True, dest="version", help="version")
    publish.add_argument(
        "--config-pbtxt",
        type=Path,
        help="the model's config.pbtxt (default: VERSION_DIR/../config.pbtxt if present)",
    )
    publish.add_argument("--trust-dir", type=Path, help="model-signing trust directory")
    publish.set_defaults(func=run_publish)

    deploy = sub.add_parser(
        "deploy", parents=[common], help="sign a deployment and publish it to devices"
    )
    deploy.add_argument("model", metavar="MODEL", help="a published model")
    deploy.add_argument("version", type=int, metavar="VERSION", help="its published version")
    deploy.add_argument("--device", action="append", metavar="ID", help="deploy at once")
    deploy.add_argument(
        "--allow-downgrade", action="store_true", help="allow a version below the active one"
    )
    deploy.add_argument("--expires-in", type=int, metavar="S", help="validity (default 7 days)")
    deploy.add_argument("--probation", type=int, metavar="S", help="probation window seconds")
    deploy.add_argument("--key", type=Path, help="deployment private key (PEM)")
    deploy.add_argument(
        "--passphrase-file", type=Path, metavar="F", help="passphrase of the deployment key"
    )
    deploy.add_argument("--timeout", type=float, default=10.0, help="broker timeout seconds")
    add_rollout_options(deploy)
    deploy.set_defaults(func=run_deploy)

    rollout = sub.add_parser(
        "rollout", parents=[common], help="list, follow, pause, resume or abort staged rollouts"
    )
    rollout.add_argument(
        "action", choices=["list", "status", "pause", "resume", "abort"], help="what to do"
    )
    rollout.add_argument("rollout_id", nargs="?", metavar="ID", help="the rollout (not for list)")
    rollout.add_argument("--json", action="store_true", help="JSON instead of a table")
    rollout.add_argument("--key", type=Path, help="deployment private key (PEM)")
    rollout.add_argument(
        "--passphrase-file", type=Path, metavar="F", help="passphrase of the deployment key"
    )
    rollout.add_argument("--timeout", type=float, default=10.0, help="broker timeout seconds")
    add_drive_options(rollout)
    rollout.set_defaults(func=run_rollout_command)

    serve = sub.add_parser("serve", parents=[common], help="serve chunks and follow device status")
    serve.add_argument("--max-chunk-bytes", type=int, help="largest chunk served (1 MiB)")
    serve.add_argument("--max-bytes-per-s", type=int, help="send at most this (0: no limit)")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (info)",
    )
    serve.add_argument(
        "--log-format", default="json", choices=["json", "logfmt"], help="log line format (json)"
    )
    serve.set_defaults(func=run_serve)

    status = sub.add_parser("status", parents=[common], help="show what devices reported")
    status.add_argument("device", nargs="?", metavar="DEVICE", help="one device in detail")
    status.add_argument("--group", metavar="G", help="only the devices of group G")
    status.add_argument(
        "--json", action="store_true",
        help="JSON instead of text: the table's rows, or everything DEVICE reported",
    )
    status.set_defaults(func=run_status)

    watch = sub.add_parser(
        "watch", parents=[common], help="the status table, redrawn live (Ctrl-C to quit)"
    )
    watch.add_argument("--group", metavar="G", help="only the devices of group G")
    watch.add_argument("--interval", type=float, default=1.0, metavar="S", help="redraw period")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N redraws")
    watch.add_argument("--json", action="store_true", help="one JSON line per redraw")
    watch.set_defaults(func=run_watch)

    from agent.controller.pki_cli import add_pki_commands

    add_pki_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
