"""The controller's artifact store: content-addressed blobs plus one manifest per version.

Layout under the store directory::

    blobs/sha256/<hex>                 every published file, named by its SHA-256
    models/<name>/<version>.json       the version's manifest (files, config, signer)
    deployments/<sequence>-<id>.json   every deployment issued (document, envelope, the
                                       envelope's bytes as published)
    sequence                           the last deployment sequence number issued

``publish`` verifies the version directory's OpenSSF model signature against the
model-signing trust store first, then copies every signed file and ``model.sig``
into the blob store, re-hashing while copying (a file changed after verification
is refused). A published version is immutable: publishing the same name and
version again succeeds only with identical content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.common import durable
from agent.errors import AgentError
from agent.protocol.deployment import check_file_path
from agent.protocol.topics import SCHEMA_VERSION, SHA256_HEX, encode_json, is_model_name
from agent.signing.identity import ModelIdentity
from agent.signing.keys import TrustStore
from agent.signing.oms import SIGNATURE_FILENAME
from agent.signing.version_dir import verify_version

MANIFEST_SCHEMA: Final = "edge.model_manifest"
CONFIG_PATH: Final = "config.pbtxt"
COPY_CHUNK_BYTES: Final = 1024 * 1024
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024


class StoreError(AgentError):
    """The artifact store cannot do what was asked (bad name, I/O error, conflict)."""

    code = "store_error"


class ArtifactNotFoundError(StoreError):
    """No such model version or blob in the store."""

    code = "not_found"


class PublishConflictError(StoreError):
    """The model version is already published with different content."""

    code = "publish_conflict"


class FileChangedError(StoreError):
    """A file changed between signature verification and copying."""

    code = "file_changed"


@dataclass(frozen=True)
class StoredFile:
    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ModelManifest:
    """What the store knows about one published model version."""

    name: str
    version: int
    files: tuple[StoredFile, ...]  # every file of the version directory, model.sig included
    config: StoredFile | None  # the model's config.pbtxt, if it has one
    signed_by: str  # key id of the model-signing key that signed the version
    published_at: float

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files) + (self.config.size if self.config else 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "version": SCHEMA_VERSION,
            "name": self.name,
            "model_version": self.version,
            "files": [f.to_json() for f in self.files],
            "config": self.config.to_json() if self.config else None,
            "signed_by": self.signed_by,
            "published_at": self.published_at,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> ModelManifest:
        try:
            if data["schema"] != MANIFEST_SCHEMA or data["version"] != SCHEMA_VERSION:
                raise StoreError(f"{source}: not an {MANIFEST_SCHEMA} v{SCHEMA_VERSION}")
            files = tuple(_stored_file(f) for f in data["files"])
            config = _stored_file(data["config"]) if data["config"] is not None else None
            return cls(
                name=str(data["name"]),
                version=int(data["model_version"]),
                files=files,
                config=config,
                signed_by=str(data["signed_by"]),
                published_at=float(data["published_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{source}: malformed manifest ({exc!r})") from None

    def same_content(self, other: ModelManifest) -> bool:
        return (self.name, self.version, self.files, self.config) == (
            other.name,
            other.version,
            other.files,
            other.config,
        )


def _stored_file(data: Any) -> StoredFile:
    sha = str(data["sha256"])
    if not SHA256_HEX.match(sha):
        raise ValueError(f"bad sha256 {sha!r}")
    return StoredFile(str(data["path"]), sha, int(data["size"]))


def check_model_version(name: str, version: int) -> None:
    if not is_model_name(name):
        raise StoreError(
            f"model name {name!r}: 1-128 letters, digits, '_', '.' or '-' "
            "(not starting with '.' or '-', no '..')"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**53:
        raise StoreError(f"model version {version!r}: a positive integer")


def write_atomically(path: Path, data: bytes) -> None:
    """``agent.common.durable.write_atomically``, creating the directory; StoreError on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_atomically(path, data, mode=0o644)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None


PublishProgress = Callable[[str, int, int], None]  # phase, bytes so far, total bytes


class _Counter:
    """Adds up chunk lengths for one phase of a :data:`PublishProgress`."""

    def __init__(self, report: PublishProgress, phase: str, total: int) -> None:
        self.report = report
        self.phase = phase
        self.total = total
        self.done = 0

    def __call__(self, count: int) -> None:
        self.done += count
        self.total = max(self.total, self.done)
        self.report(self.phase, self.done, self.total)


def _sizes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def _tree_bytes(directory: Path) -> int:
    """Bytes of the regular files under ``directory`` but the signature (an estimate)."""
    total = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            if root == str(directory) and name == SIGNATURE_FILENAME:
                continue
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


