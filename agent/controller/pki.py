"""The fleet's PKI: a CA, the broker's, controllers' and devices' certificates, the
CRL, and a complete mosquitto configuration with the ACL of docs/fleet-protocol.md.

One directory holds it all (keep it off the devices; the CA key is the fleet's
root of MQTT identity)::

    DIR/ca.key  ca.crt  crl.pem  index.json
    DIR/broker/<name>.crt .key
    DIR/controllers/<cn>.crt .key
    DIR/devices/<id>.crt .key

``index.json`` lists every certificate issued (serial, CN, kind, expiry, revoked
or not); the CRL and the ACL's controller users are made from it. The broker
maps the certificate CN to the MQTT username (``use_identity_as_username``), so
the CN is the identity the ACL sees: a device's CN is its device id (the
protocol's rule), a controller's lies in the namespace no device id may take
(``controller...``, agent.protocol.names).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common.durable import write_atomically
from agent.errors import AgentError, ConfigError
from agent.protocol.deployment import DEVICE_ID, is_device_id
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id
from agent.protocol.topics import REPORT_SCHEMAS, check_prefix

DEFAULT_CA_DAYS: Final = 3650
DEFAULT_CERT_DAYS: Final = 397
DEFAULT_CRL_DAYS: Final = 365
INDEX_SCHEMA: Final = "edge.pki_index"
# Letters, digits, '.', '-' per DNS label; a broker name is written into the SAN.
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+\Z")
_BACKDATE = datetime.timedelta(minutes=5)  # clock skew between the CA host and the others
DEVICE_READ_KINDS: Final = ("desired", "artifacts")


class PkiError(AgentError):
    """The PKI directory is missing, incomplete, or would be overwritten."""

    code = "pki_error"


@dataclass(frozen=True)
class Issued:
    """A certificate just written: its CN, serial and files."""

    common_name: str
    serial: int
    cert: Path
    key: Path | None  # None: issued for a CSR, the key never left its owner
    not_after: datetime.datetime


# --------------------------------------------------------------------------- names


def check_device_cn(device_id: str) -> str:
    """The device id as a certificate CN: the protocol's device-id rule, not reserved."""
    if is_reserved_device_id(device_id):
        raise ConfigError(
            f"device id {device_id!r}: ids starting with {RESERVED_DEVICE_PREFIX!r} are "
            "reserved for controllers (use `pki controller`)"
        )
    if not is_device_id(device_id):
        raise ConfigError(f"device id {device_id!r}: 1-64 letters, digits, '_', '.' or '-'")
    return device_id


def controller_cn(name: str) -> str:
    """``name`` in the controllers' namespace: kept if it already starts with
    ``controller`` (any case), else ``controller-<name>``."""
    cn = name if is_reserved_device_id(name) else f"{RESERVED_DEVICE_PREFIX}-{name}"
    if DEVICE_ID.fullmatch(cn) is None:
        raise ConfigError(f"controller name {name!r}: letters, digits, '_', '.' or '-' (<= 64)")
    return cn


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _DNS_NAME.fullmatch(host) is None:
        raise ConfigError(f"broker host {host!r}: a DNS name or an IP address")
    return x509.DNSName(host.rstrip("."))


# --------------------------------------------------------------------------- the directory


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(
    path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_atomically(path, pem, 0o600)


def read_csr(path: Path, common_name: str) -> x509.CertificateSigningRequest:
    """A CSR whose signature holds, for an EC or a >= 2048-bit RSA key; its subject, if it
    names a CN, must be ``common_name`` (the certificate's CN is ours to set either way)."""
    try:
        csr = x509.load_pem_x509_csr(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise PkiError(f"{path}: the request's signature does not verify")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) and not (
        isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048
    ):
        raise PkiError(f"{path}: an EC or a >= 2048-bit RSA key is required")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and names[0].value != common_name:
        raise ConfigError(f"{path}: the request is for CN {names[0].value!r}, not {common_name!r}")
    return csr


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data, 0o644)
    path.chmod(0o644)  # write_atomically's mode is filtered by the umask


