"""Signing and verifying version directories on disk, keys and the trust store."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import VerificationError
from agent.signing import keys, oms
from agent.signing.identity import IDENTITY_FILENAME, ModelIdentity
from agent.signing.version_dir import (
    SIGNATURE_FILENAME,
    FileNotSignedError,
    FileReadError,
    SpecialFileError,
    SymlinkEscapesError,
    SymlinkRefusedError,
    hash_version,
    sign_version,
    verify_version,
)

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
TRUST = keys.TrustStore.from_public_keys([(KEY.public_key(), "test key")])

FILES = {
    "model.onnx": os.urandom(3 * 1024 * 1024 + 17),  # spans several hash chunks
    "profile.json": b'{"mean": [0.5]}',
    "validation/inputs.bin": b"\x00\x01\x02",
    "validation/expected.bin": b"",
}


def make_version(root: Path, files: dict[str, bytes] = FILES, *, sign: bool = True) -> Path:
    version = root / "demo" / "1"
    for name, data in files.items():
        path = version / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if sign:
        sign_version(version, KEY)
    return version


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Everything observable about a directory tree (to show nothing was disturbed)."""
    result = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        result[str(path.relative_to(directory))] = (info.st_mode, info.st_mtime_ns, content)
    return result


@pytest.fixture
def version(tmp_path: Path) -> Path:
    return make_version(tmp_path)


def rejects(version: Path, error: type[VerificationError], **kwargs: Any) -> VerificationError:
    before = snapshot(version)
    with pytest.raises(error) as info:
        verify_version(version, TRUST, **kwargs)
    assert snapshot(version) == before, "verification must not change the directory"
    return info.value


# --------------------------------------------------------------------------- good path


def test_sign_then_verify(version: Path) -> None:
    result = verify_version(version, TRUST)
    identity = (version / IDENTITY_FILENAME).read_bytes()  # written by sign_version
    assert set(result.manifest) == {*FILES, IDENTITY_FILENAME}
    assert result.key_id == oms.key_id(KEY.public_key())
    assert result.model_name == "demo/1"
    assert result.identity == ModelIdentity("demo", 1)
    assert result.contents == {}
    assert result.ignored == (SIGNATURE_FILENAME,)
    assert result.total_bytes == sum(len(v) for v in FILES.values()) + len(identity)


def test_loaded_files_are_the_verified_bytes(version: Path) -> None:
    result = verify_version(version, TRUST, load=["model.onnx", "profile.json"])
    assert result.contents["model.onnx"] == FILES["model.onnx"]
    assert result.contents["profile.json"] == FILES["profile.json"]
    assert set(result.contents) == {"model.onnx", "profile.json"}


def test_sign_writes_model_sig_atomically_and_leaves_no_temp_file(version: Path) -> None:
    names = sorted(p.name for p in version.iterdir())
    assert names == ["identity.json", "model.onnx", "model.sig", "profile.json", "validation"]
    first = (version / SIGNATURE_FILENAME).read_bytes()
    sign_version(version, KEY)  # re-signing replaces it
    assert sorted(p.name for p in version.iterdir()) == names
    assert (version / SIGNATURE_FILENAME).read_bytes() != first  # ECDSA is randomised
    verify_version(version, TRUST)


