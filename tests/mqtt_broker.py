"""A real mosquitto broker for tests and benchmarks.

``MosquittoBroker`` writes a config into a temporary directory, starts
``mosquitto -c`` on a free 127.0.0.1 port, waits until the port accepts
connections, and stops it by PID (SIGTERM, then SIGKILL). ``restart`` brings it
back on the same port with the same persistence file, so retained messages and
persistent sessions survive (mosquitto saves its database on SIGTERM).

Variants: plain TCP with anonymous clients, or TLS with client certificates
(``require_certificate``, ``use_identity_as_username``: the certificate's CN is
the MQTT username) and the per-device ACL of docs/fleet-protocol.md.
``TlsMaterial`` generates the CA, the server certificate (SAN 127.0.0.1) and
per-identity client certificates with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONTROLLER_IDENTITY = "controller"
DEVICE_PUBLISH_KINDS = ("reported", "jobs", "health", "drift", "errors")
DEVICE_SUBSCRIBE_KINDS = ("desired", "artifacts")


def find_mosquitto() -> str:
    """Path of the mosquitto binary (PATH first, then Debian's /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class TlsMaterial:
    """A test CA in ``directory`` that issues the broker's and the clients' certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=2)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent test CA")])
        self._ca_name = ca_name
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_cert = directory / "ca.crt"
        self.ca_cert.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        server = self._issue("127.0.0.1", server=True)
        self.server_cert = server.cert
        self.server_key = server.key
        self._clients: dict[str, ClientCert] = {}

    def _issue(self, common_name: str, *, server: bool) -> ClientCert:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            stem = "server"
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            stem = f"client-{common_name}"
        cert = builder.sign(self._ca_key, hashes.SHA256())
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return ClientCert(cert_path, key_path)

    def client(self, identity: str) -> ClientCert:
        """The client certificate (CN = ``identity``) and key, issued on first use."""
        if identity not in self._clients:
            self._clients[identity] = self._issue(identity, server=False)
        return self._clients[identity]

    def foreign_client(self, identity: str) -> ClientCert:
        """A certificate with CN ``identity`` from a CA the broker does not trust."""
        other = TlsMaterial(self.directory / f"foreign-{identity}")
        return other.client(identity)


# --------------------------------------------------------------------------- ACL


def fleet_acl(prefix: str = "edge", controller: str = CONTROLLER_IDENTITY) -> str:
    """The per-device ACL of docs/fleet-protocol.md as a mosquitto ``acl_file``.

    Pattern lines apply to every client with ``%u`` replaced by its username (the
    certificate CN); the controller identity may read and write the whole tree,
    including through ``$share`` subscriptions.
    """
    lines = [
        "# generated by tests/mqtt_broker.py: per-device ACL of docs/fleet-protocol.md",
        f"user {controller}",
        f"topic readwrite {prefix}/#",
        f"topic read $share/+/{prefix}/#",
        "",
    ]
    lines += [f"pattern write {prefix}/devices/%u/{kind}" for kind in DEVICE_PUBLISH_KINDS]
    lines.append(f"pattern write {prefix}/artifacts/request/%u")
    lines += [f"pattern read {prefix}/devices/%u/{kind}" for kind in DEVICE_SUBSCRIBE_KINDS]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- broker


class MosquittoBroker:
    """One mosquitto process with a generated config; ``port`` is fixed across restarts."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: TlsMaterial | None = None,
        acl: str | None = None,
        prefix: str = "edge",
        port: int | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.prefix = prefix
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.persistence_dir = directory / "persistence"
        self.persistence_dir.mkdir(exist_ok=True)
        self.acl_path: Path | None = None
        if acl is None and tls is not None:
            acl = fleet_acl(prefix)
        if acl is not None:
            self.acl_path = directory / "acl"
            self.acl_path.write_text(acl)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            "autosave_interval 60",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "set_tcp_nodelay true",
            "max_queued_messages 10000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto', locked out of tmp
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        else:
            lines.append("allow_anonymous true")
        if self.acl_path is not None:
            lines.append(f"acl_file {self.acl_path}")
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- life cycle -------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.running():
            raise RuntimeError("broker already running")
        with (self.directory / "stderr.log").open("ab") as stderr:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.directory,
            )
        self.starts += 1
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the port accepts TCP connections; raise if mosquitto died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited before accepting connections:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"mosquitto not accepting on {self.port} in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID (mosquitto saves its persistence file), SIGKILL if it lingers."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL by PID: a crash, nothing saved since the last autosave."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restart(self, down_s: float = 0.0, timeout: float = 10.0) -> MosquittoBroker:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start(timeout)

    def log(self) -> str:
        """The tail of mosquitto's log file and stderr (for failure messages)."""
        text = ""
        for path in (self.log_path, self.directory / "stderr.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text[-8000:]

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- pytest fixtures
# Registered in tests/conftest.py. Every broker a fixture starts is stopped by PID
# at teardown, whatever the test did to it.


class BrokerFactory:
    """Starts brokers under one directory and remembers them for teardown."""

    def __init__(self, directory: Path, tls: TlsMaterial) -> None:
        self.directory = directory
        self.tls = tls
        self.brokers: list[MosquittoBroker] = []

    def __call__(
        self, *, tls: bool = False, acl: str | None = None, prefix: str = "edge"
    ) -> MosquittoBroker:
        broker = MosquittoBroker(
            self.directory / f"broker-{len(self.brokers)}",
            tls=self.tls if tls else None,
            acl=acl,
            prefix=prefix,
        )
        self.brokers.append(broker)
        return broker.start()

    def stop_all(self) -> None:
        for broker in self.brokers:
            broker.stop()


@pytest.fixture(scope="session")
def mqtt_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A test CA with the broker's certificate; ``.client(id)`` issues device certificates."""
    return TlsMaterial(tmp_path_factory.mktemp("mqtt-tls"))


@pytest.fixture
def mosquitto_factory(tmp_path: Path, mqtt_tls: TlsMaterial) -> Iterator[BrokerFactory]:
    """``mosquitto_factory(tls=True)`` starts another broker; all are stopped at teardown."""
    factory = BrokerFactory(tmp_path / "mosquitto", mqtt_tls)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def mqtt_broker(mosquitto_factory: BrokerFactory) -> MosquittoBroker:
    """A running plain-TCP mosquitto (anonymous, no ACL) on a free 127.0.0.1 port."""
    return mosquitto_factory()


@pytest.fixture
def mqtt_tls_broker(mosquitto_factory: BrokerFactory) -> MosquittoBroker:
    """A running mosquitto with mutual TLS (CN = username) and the fleet's per-device ACL."""
    return mosquitto_factory(tls=True)