class ArtifactStore:
    """A directory of content-addressed blobs and version manifests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.models = root / "models"
        self.deployments = root / "deployments"

    # -- blobs ------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise StoreError(f"{sha256!r} is not a lower-case hex SHA-256 digest")
        return self.blobs / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def _copy_into_blobs(
        self, source: Path, expected: str | None, progress: Callable[[int], None] | None = None
    ) -> StoredFile:
        """Copy ``source`` into the blob store; its digest must equal ``expected`` if given.

        ``progress`` gets the length of each chunk copied."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        temp = self.blobs / f".incoming.{secrets.token_hex(8)}"
        hasher = hashlib.sha256()
        size = 0
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as src, temp.open("xb") as dst:
                while chunk := src.read(COPY_CHUNK_BYTES):
                    hasher.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            digest = hasher.hexdigest()
            if expected is not None and digest != expected:
                raise FileChangedError(
                    f"{source}: changed after its signature was verified "
                    f"(SHA-256 {digest}, signed {expected}); publish again"
                )
            target = self.blobs / digest
            if target.exists():
                temp.unlink()
            else:
                os.chmod(temp, 0o444)
                os.replace(temp, target)
                durable.fsync_dir(self.blobs)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(f"cannot copy {source} into the store: {reason}") from None
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        return StoredFile("", digest, size)

    @contextlib.contextmanager
    def open_blob(self, sha256: str) -> Iterator[int]:
        """An O_RDONLY descriptor on the blob; raises ArtifactNotFoundError if absent."""
        try:
            fd = os.open(self.blob_path(sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no blob {sha256}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    # -- versions ---------------------------------------------------------

    def manifest_path(self, name: str, version: int) -> Path:
        check_model_version(name, version)
        return self.models / name / f"{version}.json"

    def manifest(self, name: str, version: int) -> ModelManifest:
        path = self.manifest_path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"model {name} version {version} is not published in {self.root}"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{path}: not JSON ({exc})") from None
        return ModelManifest.from_json(parsed, str(path))

    def versions(self) -> list[tuple[str, int]]:
        """Every published ``(model, version)``, sorted."""
        found: list[tuple[str, int]] = []
        if not self.models.is_dir():
            return found
        for model_dir in sorted(self.models.iterdir()):
            for entry in model_dir.glob("*.json"):
                if entry.stem.isdigit():
                    found.append((model_dir.name, int(entry.stem)))
        return sorted(found)

    def publish(
        self,
        version_dir: Path,
        name: str,
        version: int,
        trust: TrustStore,
        config_path: Path | None = None,
        progress: PublishProgress | None = None,
    ) -> ModelManifest:
        """Verify ``version_dir`` against ``trust`` and add it to the store as NAME/VERSION.

        ``config_path`` defaults to ``config.pbtxt`` in the directory above the
        version directory (Triton's layout), if there is one. ``progress`` is
        told ``("verify" | "copy", bytes so far, total bytes)`` as the files are
        hashed, then copied.
        """
        check_model_version(name, version)
        if config_path is None:
            candidate = version_dir.parent / CONFIG_PATH
            config_path = candidate if candidate.is_file() else None
        verify_counter = copy_counter = None
        if progress is not None:
            # The listing's size is an estimate (files the signer excluded are not
            # hashed); the phase ends at the verified total.
            verify_counter = _Counter(progress, "verify", _tree_bytes(version_dir))
        # The files must be signed as NAME/VERSION (identity.json), not as another version.
        verified = verify_version(
            version_dir, trust, progress=verify_counter, identity=ModelIdentity(name, version)
        )
        if progress is not None:
            progress("verify", verified.total_bytes, verified.total_bytes)
            extra = [version_dir / SIGNATURE_FILENAME, *([config_path] if config_path else [])]
            copy_counter = _Counter(progress, "copy", verified.total_bytes + _sizes(extra))
        files: list[StoredFile] = []
        for rel in sorted(verified.manifest):
            check_file_path(rel, f"{version_dir}/{rel}")  # what a device accepts
            stored = self._copy_into_blobs(
                version_dir / rel, verified.manifest[rel], copy_counter
            )
            files.append(StoredFile(rel, stored.sha256, stored.size))
        signature = self._copy_into_blobs(version_dir / SIGNATURE_FILENAME, None, copy_counter)
        files.append(StoredFile(SIGNATURE_FILENAME, signature.sha256, signature.size))
        config = None
        if config_path is not None:
            stored = self._copy_into_blobs(config_path, None, copy_counter)
            config = StoredFile(CONFIG_PATH, stored.sha256, stored.size)
        manifest = ModelManifest(
            name=name,
            version=version,
            files=tuple(sorted(files, key=lambda f: f.path)),
            config=config,
            signed_by=verified.key_id,
            published_at=time.time(),
        )
        path = self.manifest_path(name, version)
        with self._locked():
            if path.exists():
                existing = self.manifest(name, version)
                if existing.same_content(manifest):
                    return existing
                raise PublishConflictError(
                    f"model {name} version {version} is already published with different "
                    "content; publish a new version number"
                )
            write_atomically(path, json.dumps(manifest.to_json(), indent=2).encode() + b"\n")
        return manifest

    # -- deployments ------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the store (publish, sequence numbers) across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def last_sequence(self) -> int:
        try:
            text = (self.root / "sequence").read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot read the sequence file: {exc.strerror}") from None
        if not text.isdigit():
            raise StoreError(f"{self.root / 'sequence'}: {text!r} is not a sequence number")
        return int(text)

    def next_sequence(self, at_least: int = 0) -> int:
        """Issue the next deployment sequence number (strictly increasing, durable).

        Seeded from the clock (milliseconds) so a fresh store never reissues a
        number that a previous store gave devices.
        """
        with self._locked():
            sequence = max(self.last_sequence() + 1, at_least, int(time.time() * 1000))
            write_atomically(self.root / "sequence", f"{sequence}\n".encode())
        return sequence

    def record_deployment(
        self, deployment: dict[str, Any], envelope: dict[str, Any], payload: bytes
    ) -> Path:
        """Record an issued deployment; ``payload`` is the envelope exactly as published.

        Devices recognise a deployment they have seen by the SHA-256 of those bytes,
        so a republication (rollout takeover, crash recovery) must send them
        unchanged: the record's ``envelope`` is re-encoded (sorted keys) and would not do.
        """
        path = self.deployments / f"{deployment['sequence']}-{deployment['deployment_id']}.json"
        record = {"deployment": deployment, "envelope": envelope, "published": payload.decode()}
        write_atomically(path, encode_json(record))
        return path