def test_git_metadata_is_ignored_like_the_reference_tool(tmp_path: Path) -> None:
    version = make_version(tmp_path, sign=False)
    (version / ".gitignore").write_text("*.tmp\n")
    (version / ".git").mkdir()
    (version / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    sign_version(version, KEY)
    result = verify_version(version, TRUST)
    assert ".gitignore" not in result.manifest
    assert set(result.ignored) == {".git", ".gitignore", SIGNATURE_FILENAME}
    # A .gitignore below the top level is an ordinary file, as in the reference tool.
    (version / "validation" / ".gitignore").write_text("x")
    rejects(version, oms.FileUnexpectedError)


def test_hash_version_matches_files(version: Path) -> None:
    assert set(hash_version(version)) == {*FILES, IDENTITY_FILENAME}


# --------------------------------------------------------------------------- tamper cases


def test_flipped_byte_in_model(version: Path) -> None:
    data = bytearray((version / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x80
    (version / "model.onnx").write_bytes(bytes(data))
    error = rejects(version, oms.FileDigestMismatchError)
    assert "model.onnx" in str(error)


def test_flipped_byte_in_loaded_model(version: Path) -> None:
    data = bytearray((version / "model.onnx").read_bytes())
    data[0] ^= 0x01
    (version / "model.onnx").write_bytes(bytes(data))
    rejects(version, oms.FileDigestMismatchError, load=["model.onnx"])


def test_truncated_file(version: Path) -> None:
    path = version / "model.onnx"
    os.truncate(path, path.stat().st_size - 1)
    rejects(version, oms.FileDigestMismatchError)


def test_extended_empty_file(version: Path) -> None:
    (version / "validation" / "expected.bin").write_bytes(b"\x00")
    error = rejects(version, oms.FileDigestMismatchError)
    assert "validation/expected.bin" in str(error)


def test_file_added(version: Path) -> None:
    (version / "validation" / "extra.bin").write_bytes(b"x")
    error = rejects(version, oms.FileUnexpectedError)
    assert "validation/extra.bin" in str(error)


def test_empty_directory_added_is_accepted(version: Path) -> None:
    # Directories carry no content; the reference tool does not sign them either.
    (version / "empty").mkdir()
    verify_version(version, TRUST)


def test_file_removed(version: Path) -> None:
    (version / "profile.json").unlink()
    error = rejects(version, oms.FileMissingError)
    assert "profile.json" in str(error)


def test_file_renamed(version: Path) -> None:
    (version / "model.onnx").rename(version / "model-v2.onnx")
    error = rejects(version, oms.FileRenamedError)
    assert "'model.onnx' is now 'model-v2.onnx'" in str(error)


def test_file_moved_into_subdirectory(version: Path) -> None:
    (version / "profile.json").rename(version / "validation" / "profile.json")
    rejects(version, oms.FileRenamedError)


def test_symlink_escaping_the_directory(version: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(FILES["model.onnx"])
    (version / "model.onnx").unlink()
    (version / "model.onnx").symlink_to(outside)
    error = rejects(version, SymlinkEscapesError)
    assert error.code == "file_symlink_escapes"
    assert "model.onnx" in str(error)


def test_relative_symlink_escaping_the_directory(version: Path) -> None:
    (version / "validation" / "up").symlink_to("../../../..")
    error = rejects(version, SymlinkEscapesError)
    assert "validation/up" in str(error)


def test_symlinked_directory_escaping(version: Path, tmp_path: Path) -> None:
    shutil.move(version / "validation", tmp_path / "elsewhere")
    (version / "validation").symlink_to(tmp_path / "elsewhere")
    rejects(version, SymlinkEscapesError)


def test_symlink_inside_the_directory_is_refused(version: Path) -> None:
    (version / "alias.onnx").symlink_to("model.onnx")
    error = rejects(version, SymlinkRefusedError)
    assert not isinstance(error, SymlinkEscapesError)
    assert error.code == "file_symlink"


def test_model_sig_symlink_is_refused(version: Path, tmp_path: Path) -> None:
    (version / SIGNATURE_FILENAME).rename(tmp_path / "elsewhere.sig")
    (version / SIGNATURE_FILENAME).symlink_to(tmp_path / "elsewhere.sig")
    rejects(version, SymlinkRefusedError)


def test_fifo_is_refused_without_blocking(version: Path) -> None:
    os.mkfifo(version / "validation" / "pipe")
    error = rejects(version, SpecialFileError)
    assert error.code == "file_special"


def test_unsigned_version(tmp_path: Path) -> None:
    version = make_version(tmp_path, sign=False)
    error = rejects(version, oms.SignatureMissingError)
    assert "no model.sig" in str(error)


def test_missing_version_directory(tmp_path: Path) -> None:
    with pytest.raises(FileReadError, match="does not exist"):
        verify_version(tmp_path / "nope", TRUST)


def test_signature_by_untrusted_key(tmp_path: Path) -> None:
    version = make_version(tmp_path, sign=False)
    sign_version(version, OTHER_KEY)
    rejects(version, oms.UntrustedKeyError)


def test_signature_of_another_model(version: Path, tmp_path: Path) -> None:
    other = make_version(tmp_path / "other", {**FILES, "model.onnx": b"another model"})
    shutil.copy(other / SIGNATURE_FILENAME, version / SIGNATURE_FILENAME)
    error = rejects(version, oms.FileDigestMismatchError)
    assert "model.onnx" in str(error)


@pytest.mark.parametrize("keep", [0, 1, 100, -1])
def test_truncated_model_sig(version: Path, keep: int) -> None:
    path = version / SIGNATURE_FILENAME
    path.write_bytes(path.read_bytes()[:keep])
    rejects(version, oms.BundleMalformedError)


def test_corrupt_model_sig(version: Path) -> None:
    (version / SIGNATURE_FILENAME).write_bytes(os.urandom(512))
    rejects(version, oms.BundleMalformedError)


def test_wrong_payload_type_on_disk(version: Path) -> None:
    path = version / SIGNATURE_FILENAME
    doc = json.loads(path.read_bytes())
    doc["dsseEnvelope"]["payloadType"] = "application/vnd.dsse.envelope.v1+json"
    path.write_text(json.dumps(doc))
    rejects(version, oms.PayloadTypeError)


def test_path_traversal_in_signed_names(version: Path) -> None:
    path = version / SIGNATURE_FILENAME
    doc = json.loads(path.read_bytes())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["name"] = "../../etc/passwd"
    path.write_bytes(oms.sign_payload(json.dumps(statement).encode(), KEY))
    rejects(version, oms.UnsafePathError)


def test_load_of_an_unsigned_name(version: Path) -> None:
    rejects(version, FileNotSignedError, load=["other.onnx"])


# --------------------------------------------------------------------------- property


DISK_FILES = {"model.onnx": b"\x08\x01" + bytes(range(256)), "sub/vectors.bin": b"0123456789"}


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from([*DISK_FILES, SIGNATURE_FILENAME]),
    position=st.integers(0, 2**16),
    mask=st.integers(1, 255),
    load=st.sampled_from([(), ("model.onnx",)]),
)
def test_any_single_byte_change_on_disk_is_rejected(
    name: str, position: int, mask: int, load: tuple[str, ...]
) -> None:
    with tempfile.TemporaryDirectory() as temp:
        version = make_version(Path(temp), DISK_FILES)
        path = version / name
        blob = path.read_bytes()
        index = position % len(blob)  # model.sig's length varies: ECDSA is randomised
        path.write_bytes(blob[:index] + bytes([blob[index] ^ mask]) + blob[index + 1 :])
        with pytest.raises(VerificationError):
            verify_version(version, TRUST, load=load)


# --------------------------------------------------------------------------- keys


def test_write_key_pair_modes_and_id(tmp_path: Path) -> None:
    pair = keys.write_key_pair(tmp_path / "k", "fleet")
    assert pair.private_key.name == "fleet.key.pem"
    assert pair.public_key.name == "fleet.pub.pem"
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    public = keys.load_public_key(pair.public_key)
    assert oms.key_id(public) == pair.key_id
    private = keys.load_private_key(pair.private_key)
    assert oms.key_id(private.public_key()) == pair.key_id


def test_write_key_pair_never_overwrites(tmp_path: Path) -> None:
    keys.write_key_pair(tmp_path, "k")
    before = (tmp_path / "k.key.pem").read_bytes()
    with pytest.raises(keys.KeyWriteError, match="already exists"):
        keys.write_key_pair(tmp_path, "k")
    assert (tmp_path / "k.key.pem").read_bytes() == before


def test_write_key_pair_refuses_path_names(tmp_path: Path) -> None:
    with pytest.raises(keys.KeyWriteError):
        keys.write_key_pair(tmp_path, "../escape")


def test_passphrase_protected_key(tmp_path: Path) -> None:
    pair = keys.write_key_pair(tmp_path, "k", b"correct horse")
    assert b"ENCRYPTED" in pair.private_key.read_bytes()
    key = keys.load_private_key(pair.private_key, b"correct horse")
    assert oms.key_id(key.public_key()) == pair.key_id
    with pytest.raises(oms.KeyFormatError, match="wrong passphrase"):
        keys.load_private_key(pair.private_key, b"wrong")
    with pytest.raises(oms.KeyFormatError, match="encrypted"):
        keys.load_private_key(pair.private_key)


def test_passphrase_file_drops_one_newline(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"secret\n")
    assert keys.read_passphrase_file(tmp_path / "p") == b"secret"
    (tmp_path / "p").write_bytes(b"\n")
    with pytest.raises(oms.KeyFormatError, match="empty"):
        keys.read_passphrase_file(tmp_path / "p")


def write_pem(path: Path, key: Any, private: bool = False) -> Path:
    if private:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        data = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["p384", "rsa"],
)
def test_keys_of_the_wrong_curve_or_type(tmp_path: Path, key: Any) -> None:
    public = write_pem(tmp_path / "pub.pem", key.public_key())
    private = write_pem(tmp_path / "key.pem", key, private=True)
    with pytest.raises(oms.UnsupportedKeyError, match="P-256"):
        keys.load_public_key(public)
    with pytest.raises(oms.UnsupportedKeyError, match="P-256"):
        keys.load_private_key(private)


def test_private_key_given_as_public_key(tmp_path: Path) -> None:
    path = write_pem(tmp_path / "key.pem", KEY, private=True)
    with pytest.raises(oms.KeyFormatError, match="private key"):
        keys.load_public_key(path)


def test_garbage_key_file(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("hello")
    with pytest.raises(oms.KeyFormatError):
        keys.load_public_key(tmp_path / "k.pem")
    with pytest.raises(oms.KeyFormatError):
        keys.load_private_key(tmp_path / "k.pem")


def test_trust_store_from_directory(tmp_path: Path) -> None:
    write_pem(tmp_path / "a.pem", KEY.public_key())
    write_pem(tmp_path / "b.pem", OTHER_KEY.public_key())
    write_pem(tmp_path / "dup.pem", KEY.public_key())
    (tmp_path / "README.md").write_text("not a key")
    store = keys.TrustStore.from_directory(tmp_path)
    assert len(store) == 2
    assert oms.key_id(KEY.public_key()) in store
    assert store.describe(oms.key_id(KEY.public_key())).endswith("(a.pem)")


def test_trust_store_refuses_a_wrong_key_naming_the_file(tmp_path: Path) -> None:
    write_pem(tmp_path / "a.pem", KEY.public_key())
    write_pem(tmp_path / "bad.pem", ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(oms.UnsupportedKeyError, match=r"bad\.pem"):
        keys.TrustStore.from_directory(tmp_path)


def test_trust_store_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(keys.TrustStoreError, match="not a directory"):
        keys.TrustStore.from_directory(tmp_path / "nope")
    with pytest.raises(keys.TrustStoreError, match=r"no \*\.pem"):
        keys.TrustStore.from_directory(tmp_path)


def test_a_directory_with_more_entries_than_a_version_may_have_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.signing import version_dir as vd

    version = make_version(tmp_path)
    monkeypatch.setattr(vd, "MAX_ENTRIES", 3)  # the real bound is 65536; few files suffice
    with pytest.raises(vd.TooManyFilesError, match="more than 3 files and directories"):
        verify_version(version, TRUST)
