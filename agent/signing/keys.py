"""Model-signing keys: generation, PEM loading and the trust store.

Keys are ECDSA P-256 only. Private keys are PKCS#8 PEM, optionally encrypted
with a passphrase, written with mode 0600; public keys are SubjectPublicKeyInfo
PEM. The trust store is a directory of ``*.pem`` public keys named in the config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import AgentError, VerificationError
from agent.signing.oms import (
    KeyFormatError,
    key_id,
    require_p256_private_key,
    require_p256_public_key,
)

PRIVATE_KEY_SUFFIX: Final = ".key.pem"
PUBLIC_KEY_SUFFIX: Final = ".pub.pem"
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}\Z")  # \Z: no trailing newline
_MAX_KEY_FILE_BYTES = 64 * 1024


class TrustStoreError(VerificationError):
    """The trust store directory is missing, unreadable or holds no keys."""

    code = "trust_store_invalid"


class KeyWriteError(AgentError):
    """A key pair could not be written (target exists, bad name, I/O error)."""

    code = "key_write_failed"


@dataclass(frozen=True)
class KeyPairFiles:
    private_key: Path
    public_key: Path
    key_id: str


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key: ec.EllipticCurvePublicKey
    source: str  # the file it came from (for messages)


# --------------------------------------------------------------------------- generation


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with the best available scheme if a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM (the encoding the key id is computed over)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only narrow the mode; make it exact
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_pair(
    out_dir: Path, name: str = "model-signing", passphrase: bytes | None = None
) -> KeyPairFiles:
    """Generate a P-256 key pair into ``out_dir/NAME.key.pem`` (0600) and ``NAME.pub.pem``.

    Never overwrites an existing file.
    """
    if not _KEY_NAME.fullmatch(name):
        raise KeyWriteError(
            f"key name {name!r} must be letters, digits, '_', '.' or '-' (no path separators)"
        )
    if passphrase is not None and not passphrase:
        raise KeyWriteError("the passphrase is empty")
    private_path = out_dir / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyWriteError(f"{path} already exists; refusing to overwrite a key")
    key = generate_private_key()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_new_file(private_path, private_key_pem(key, passphrase), 0o600)
        try:
            _write_new_file(public_path, public_key_pem(key.public_key()), 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)
            raise
        dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError as exc:
        raise KeyWriteError(f"{exc.filename} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyWriteError(f"cannot write key pair into {out_dir}: {exc.strerror}") from None
    return KeyPairFiles(private_path, public_path, key_id(key.public_key()))


# --------------------------------------------------------------------------- loading


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFormatError(f"{path}: cannot read key file: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFormatError(f"{path}: larger than {_MAX_KEY_FILE_BYTES} bytes, not a PEM key")
    return data


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase in ``path``, without one trailing newline."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"{path}: cannot read passphrase file: {exc.strerror}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise KeyFormatError(f"{path}: the passphrase file is empty")
    return data


def parse_public_key_pem(data: bytes, source: str) -> ec.EllipticCurvePublicKey:
    """An ECDSA P-256 public key from PEM bytes; ``source`` names it in errors."""
    if b"PRIVATE KEY-----" in data:
        raise KeyFormatError(
            f"{source}: is a private key; a trust store or --public-key needs the public key"
        )
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise KeyFormatError(
            f"{source}: is a certificate; extract its public key "
            "(openssl x509 -pubkey -noout) to trust it"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"{source}: not a PEM public key ({exc})") from None
    except Exception as exc:  # the backend raises UnsupportedAlgorithm for odd key types
        raise KeyFormatError(f"{source}: unsupported public key ({exc})") from None
    return require_p256_public_key(key, source)


def parse_private_key_pem(
    data: bytes, source: str, passphrase: bytes | None = None
) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 private key from PEM bytes (PKCS#8 or SEC1)."""
    if b"PRIVATE KEY-----" not in data:
        raise KeyFormatError(f"{source}: not a PEM private key")
    encrypted = b"ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise KeyFormatError(f"{source}: the private key is encrypted; give its passphrase")
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except ValueError:
        if encrypted:
            raise KeyFormatError(
                f"{source}: cannot decrypt the private key (wrong passphrase?)"
            ) from None
        raise KeyFormatError(f"{source}: not a valid PEM private key") from None
    except TypeError as exc:
        raise KeyFormatError(f"{source}: {exc}") from None
    except Exception as exc:  # UnsupportedAlgorithm for odd key types
        raise KeyFormatError(f"{source}: unsupported private key ({exc})") from None
    return require_p256_private_key(key, source)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load an ECDSA P-256 public key from a PEM file."""
    return parse_public_key_pem(_read_key_file(path), str(path))


def load_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an ECDSA P-256 private key from a PEM file (decrypting it with ``passphrase``)."""
    return parse_private_key_pem(_read_key_file(path), str(path), passphrase)


# --------------------------------------------------------------------------- trust store


class TrustStore:
    """The public keys the operator trusts to sign models, by key id."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for key in keys:
            self._keys.setdefault(key.key_id, key)

    @classmethod
    def from_public_keys(cls, keys: Iterable[tuple[ec.EllipticCurvePublicKey, str]]) -> TrustStore:
        """From ``(public_key, source)`` pairs (source names the key in messages)."""
        trusted = []
        for key, source in keys:
            p256 = require_p256_public_key(key, source)
            trusted.append(TrustedKey(key_id(p256), p256, source))
        return cls(trusted)

    @classmethod
    def from_public_key_files(cls, paths: Iterable[Path]) -> TrustStore:
        """Trust exactly the given PEM public key files."""
        return cls.from_public_keys((load_public_key(path), path.name) for path in paths)

    @classmethod
    def from_directory(cls, directory: Path) -> TrustStore:
        """Trust every ``*.pem`` public key in ``directory`` (not recursive).

        Any ``*.pem`` file that is not an ECDSA P-256 public key stops loading with
        an error naming it; an empty directory is an error too.
        """
        if not directory.is_dir():
            raise TrustStoreError(f"trust store {directory} is not a directory")
        try:
            paths = sorted(p for p in directory.iterdir() if p.suffix == ".pem" and p.is_file())
        except OSError as exc:
            raise TrustStoreError(f"cannot list trust store {directory}: {exc.strerror}") from None
        if not paths:
            raise TrustStoreError(f"trust store {directory} holds no *.pem public keys")
        return cls.from_public_key_files(paths)

    @property
    def public_keys(self) -> tuple[ec.EllipticCurvePublicKey, ...]:
        return tuple(key.public_key for key in self._keys.values())

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def describe(self, kid: str) -> str:
        """``<key id> (<source file>)`` for a trusted key, or the bare id."""
        key = self._keys.get(kid)
        return f"{kid} ({key.source})" if key else kid

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)