def _usage(*, cert_sign: bool, signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=signature,  # ECDHE is ephemeral, but some stacks check it for EC keys
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class Pki:
    """A PKI directory: ``Pki.init(dir)`` creates one, ``Pki(dir)`` opens it."""

    def __init__(self, directory: Path, passphrase: bytes | None = None) -> None:
        self.directory = directory
        self.ca_key_path = directory / "ca.key"
        self.ca_cert_path = directory / "ca.crt"
        self.crl_path = directory / "crl.pem"
        self.index_path = directory / "index.json"
        for path in (self.ca_key_path, self.ca_cert_path, self.index_path):
            if not path.is_file():
                raise PkiError(f"{path}: missing; create the PKI with `edge-controller pki init`")
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), passphrase)
        except (TypeError, ValueError) as exc:  # no, or a wrong, passphrase
            raise PkiError(
                f"{self.ca_key_path}: cannot unlock the CA key ({exc}); "
                "--passphrase-file F if it was made with one"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path}: not an EC private key")
        self._ca_key = key
        self.ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        try:
            index = json.loads(self.index_path.read_text())
            self._entries: list[dict[str, Any]] = list(index["certificates"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{self.index_path}: unreadable ({exc})") from None

    @classmethod
    def init(
        cls,
        directory: Path,
        name: str = "edge-agent fleet CA",
        days: int = DEFAULT_CA_DAYS,
        crl_days: int = DEFAULT_CRL_DAYS,
        passphrase: bytes | None = None,
    ) -> Pki:
        """Create the CA (EC P-256), an empty index and an empty CRL in ``directory``."""
        if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
            raise PkiError(f"{directory}: a CA exists already (refusing to overwrite it)")
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True, signature=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_key(directory / "ca.key", key, passphrase)
        _write_public(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write_public(directory / "index.json", _index_bytes([]))
        pki = cls(directory, passphrase)
        pki.write_crl(crl_days)
        return pki

    # -- issuing ------------------------------------------------------------

    def _issue(
        self,
        kind: str,
        common_name: str,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None = None,
        csr: Path | None = None,
    ) -> Issued:
        folder = {"broker": "broker", "controller": "controllers", "device": "devices"}[kind]
        cert_path = self.directory / folder / f"{common_name}.crt"
        key_path = self.directory / folder / f"{common_name}.key"
        key: ec.EllipticCurvePrivateKey | None = None
        if csr is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = key.public_key()
        else:
            requested = read_csr(csr, common_name).public_key()
            if not isinstance(requested, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise PkiError(f"{csr}: unsupported key type")
            public = requested
        now = _now()
        not_after = min(now + datetime.timedelta(days=days), self.ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False, signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        # The key first: a certificate never sits beside a key it does not match.
        if key is not None:
            _write_key(key_path, key)
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._entries.append(
            {
                "serial": format(cert.serial_number, "x"),
                "common_name": common_name,
                "kind": kind,
                "not_after": not_after.isoformat(),
                "cert": str(cert_path.relative_to(self.directory)),
                "revoked_at": None,
            }
        )
        self._save_index()
        held = key_path if key is not None else None
        return Issued(common_name, cert.serial_number, cert_path, held, not_after)

    def issue_broker(self, hosts: list[str], days: int = DEFAULT_CERT_DAYS) -> Issued:
        """The broker's server certificate: CN the first host, a SAN for every host."""
        if not hosts:
            raise ConfigError("name the broker: --host NAME (repeatable; names or addresses)")
        sans = [_san(host) for host in dict.fromkeys(hosts)]
        return self._issue(
            "broker", hosts[0].rstrip("."), days, ExtendedKeyUsageOID.SERVER_AUTH, sans
        )

    def issue_controller(
        self, name: str, days: int = DEFAULT_CERT_DAYS, csr: Path | None = None
    ) -> Issued:
        cn = controller_cn(name)
        return self._issue("controller", cn, days, ExtendedKeyUsageOID.CLIENT_AUTH, csr=csr)

    def issue_device(
        self, device_id: str, days: int = DEFAULT_CERT_DAYS, csr: Path | None = None
    ) -> Issued:
        """A device certificate; with ``csr``, for the key the device made itself."""
        cn = check_device_cn(device_id)
        return self._issue("device", cn, days, ExtendedKeyUsageOID.CLIENT_AUTH, csr=csr)

    # -- revoking -----------------------------------------------------------

    def revoke(
        self, common_name: str, crl_days: int = DEFAULT_CRL_DAYS, serial: str | None = None
    ) -> list[str]:
        """Revoke every unrevoked certificate with this CN (only ``serial``, hex, if given:
        the old certificate of a rotation); returns the serials revoked."""
        stamp = _now().isoformat()
        serials = []
        wanted = None if serial is None else serial.lower().removeprefix("0x").lstrip("0")
        for entry in self._entries:
            if wanted is not None and entry["serial"].lstrip("0") != wanted:
                continue
            if entry["common_name"] == common_name and entry["revoked_at"] is None:
                entry["revoked_at"] = stamp
                serials.append(entry["serial"])
        if not serials:
            which = f" and serial {serial}" if serial else ""
            raise PkiError(
                f"no unrevoked certificate with CN {common_name!r}{which} in {self.index_path}"
            )
        self._save_index()
        self.write_crl(crl_days)
        return serials

    def write_crl(self, days: int = DEFAULT_CRL_DAYS) -> Path:
        """Sign a fresh CRL of every revoked certificate (the broker refuses them)."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + datetime.timedelta(days=days))
        )
        for entry in self._entries:
            if entry["revoked_at"] is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(entry["serial"], 16))
                    .revocation_date(datetime.datetime.fromisoformat(entry["revoked_at"]))
                    .build()
                )
        crl = builder.sign(self._ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    # -- queries ------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._entries]

    def current(self, kind: str) -> list[dict[str, Any]]:
        """Unrevoked, unexpired certificates of ``kind``, newest last."""
        now = _now()
        return [
            dict(e)
            for e in self._entries
            if e["kind"] == kind
            and e["revoked_at"] is None
            and datetime.datetime.fromisoformat(e["not_after"]) > now
        ]

    def _save_index(self) -> None:
        _write_public(self.index_path, _index_bytes(self._entries))


def _index_bytes(entries: list[dict[str, Any]]) -> bytes:
    doc = {"schema": INDEX_SCHEMA, "version": 1, "certificates": entries}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------- mosquitto


def fleet_acl(prefix: str, controllers: list[str]) -> str:
    """The mosquitto ``acl_file`` of docs/fleet-protocol.md for these controller CNs.

    ``pattern`` lines apply to every client with ``%u`` = its certificate CN: a
    device writes its reports and its own chunk requests and reads its own desired
    state and chunks, nothing else. Each controller reads and writes the whole tree
    and reads the artifact requests through ``$share`` subscriptions.
    """
    check_prefix(prefix)
    lines = ["# generated by `edge-controller pki mosquitto`: the ACL of docs/fleet-protocol.md"]
    for cn in controllers:
        lines += [
            "",
            f"user {cn}",
            f"topic readwrite {prefix}/#",
            f"topic read $share/+/{prefix}/#",
        ]
    lines += ["", "# every client, %u = the certificate CN (the device id)"]
    lines += [f"pattern write {prefix}/devices/%u/{kind}" for kind in REPORT_SCHEMAS]
    lines.append(f"pattern write {prefix}/artifacts/request/%u")
    lines += [f"pattern read {prefix}/devices/%u/{kind}" for kind in DEVICE_READ_KINDS]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class MosquittoOptions:
    port: int = 8883
    bind: str = ""  # "" = every interface
    prefix: str = "edge"
    persistence_dir: str = "/var/lib/mosquitto/"
    log_dest: str = "stderr"  # stderr (the journal under systemd), syslog, or "file PATH"
    user: str = ""  # "" = mosquitto's default ('mosquitto' when started as root)
    broker: str = ""  # which broker certificate (CN); "" = the newest


def write_mosquitto(pki: Pki, out: Path, options: MosquittoOptions) -> list[Path]:
    """Copy the broker's certificate and key, the CA and the CRL into ``out`` and write
    ``mosquitto.conf`` and ``acl`` there; returns the files written."""
    brokers = [e for e in pki.current("broker") if options.broker in ("", e["common_name"])]
    if not brokers:
        which = f" with CN {options.broker!r}" if options.broker else ""
        raise PkiError(f"no current broker certificate{which}: run `edge-controller pki broker`")
    if not 0 < options.port < 65536:
        raise ConfigError(f"--port {options.port}: 1-65535")
    broker_cert = pki.directory / brokers[-1]["cert"]
    controllers = sorted({e["common_name"] for e in pki.current("controller")})
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    files = {
        "ca.crt": pki.ca_cert_path.read_bytes(),
        "crl.pem": pki.crl_path.read_bytes(),
        "broker.crt": broker_cert.read_bytes(),
        "acl": fleet_acl(options.prefix, controllers).encode(),
    }
    written = []
    for name, data in files.items():
        _write_public(out / name, data)
        written.append(out / name)
    write_atomically(out / "broker.key", broker_cert.with_suffix(".key").read_bytes(), 0o600)
    written.append(out / "broker.key")
    conf = _mosquitto_conf(out, options)
    _write_public(out / "mosquitto.conf", conf.encode())
    written.append(out / "mosquitto.conf")
    return written


def _mosquitto_conf(out: Path, o: MosquittoOptions) -> str:
    persistence = o.persistence_dir if o.persistence_dir.endswith("/") else o.persistence_dir + "/"
    log = o.log_dest if o.log_dest.startswith(("stderr", "stdout", "syslog", "file ")) else None
    if log is None:
        raise ConfigError(f"--log-dest {o.log_dest!r}: stderr, stdout, syslog or 'file PATH'")
    lines = [
        "# generated by `edge-controller pki mosquitto`: mutual TLS, CN = MQTT username,",
        "# the fleet's per-device ACL, revoked certificates refused (crlfile).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {out}/acl",
        "persistence true",
        f"persistence_location {persistence}",
        "autosave_interval 60",
        # Chunks queued for a device while it is away (QoS 1, persistent session).
        "max_queued_messages 10000",
        f"log_dest {log}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if o.user:
        lines.append(f"user {o.user}")
    lines += [
        "",
        f"listener {o.port}{' ' + o.bind if o.bind else ''}",
        "protocol mqtt",
        f"cafile {out}/ca.crt",
        f"certfile {out}/broker.crt",
        f"keyfile {out}/broker.key",
        f"crlfile {out}/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


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
