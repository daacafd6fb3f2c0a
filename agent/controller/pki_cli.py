"""``edge-controller pki ...``: the fleet PKI and the broker configuration from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.controller.broker_config import MosquittoOptions, write_mosquitto
from agent.controller.pki import DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS, DEFAULT_CRL_DAYS, Issued, Pki
from agent.errors import AgentError, ConfigError


def _passphrase(args: argparse.Namespace) -> bytes | None:
    from agent.signing.keys import read_passphrase_file

    path: Path | None = args.passphrase_file
    return read_passphrase_file(path) if path is not None else None


def _pki(args: argparse.Namespace) -> Pki:
    return Pki(args.dir, _passphrase(args))


def _print_issued(issued: Issued, what: str) -> None:
    print(
        f"{what} {issued.common_name}: {issued.cert} (serial {issued.serial:x}, "
        f"until {issued.not_after:%Y-%m-%d})"
    )
    if issued.key is not None:
        print(f"key {issued.key} (mode 0600)")


def _run(args: argparse.Namespace) -> int:
    try:
        action: str = args.pki_command
        if action == "init":
            pki = Pki.init(args.directory, args.name, args.days, args.crl_days, _passphrase(args))
            print(f"CA {pki.ca_cert_path} (key {pki.ca_key_path}, mode 0600), CRL {pki.crl_path}")
        elif action == "broker":
            hosts = list(args.host or [])
            if args.loopback:
                hosts += ["localhost", "127.0.0.1", "::1"]
            _print_issued(_pki(args).issue_broker(hosts, args.days), "broker")
        elif action == "controller":
            issued = _pki(args).issue_controller(args.name, args.days, args.csr)
            _print_issued(issued, "controller")
        elif action == "device":
            _print_issued(_pki(args).issue_device(args.device_id, args.days, args.csr), "device")
        elif action == "revoke":
            pki = _pki(args)
            serials = pki.revoke(args.common_name, args.crl_days, args.serial)
            print(f"revoked {args.common_name} (serial {', '.join(serials)}); CRL {pki.crl_path}")
            print(
                "now refresh the broker: `edge-controller pki mosquitto --out DIR ...` again, "
                "then reload mosquitto (SIGHUP: `systemctl reload mosquitto`)"
            )
        elif action == "crl":
            print(f"CRL {_pki(args).write_crl(args.crl_days)}")
        elif action == "list":
            pki = _pki(args)
            crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
            print(
                f"CRL {pki.crl_path}: {len(crl)} revoked, re-sign it (`pki crl`) before "
                f"{crl.next_update_utc:%Y-%m-%d}"
            )
            for e in pki.entries():
                state = f"revoked {e['revoked_at'][:19]}" if e["revoked_at"] else "valid"
                print(
                    f"{e['kind']:<10} {e['common_name']:<32} {e['serial']:<40} "
                    f"until {e['not_after'][:10]}  {state}"
                )
        else:  # mosquitto
            options = MosquittoOptions(
                port=args.port,
                bind=args.bind,
                prefix=args.prefix,
                persistence_dir=args.persistence_dir,
                log_dest=args.log_dest,
                user=args.user,
                broker=args.broker,
            )
            pki = _pki(args)
            written = write_mosquitto(pki, args.out, options)
            print(f"wrote {', '.join(str(p) for p in written)}")
            if not args.user:
                print(
                    f"mosquitto started as root reads these as its own account: "
                    f"`chown -R mosquitto: {written[0].parent}`"
                )
            if not pki.current("controller"):
                print(
                    "warning: no controller certificate yet, the ACL gives no one the "
                    "controllers' rights (`edge-controller pki controller NAME`, then "
                    "run this again)",
                    file=sys.stderr,
                )
    except ConfigError as exc:
        print(f"edge-controller: FAILED: {exc}", file=sys.stderr)
        return 2  # a config error, as everywhere in the CLI
    except (AgentError, OSError, ValueError) as exc:
        print(f"edge-controller: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def add_pki_commands(sub: Any) -> None:
    """``edge-controller pki ...`` under the controller's subcommands."""
    pki = sub.add_parser(
        "pki",
        help="the fleet's MQTT certificates: CA, broker, controllers, devices, CRL, "
        "and the mosquitto configuration",
        description="Make and keep the fleet's TLS identities (docs/operator-guide.md).",
    )
    actions = pki.add_subparsers(dest="pki_command", required=True)
    unlock = argparse.ArgumentParser(add_help=False)
    unlock.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="F",
        help="the CA key's passphrase (init: encrypt the new CA key with it)",
    )
    where = argparse.ArgumentParser(add_help=False, parents=[unlock])
    where.add_argument(
        "--dir",
        type=Path,
        default=Path("pki"),
        metavar="DIR",
        help="the PKI directory made by `pki init` (default ./pki)",
    )
    days = argparse.ArgumentParser(add_help=False)
    days.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CERT_DAYS,
        metavar="N",
        help=f"validity in days (default {DEFAULT_CERT_DAYS}; never past the CA's)",
    )
    crl_days = argparse.ArgumentParser(add_help=False)
    crl_days.add_argument(
        "--crl-days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        metavar="N",
        help=f"CRL validity in days; re-sign it before then with `pki crl` ({DEFAULT_CRL_DAYS})",
    )

    init = actions.add_parser("init", parents=[unlock, crl_days], help="create the fleet CA in DIR")
    init.add_argument("directory", type=Path, metavar="DIR", help="new PKI directory (mode 0700)")
    init.add_argument("--name", default="edge-agent fleet CA", help="the CA's subject CN")
    init.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CA_DAYS,
        metavar="N",
        help=f"CA validity in days (default {DEFAULT_CA_DAYS})",
    )

    broker = actions.add_parser(
        "broker", parents=[where, days], help="issue the broker's server certificate"
    )
    broker.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a DNS name or IP address clients connect to (repeatable; the first is the CN)",
    )
    broker.add_argument(
        "--loopback",
        action="store_true",
        help="also name localhost, 127.0.0.1 and ::1 (clients on the broker's host)",
    )
    controller = actions.add_parser(
        "controller",
        parents=[where, days],
        help="issue a controller client certificate (CN controller-NAME)",
    )
    controller.add_argument(
        "name",
        metavar="NAME",
        help="controller name; the CN is NAME if it starts with 'controller', else controller-NAME",
    )
    device = actions.add_parser(
        "device", parents=[where, days], help="issue a device client certificate (CN = device id)"
    )
    device.add_argument("device_id", metavar="ID", help="the device id (its mqtt.device_id)")
    for parser in (controller, device):
        parser.add_argument(
            "--csr",
            type=Path,
            metavar="FILE",
            help="certify the key of this PEM request (made where the key stays) instead "
            "of making a key here",
        )
    revoke = actions.add_parser(
        "revoke",
        parents=[where, crl_days],
        help="revoke every certificate with this CN and re-sign the CRL",
    )
    revoke.add_argument("common_name", metavar="CN", help="a device id or controller CN")
    revoke.add_argument(
        "--serial",
        metavar="HEX",
        help="only this certificate (`pki list`), e.g. the old one after a rotation",
    )
    actions.add_parser("crl", parents=[where, crl_days], help="re-sign the CRL (before it expires)")
    actions.add_parser("list", parents=[where], help="every certificate issued, revoked or not")

    mosquitto = actions.add_parser(
        "mosquitto",
        parents=[where],
        help="write mosquitto.conf, the ACL and the TLS files the broker reads into --out",
    )
    mosquitto.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for mosquitto.conf, acl, ca.crt, crl.pem, broker.crt/.key",
    )
    mosquitto.add_argument("--port", type=int, default=8883, help="TLS listener port (8883)")
    mosquitto.add_argument(
        "--bind", default="", metavar="ADDRESS", help="listen on this address only (default all)"
    )
    mosquitto.add_argument("--prefix", default="edge", help="the fleet's topic prefix (edge)")
    mosquitto.add_argument(
        "--persistence-dir",
        default="/var/lib/mosquitto/",
        metavar="DIR",
        help="where mosquitto keeps retained messages and sessions (/var/lib/mosquitto/)",
    )
    mosquitto.add_argument(
        "--log-dest",
        default="stderr",
        metavar="DEST",
        help="stderr (the journal under systemd), syslog, or 'file PATH' (default stderr)",
    )
    mosquitto.add_argument(
        "--user",
        default="",
        help="account mosquitto drops to when started as root (default its own, mosquitto)",
    )
    mosquitto.add_argument(
        "--broker",
        default="",
        metavar="CN",
        help="which broker certificate (default the newest)",
    )
    pki.set_defaults(func=_run)
