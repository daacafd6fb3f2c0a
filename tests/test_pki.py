"""``edge-controller pki``: the fleet CA, certificates, the CRL and the mosquitto
configuration it writes, run for real.

The CLI runs as a subprocess; mosquitto runs the generated ``mosquitto.conf`` as
written (only the port, the bind address, the persistence directory and the log
file are chosen by flags), and real MQTT clients connect with the certificates
the CLI issued: a device reaches its own topics and no others, a controller the
whole tree (including ``$share``), and a revoked device is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.controller.broker_config import fleet_acl
from agent.mqtt.client import Message, MqttClient, MqttError, MqttSettings
from tests.controller_process import run_controller
from tests.mqtt_broker import find_mosquitto, free_port
from tests.mqtt_broker import fleet_acl as helper_acl

pytestmark = pytest.mark.timeout(120)

DEVICES = ("dev-a", "dev-b", "dev-c")


def pki(*args: str) -> subprocess.CompletedProcess[str]:
    return run_controller(["pki", *args], timeout=30)


def ok(*args: str) -> str:
    done = pki(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@dataclass
class Fleet:
    pki: Path
    out: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def generate(self) -> None:
        args = ["mosquitto", "--dir", str(self.pki), "--out", str(self.out)]
        args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--persistence-dir", str(self.out / "persistence")]
        args += ["--log-dest", f"file {self.out / 'mosquitto.log'}"]
        if os.geteuid() == 0:
            args += ["--user", "root"]  # else mosquitto drops to 'mosquitto', locked out of tmp
        ok(*args)

    def start(self) -> None:
        (self.out / "persistence").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.out / "mosquitto.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.out / "stderr.log").open("ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto not listening on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def reload(self) -> None:
        """SIGHUP (``systemctl reload mosquitto``): mosquitto rereads the ACL and the CRL."""
        assert self.proc is not None
        before = self.log().count("Reloading config")
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log().count("Reloading config") == before:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        time.sleep(0.2)  # the line comes first, then the listeners' TLS contexts

    def log(self) -> str:
        text = ""
        for name in ("mosquitto.log", "stderr.log"):
            path = self.out / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-6000:]

    def settings(self, folder: str, cn: str, **extra: Any) -> MqttSettings:
        return MqttSettings(
            host="127.0.0.1",
            port=self.port,
            client_id=extra.pop("client_id", cn),
            tls_ca=str(self.pki / "ca.crt"),
            tls_cert=str(self.pki / folder / f"{cn}.crt"),
            tls_key=str(self.pki / folder / f"{cn}.key"),
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
            **extra,
        )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    directory = tmp_path / "pki"
    ok("init", str(directory))
    ok("broker", "--dir", str(directory), "--host", "broker.example", "--loopback")
    ok("controller", "--dir", str(directory), "main")
    for device in DEVICES:
        ok("device", "--dir", str(directory), device)
    made = Fleet(directory, tmp_path / "mosquitto", free_port())
    made.generate()
    made.start()
    try:
        yield made
    finally:
        made.stop()


async def _connected(settings: MqttSettings) -> MqttClient:
    client = MqttClient(settings)
    await client.start()
    await client.wait_connected(10)
    return client


async def _drain(client: MqttClient, seconds: float = 1.0) -> list[Message]:
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            got.append(await asyncio.wait_for(client.messages.get(), left))
        except TimeoutError:
            break
    return got


async def _refused(settings: MqttSettings) -> None:
    client = MqttClient(settings)
    await client.start()
    try:
        with pytest.raises(MqttError, match="no connection"):
            await client.wait_connected(3)
        assert client.connection_count == 0
    finally:
        await client.stop()


# --------------------------------------------------------------------------- the broker


def test_a_device_reaches_its_own_topics_and_no_others(fleet: Fleet) -> None:
    async def body() -> None:
        ctl = await _connected(fleet.settings("controllers", "controller-main"))
        a = await _connected(fleet.settings("devices", "dev-a"))
        b = await _connected(fleet.settings("devices", "dev-b"))
        try:
            await ctl.subscribe("edge/#")
            await ctl.publish("edge/devices/dev-b/desired", b"for b", retain=True)
            await ctl.publish("edge/devices/dev-a/desired", b"for a", retain=True)
            await a.subscribe("edge/devices/+/desired")
            await a.subscribe("edge/devices/dev-b/artifacts")
            await ctl.publish("edge/devices/dev-b/artifacts", b"chunk for b")
            for forged in (
                "edge/devices/dev-b/reported",
                "edge/artifacts/request/dev-b",
                "edge/devices/dev-a/desired",  # only controllers write desired state
                "edge/other",
            ):
                with pytest.raises(MqttError, match="Not authorized"):
                    await a.publish(forged, b"forged by a")
            for kind in ("reported", "jobs", "health", "drift", "errors"):
                await a.publish(f"edge/devices/dev-a/{kind}", kind.encode())
            await a.publish("edge/artifacts/request/dev-a", b"request")
            seen_a = await _drain(a)
            seen_ctl = await _drain(ctl, 0.3)
            assert [m.payload for m in seen_a] == [b"for a"]
            assert {m.topic for m in seen_ctl} >= {
                "edge/devices/dev-a/reported",
                "edge/artifacts/request/dev-a",
            }
            assert b"forged by a" not in [m.payload for m in seen_ctl]
        finally:
            for client in (a, b, ctl):
                await client.stop()

    _run(body())


def test_the_controller_serves_requests_through_a_shared_subscription(fleet: Fleet) -> None:
    async def body() -> None:
        ctl = await _connected(fleet.settings("controllers", "controller-main"))
        device = await _connected(fleet.settings("devices", "dev-a"))
        try:
            await ctl.subscribe("$share/edge-controllers/edge/artifacts/request/+")
            for i in range(5):
                await device.publish("edge/artifacts/request/dev-a", f"r{i}".encode())
            got = await _drain(ctl)
            assert sorted(m.payload for m in got) == [f"r{i}".encode() for i in range(5)]
        finally:
            await device.stop()
            await ctl.stop()

    _run(body())


def test_a_revoked_device_is_refused(fleet: Fleet) -> None:
    async def before() -> None:
        client = await _connected(fleet.settings("devices", "dev-c"))
        await client.stop()

    _run(before())
    out = ok("revoke", "--dir", str(fleet.pki), "dev-c")
    assert "revoked dev-c" in out
    fleet.generate()
    assert fleet.proc is not None
    fleet.reload()

    async def after() -> None:
        await _refused(fleet.settings("devices", "dev-c", client_id="dev-c-again"))
        still = await _connected(fleet.settings("devices", "dev-a"))
        await still.stop()

    _run(after())
    # A new certificate for the same device id connects again (a re-provisioned device).
    ok("device", "--dir", str(fleet.pki), "dev-c")
    _run(before())


def test_a_revoked_controller_loses_the_controllers_rights(fleet: Fleet) -> None:
    ok("controller", "--dir", str(fleet.pki), "spare")
    ok("revoke", "--dir", str(fleet.pki), "controller-main")
    fleet.generate()
    acl = (fleet.out / "acl").read_text()
    assert "user controller-spare" in acl and "controller-main" not in acl
    fleet.stop()
    fleet.start()

    async def body() -> None:
        await _refused(fleet.settings("controllers", "controller-main"))
        spare = await _connected(fleet.settings("controllers", "controller-spare"))
        try:
            await spare.publish("edge/devices/dev-a/desired", b"from spare", retain=True)
        finally:
            await spare.stop()

    _run(body())


def test_a_client_of_another_ca_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    other = tmp_path / "other-pki"
    ok("init", str(other))
    ok("device", "--dir", str(other), "dev-a")
    settings = dataclasses.replace(
        fleet.settings("devices", "dev-a", client_id="foreign"),
        tls_cert=str(other / "devices" / "dev-a.crt"),
        tls_key=str(other / "devices" / "dev-a.key"),
    )
    _run(_refused(settings))


# --------------------------------------------------------------------------- the files


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_names_identities_and_key_modes(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ok("init", str(directory))
    assert pki("init", str(directory)).returncode == 1  # never overwrites a CA
    ok("broker", "--dir", str(directory), "--host", "mqtt.plant.example", "--host", "10.0.0.5")
    broker = _cert(directory / "broker" / "mqtt.plant.example.crt")
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["mqtt.plant.example", "10.0.0.5"]
    assert "controller-main" in ok("controller", "--dir", str(directory), "main")
    assert "controller-2" in ok("controller", "--dir", str(directory), "controller-2")
    ok("device", "--dir", str(directory), "plant-a.line-3_07")
    device = _cert(directory / "devices" / "plant-a.line-3_07.crt")
    cn = device.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "plant-a.line-3_07"
    for bad in ("controller-x", "Controller", "a b", "x" * 65, "dev/1", "dev\n"):
        done = pki("device", "--dir", str(directory), bad)
        assert done.returncode == 2, (bad, done.stderr)
    assert pki("controller", "--dir", str(directory), "a/b").returncode == 2
    assert pki("broker", "--dir", str(directory), "--host", "bad name").returncode == 2
    for key in [directory / "ca.key", *directory.glob("*/*.key")]:
        assert key.stat().st_mode & 0o777 == 0o600, key
    index = json.loads((directory / "index.json").read_text())
    assert [e["kind"] for e in index["certificates"]] == [
        "broker",
        "controller",
        "controller",
        "device",
    ]


def test_the_crl_lists_what_was_revoked(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ok("init", str(directory))
    ok("device", "--dir", str(directory), "dev-a")
    ok("device", "--dir", str(directory), "dev-b")
    assert pki("revoke", "--dir", str(directory), "dev-z").returncode == 1
    ok("revoke", "--dir", str(directory), "dev-a")
    crl = x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())
    ca = _cert(directory / "ca.crt")
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    revoked = _cert(directory / "devices" / "dev-a.crt").serial_number
    kept = _cert(directory / "devices" / "dev-b.crt").serial_number
    assert crl.get_revoked_certificate_by_serial_number(revoked) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept) is None
    assert "revoked" in ok("list", "--dir", str(directory))
    assert pki("revoke", "--dir", str(directory), "dev-a").returncode == 1  # already
    # Rotation: a second certificate for dev-b, then only the old one is revoked.
    ok("device", "--dir", str(directory), "dev-b")
    new = _cert(directory / "devices" / "dev-b.crt").serial_number
    ok("revoke", "--dir", str(directory), "dev-b", "--serial", format(kept, "x"))
    crl = x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(kept) is not None
    assert crl.get_revoked_certificate_by_serial_number(new) is None


def test_mosquitto_needs_a_broker_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ok("init", str(directory))
    done = pki("mosquitto", "--dir", str(directory), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "pki broker" in done.stderr


def test_the_generated_acl_is_the_one_the_broker_tests_check() -> None:
    """tests/test_broker_acl.py attacks tests/mqtt_broker.py's ACL; the operator's is the same."""

    def rules(text: str) -> set[str]:
        return {line for line in text.splitlines() if line and not line.startswith("#")}

    assert rules(fleet_acl("edge", ["controller"])) == rules(helper_acl("edge"))
    assert rules(fleet_acl("plant/a", ["controller"])) == rules(helper_acl("plant/a"))


def _openssl_csr(directory: Path, cn: str) -> tuple[Path, Path]:
    """A key and a CSR made the way a device would make them, with openssl."""
    key, csr = directory / f"{cn}.key", directory / f"{cn}.csr"
    out = ["-out", str(csr)]
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(
        ["openssl", "req", "-new", *new_key, "-keyout", str(key), "-subj", f"/CN={cn}", *out],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return key, csr


def test_a_device_key_that_never_left_the_device(fleet: Fleet, tmp_path: Path) -> None:
    key, csr = _openssl_csr(tmp_path, "dev-own")
    out = ok("device", "--dir", str(fleet.pki), "dev-own", "--csr", str(csr))
    assert "key " not in out and not (fleet.pki / "devices" / "dev-own.key").exists()
    assert pki("device", "--dir", str(fleet.pki), "dev-other", "--csr", str(csr)).returncode == 2
    settings = dataclasses.replace(fleet.settings("devices", "dev-own"), tls_key=str(key))

    async def body() -> None:
        client = await _connected(settings)
        try:
            await client.publish("edge/devices/dev-own/reported", b"hello")
            with pytest.raises(MqttError, match="Not authorized"):
                await client.publish("edge/devices/dev-a/reported", b"forged")
        finally:
            await client.stop()

    _run(body())


def test_a_ca_key_under_a_passphrase(tmp_path: Path) -> None:
    secret = tmp_path / "ca.pass"
    secret.write_text("correct horse battery staple\n")
    directory = tmp_path / "pki"
    ok("init", str(directory), "--passphrase-file", str(secret))
    assert b"ENCRYPTED PRIVATE KEY" in (directory / "ca.key").read_bytes()
    done = pki("device", "--dir", str(directory), "dev-a")
    assert done.returncode == 1 and "passphrase" in done.stderr
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("nope\n")
    assert (
        pki("device", "--dir", str(directory), "dev-a", "--passphrase-file", str(wrong)).returncode
        == 1
    )
    ok("device", "--dir", str(directory), "dev-a", "--passphrase-file", str(secret))
