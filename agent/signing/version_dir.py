"""Signing and verifying a model version directory on disk (the I/O adapter).

``verify_version`` reads ``model.sig``, verifies it with :mod:`agent.signing.oms`,
checks that the directory holds exactly the signed files and that each file's
SHA-256 matches. Files are streamed through SHA-256 in bounded chunks, except
the ones the caller wants to load: those are read into memory once, hashed from
that buffer and handed back, so the bytes onnxruntime gets are the bytes that
were verified.

Directory policy:

* Every path is opened relative to a directory file descriptor, one component
  at a time, with ``O_NOFOLLOW``: a component swapped for a symlink after
  listing is refused rather than followed.
* Symlinks are refused, whether they escape the directory
  (``file_symlink_escapes``) or not (``file_symlink``). The reference tool
  refuses them by default too, so no interoperable signature needs them; a
  link can be re-pointed after verification; and Triton version directories
  hold plain files.
* Special files (FIFOs, sockets, devices) are refused: they have no stable
  content and opening a FIFO could block.
* Paths the signer excluded (``ignore_paths`` in the signed statement; the
  reference tool excludes ``model.sig`` and git metadata at the top level) are
  skipped without being opened, and listed in ``VerifiedVersion.ignored``. They
  are never part of the manifest, so they can never be loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.common.buffers import FileBytes, read_whole
from agent.common.durable import write_atomically
from agent.errors import VerificationError
from agent.signing import oms
from agent.signing.identity import (
    IDENTITY_FILENAME,
    MAX_IDENTITY_BYTES,
    IdentityMalformedError,
    ModelIdentity,
    check_identity,
    encode_identity,
    identity_of_path,
    parse_identity,
    version_of_path,
)
from agent.signing.keys import TrustStore

SIGNATURE_FILENAME: Final = oms.SIGNATURE_FILENAME
MAX_SIGNATURE_BYTES: Final = 32 * 1024 * 1024
HASH_CHUNK_BYTES: Final = 1024 * 1024
# Entries listed in a version directory (files and subdirectories, not counting
# what the signer excluded); the signature's resource count has the same bound.
MAX_ENTRIES: Final = oms.MAX_RESOURCES

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in after listing must not block; harmless for files.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class SymlinkRefusedError(VerificationError):
    """The version directory holds a symlink (refused even if it stays inside)."""

    code = "file_symlink"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, str(self)))


class SymlinkEscapesError(SymlinkRefusedError):
    """The version directory holds a symlink pointing outside it."""

    code = "file_symlink_escapes"


class SpecialFileError(VerificationError):
    """The version directory holds a FIFO, socket or device."""

    code = "file_special"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, str(self)))


class FileNotSignedError(VerificationError):
    """A file the caller asked to load is not covered by the signature."""

    code = "file_not_signed"


class TooManyFilesError(VerificationError):
    """The version directory holds more entries than one version may have."""

    code = "file_too_many"


class FileReadError(VerificationError):
    """A file or directory could not be read."""

    code = "file_unreadable"


@dataclass(frozen=True)
class VerifiedVersion:
    """A version directory whose signature and every file verified."""

    path: Path
    manifest: Mapping[str, str]  # relative path -> SHA-256 hex, as signed
    key_id: str  # id of the trusted key that signed it
    model_name: str  # subject name in the signed statement (informative)
    identity: ModelIdentity | None = None  # the signed identity.json, if the signature covers one
    contents: Mapping[str, FileBytes] = field(default_factory=dict)  # verified bytes of `load`
    ignored: tuple[str, ...] = ()  # entries present but excluded by the signer
    total_bytes: int = 0  # bytes hashed


# --------------------------------------------------------------------------- low-level I/O


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _open_root(version_dir: Path) -> int:
    try:
        return os.open(version_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileReadError(f"version directory {version_dir} does not exist") from None
    except NotADirectoryError:
        raise FileReadError(f"{version_dir} is not a directory") from None
    except OSError as exc:
        raise FileReadError(f"cannot open {version_dir}: {exc.strerror}") from None


def _open_beneath(root_fd: int, rel: str) -> int:
    """Open regular file ``rel`` under ``root_fd`` without following any symlink."""
    parts = rel.split("/")
    dir_fd = root_fd
    opened: list[int] = []
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                where = "/".join(parts[: index + 1])
                if exc.errno == errno.ELOOP or (
                    not last and exc.errno == errno.ENOTDIR and _is_symlink(dir_fd, part)
                ):
                    raise SymlinkRefusedError(
                        where, f"{where}: is a symlink (replaced after listing?); refused"
                    ) from None
                if exc.errno == errno.ENOENT:
                    raise oms.FileMissingError(
                        [rel], f"{rel}: disappeared while the directory was verified"
                    ) from None
                raise FileReadError(f"{where}: cannot open: {exc.strerror}") from None
            opened.append(fd)
            dir_fd = fd
        file_fd = opened.pop()
    finally:
        for fd in opened:
            os.close(fd)
    mode = os.fstat(file_fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(file_fd)
        raise SpecialFileError(rel, f"{rel}: is not a regular file")
    return file_fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _hash_stream(
    fd: int, buffer: bytearray, progress: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """SHA-256 and length of everything readable from ``fd``, in bounded chunks
    (``progress`` gets each chunk's length)."""
    hasher = hashlib.sha256()
    view = memoryview(buffer)
    total = 0
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        while True:
            count = handle.readinto(view)
            if not count:
                break
            hasher.update(view[:count])
            total += count
            if progress is not None:
                progress(count)
    return hasher.hexdigest(), total


def _hash_file(
    root_fd: int, rel: str, buffer: bytearray, progress: Callable[[int], None] | None = None
) -> tuple[str, int]:
    try:
        with _fd(_open_beneath(root_fd, rel)) as fd:
            return _hash_stream(fd, buffer, progress)
    except OSError as exc:
        raise FileReadError(f"{rel}: cannot read: {exc.strerror}") from None


def _load_file(root_fd: int, rel: str) -> FileBytes:
    try:
        with _fd(_open_beneath(root_fd, rel)) as fd:
            return read_whole(fd)
    except OSError as exc:
        raise FileReadError(f"{rel}: cannot read: {exc.strerror}") from None


def _read_signature(root_fd: int, version_dir: Path) -> bytes:
    try:
        fd = os.open(SIGNATURE_FILENAME, _FILE_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        raise oms.SignatureMissingError(
            f"{version_dir} is not signed: no {SIGNATURE_FILENAME}"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefusedError(
                SIGNATURE_FILENAME, f"{SIGNATURE_FILENAME}: is a symlink; refused"
            ) from None
        raise FileReadError(f"{SIGNATURE_FILENAME}: cannot open: {exc.strerror}") from None
    with _fd(fd):
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecialFileError(SIGNATURE_FILENAME, f"{SIGNATURE_FILENAME}: not a regular file")
        if info.st_size > MAX_SIGNATURE_BYTES:
            raise oms.BundleMalformedError(
                f"{SIGNATURE_FILENAME}: {info.st_size} bytes, more than {MAX_SIGNATURE_BYTES}"
            )
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            data = handle.read(info.st_size + 1)
    if data is None or len(data) > MAX_SIGNATURE_BYTES:
        raise oms.BundleMalformedError(
            f"{SIGNATURE_FILENAME}: larger than {MAX_SIGNATURE_BYTES} bytes"
        )
    return data


# --------------------------------------------------------------------------- listing


def _symlink_error(root: Path, parent_rel: str, rel: str, target: str) -> SymlinkRefusedError:
    if os.path.isabs(target):
        real_root = os.path.realpath(root)
        real_target = os.path.realpath(target)
        inside = real_target == real_root or real_target.startswith(real_root + os.sep)
    else:
        joined = os.path.normpath(os.path.join(parent_rel or ".", target))
        inside = joined != ".." and not joined.startswith("../")
    if inside:
        return SymlinkRefusedError(
            rel, f"{rel}: is a symlink (to {target!r}); symlinks are refused"
        )
    return SymlinkEscapesError(
        rel, f"{rel}: is a symlink escaping the version directory (to {target!r}); refused"
    )


def _list_files(
    root: Path, root_fd: int, ignore: Callable[[str], bool]
) -> tuple[dict[str, int], list[str]]:
    """Every regular file under ``root_fd`` (relative path -> size) and the ignored entries."""
    files: dict[str, int] = {}
    ignored: list[str] = []
    seen = 0
    pending: list[tuple[str, int]] = [("", os.dup(root_fd))]
    try:
        while pending:
            prefix, dir_fd = pending.pop()
            with _fd(dir_fd):
                try:
                    with os.scandir(dir_fd) as scan:
                        entries = sorted(scan, key=lambda e: e.name)
                except OSError as exc:
                    raise FileReadError(
                        f"{prefix or '.'}: cannot list directory: {exc.strerror}"
                    ) from None
                for entry in entries:
                    rel = f"{prefix}{entry.name}"
                    if ignore(rel):
                        ignored.append(rel)
                        continue
                    seen += 1
                    if seen > MAX_ENTRIES:
                        raise TooManyFilesError(
                            f"{root}: more than {MAX_ENTRIES} files and directories; refused"
                        )
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        target = os.readlink(entry.name, dir_fd=dir_fd)
                        raise _symlink_error(root, prefix.rstrip("/"), rel, target)
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            sub_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                        except OSError as exc:
                            raise FileReadError(f"{rel}: cannot open: {exc.strerror}") from None
                        pending.append((rel + "/", sub_fd))
                    elif stat.S_ISREG(st.st_mode):
                        files[rel] = st.st_size
                    else:
                        raise SpecialFileError(
                            rel, f"{rel}: is a special file (FIFO, socket or device); refused"
                        )
    finally:
        for _, fd in pending:
            os.close(fd)
    return files, ignored


# --------------------------------------------------------------------------- verification


def _read_identity(root_fd: int, manifest: Mapping[str, str]) -> ModelIdentity | None:
    """The signed identity.json (its digest checked), or None if the signature lists none."""
    if IDENTITY_FILENAME not in manifest:
        return None
    try:
        with _fd(_open_beneath(root_fd, IDENTITY_FILENAME)) as fd:
            if os.fstat(fd).st_size > MAX_IDENTITY_BYTES:
                digest, size = _hash_stream(fd, bytearray(HASH_CHUNK_BYTES))
                oms.check_digest(IDENTITY_FILENAME, manifest, digest)
                raise IdentityMalformedError(
                    f"{IDENTITY_FILENAME}: {size} bytes, more than {MAX_IDENTITY_BYTES}"
                )
            data = bytes(read_whole(fd))
    except OSError as exc:
        raise FileReadError(f"{IDENTITY_FILENAME}: cannot read: {exc.strerror}") from None
    oms.check_digest(IDENTITY_FILENAME, manifest, hashlib.sha256(data).hexdigest())
    return parse_identity(data)


def verify_version(
    version_dir: Path,
    trust: TrustStore,
    load: Collection[str] = (),
    progress: Callable[[int], None] | None = None,
    *,
    identity: ModelIdentity | None = None,
) -> VerifiedVersion:
    """Verify ``version_dir`` against ``trust``; return the manifest and the bytes of ``load``.

    ``identity``: the model and version the directory is used as; the signature
    must then cover an ``identity.json`` naming exactly that (checked before any
    other file is hashed). Without it the signed identity, if any, is only
    reported. ``progress`` is called with the byte count of each piece of a
    signed file hashed (for a progress bar). Raises a
    :class:`agent.errors.VerificationError` subclass on any failure.
    """
    with _fd(_open_root(version_dir)) as root_fd:
        signed = oms.verify_bundle(_read_signature(root_fd, version_dir), trust.public_keys)
        manifest = signed.files
        for name in load:
            if name not in manifest:
                raise FileNotSignedError(
                    f"{name}: requested for loading but not covered by the signature"
                )
        signed_identity = _read_identity(root_fd, manifest)
        if identity is not None:
            check_identity(signed_identity, identity, str(version_dir))
        skip = (*signed.ignore_paths, SIGNATURE_FILENAME)

        files, ignored = _list_files(version_dir, root_fd, lambda rel: oms.is_ignored(rel, skip))
        buffer = bytearray(HASH_CHUNK_BYTES)

        def digest_of(rel: str) -> str | None:
            try:
                return _hash_file(root_fd, rel, buffer)[0]
            except VerificationError:
                return None

        oms.check_file_set(manifest, files.keys(), digest_of)

        contents: dict[str, FileBytes] = {}
        total = 0
        for rel in sorted(manifest, key=oms.path_sort_key):
            if rel in load:
                data = _load_file(root_fd, rel)
                digest = hashlib.sha256(data).hexdigest()
                oms.check_digest(rel, manifest, digest)
                contents[rel] = data
                total += len(data)
                if progress is not None:
                    progress(len(data))
            else:
                digest, size = _hash_file(root_fd, rel, buffer, progress)
                oms.check_digest(rel, manifest, digest)
                total += size
    return VerifiedVersion(
        path=version_dir,
        manifest=MappingProxyType(dict(manifest)),
        key_id=signed.key_id,
        model_name=signed.model_name,
        identity=signed_identity,
        contents=MappingProxyType(contents),
        ignored=tuple(ignored),
        total_bytes=total,
    )


# --------------------------------------------------------------------------- signing


def hash_version(
    version_dir: Path, ignore_paths: Collection[str] = oms.DEFAULT_IGNORE_PATHS
) -> dict[str, str]:
    """``{relative_path: sha256_hex}`` of every file in ``version_dir`` but ``ignore_paths``."""
    with _fd(_open_root(version_dir)) as root_fd:
        files, _ = _list_files(version_dir, root_fd, lambda rel: oms.is_ignored(rel, ignore_paths))
        buffer = bytearray(HASH_CHUNK_BYTES)
        return {rel: _hash_file(root_fd, rel, buffer)[0] for rel in sorted(files)}


def _write_atomically(directory: Path, name: str, data: bytes) -> Path:
    target = directory / name
    try:
        write_atomically(target, data, mode=0o644)
    except OSError as exc:
        raise FileReadError(f"cannot write {target}: {exc.strerror}") from None
    return target


def sign_version(
    version_dir: Path,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    model_name: str | None = None,
    version: int | None = None,
) -> Path:
    """Write ``identity.json``, sign every file in ``version_dir`` and write ``model.sig``
    atomically; return its path.

    The identity names ``model_name`` and ``version``; each defaults to what the
    path says (``.../<model>/<version>``). With neither given, an identity.json
    already in the directory is signed as it is (a version staged outside a
    repository). Excludes what the reference tool excludes by default
    (``model.sig`` and git metadata at the top level) and refuses symlinks and
    special files. The statement's subject name is ``<model>/<version>``.
    """
    oms.require_p256_private_key(private_key, "the signing key")
    identity = signing_identity(version_dir, model_name, version)
    data = encode_identity(identity)
    with contextlib.suppress(OSError):
        if (version_dir / IDENTITY_FILENAME).read_bytes() == data:
            data = b""  # already there: leave the file (and its mtime) alone
    if data:
        _write_atomically(version_dir, IDENTITY_FILENAME, data)
    manifest = hash_version(version_dir)
    bundle = oms.sign_manifest(manifest, private_key, model_name=str(identity))
    return _write_atomically(version_dir, SIGNATURE_FILENAME, bundle)


def signing_identity(
    version_dir: Path, model_name: str | None = None, version: int | None = None
) -> ModelIdentity:
    """The identity ``sign_version`` writes for these arguments (see there)."""
    path = version_dir.resolve()
    if model_name is None and version is None:
        existing = path / IDENTITY_FILENAME
        if existing.is_file() and not existing.is_symlink():
            try:
                return parse_identity(existing.read_bytes()[: MAX_IDENTITY_BYTES + 1])
            except OSError as exc:
                raise FileReadError(f"cannot read {existing}: {exc.strerror}") from None
        return identity_of_path(path)
    if version is None:
        version = version_of_path(path)
    return ModelIdentity(model_name if model_name is not None else path.parent.name, version)
