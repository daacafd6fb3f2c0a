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

import datetime
import ipaddress
import json
import re
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


def write_public(path: Path, data: bytes) -> None:
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
        write_public(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        write_public(directory / "index.json", _index_bytes([]))
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
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
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
        write_public(self.index_path, _index_bytes(self._entries))


def _index_bytes(entries: list[dict[str, Any]]) -> bytes:
    doc = {"schema": INDEX_SCHEMA, "version": 1, "certificates": entries}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
