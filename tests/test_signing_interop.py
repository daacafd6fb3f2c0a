"""Interoperability with the reference OpenSSF ``model_signing`` CLI, both ways.

Runs the real tool (PyPI ``model-signing``, a test dependency) as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import VerificationError
from agent.signing import keys, oms
from agent.signing.identity import (
    IDENTITY_FILENAME,
    IdentityMismatchError,
    IdentityMissingError,
    ModelIdentity,
    encode_identity,
)
from agent.signing.version_dir import SIGNATURE_FILENAME, sign_version, verify_version

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"

pytestmark = pytest.mark.skipif(
    not MODEL_SIGNING.exists(),
    reason=f"the reference model_signing CLI is not installed next to {sys.executable}",
)

FILES = {
    "model.onnx": os.urandom(200_000),
    "profile.json": b'{"features": 4}',
    "validation/inputs.bin": b"\x01\x02\x03",
    "validation/deep/expected.bin": b"",
    "names with spaces/caf\u00e9.txt": b"unicode names",
    "a-b": b"sorts after a/ by components",
    "a/b": b"sorts before a-b",
}


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MODEL_SIGNING), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def reference_sign(version: Path, private_key: Path, *extra: str) -> None:
    result = run(
        "sign",
        "key",
        "--private_key",
        private_key,
        "--signature",
        version / SIGNATURE_FILENAME,
        *extra,
        version,
        cwd=version.parent,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def reference_verify(version: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    return run(
        "verify",
        "key",
        "--public_key",
        public_key,
        "--signature",
        version / SIGNATURE_FILENAME,
        version,
        cwd=version.parent,
    )


def make_version(root: Path, files: dict[str, bytes] = FILES) -> Path:
    version = root / "repo" / "demo" / "3"
    for name, data in files.items():
        path = version / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return version


@pytest.fixture
def key_pair(tmp_path: Path) -> keys.KeyPairFiles:
    return keys.write_key_pair(tmp_path / "keys", "interop")


def trust_of(pair: keys.KeyPairFiles) -> keys.TrustStore:
    return keys.TrustStore.from_public_key_files([pair.public_key])


# --------------------------------------------------------------------------- reference -> agent


def test_signed_by_reference_verifies_in_the_agent(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    reference_sign(version, key_pair.private_key)
    result = verify_version(version, trust_of(key_pair), load=["model.onnx"])
    assert set(result.manifest) == set(FILES)
    assert result.key_id == key_pair.key_id
    assert result.contents["model.onnx"] == FILES["model.onnx"]
    assert result.model_name == "3"


def test_reference_git_ignores_are_honoured(tmp_path: Path, key_pair: keys.KeyPairFiles) -> None:
    version = make_version(tmp_path)
    (version / ".gitignore").write_text("*.tmp\n")
    (version / ".gitattributes").write_text("*.onnx filter=lfs\n")
    (version / ".git").mkdir()
    (version / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    reference_sign(version, key_pair.private_key)
    result = verify_version(version, trust_of(key_pair))
    assert set(result.manifest) == set(FILES)
    assert set(result.ignored) == {".git", ".gitattributes", ".gitignore", SIGNATURE_FILENAME}


def test_reference_extra_ignore_paths_are_honoured(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    (version / "NOTES.txt").write_text("not part of the model")
    reference_sign(version, key_pair.private_key, "--ignore-paths", str(version / "NOTES.txt"))
    result = verify_version(version, trust_of(key_pair))
    assert "NOTES.txt" not in result.manifest
    assert "NOTES.txt" in result.ignored
    # An ignored file is never loadable.
    with pytest.raises(VerificationError):
        verify_version(version, trust_of(key_pair), load=["NOTES.txt"])


def test_passphrase_key_from_agent_keygen_signs_for_the_reference(tmp_path: Path) -> None:
    # (model_signing 1.1.1's own `--password` is broken: it passes a str where
    # cryptography wants bytes, so the reference cannot sign with an encrypted key.)
    pair = keys.write_key_pair(tmp_path / "keys", "locked", b"s3cret passphrase")
    version = make_version(tmp_path)
    sign_version(version, keys.load_private_key(pair.private_key, b"s3cret passphrase"))
    result = reference_verify(version, pair.public_key)
    assert result.returncode == 0, result.stderr + result.stdout


def test_reference_signature_then_tampered_is_rejected_by_the_agent(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    reference_sign(version, key_pair.private_key)
    data = bytearray((version / "model.onnx").read_bytes())
    data[1234] ^= 0x10
    (version / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(oms.FileDigestMismatchError, match=r"model\.onnx"):
        verify_version(version, trust_of(key_pair))


def test_reference_signature_by_untrusted_key(tmp_path: Path, key_pair: keys.KeyPairFiles) -> None:
    version = make_version(tmp_path)
    other = keys.write_key_pair(tmp_path / "keys", "other")
    reference_sign(version, other.private_key)
    with pytest.raises(oms.UntrustedKeyError, match=other.key_id):
        verify_version(version, trust_of(key_pair))


def test_reference_signature_with_p384_key_is_refused(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    private = tmp_path / "p384.key.pem"
    public = tmp_path / "p384.pub.pem"
    private.write_bytes(
        p384.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        p384.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    version = make_version(tmp_path)
    reference_sign(version, private)
    assert reference_verify(version, public).returncode == 0  # the reference accepts P-384
    with pytest.raises(oms.UnsupportedKeyError, match="secp384r1"):
        keys.TrustStore.from_public_key_files([public])
    with pytest.raises(oms.UntrustedKeyError):
        verify_version(version, trust_of(key_pair))


# --------------------------------------------------------------------------- agent -> reference


def test_signed_by_agent_verifies_with_reference(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    sign_version(version, keys.load_private_key(key_pair.private_key))
    result = reference_verify(version, key_pair.public_key)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Verification succeeded" in result.stdout


def test_agent_signature_with_git_metadata_verifies_with_reference(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    (version / ".gitignore").write_text("*.tmp\n")
    (version / ".github").mkdir()
    (version / ".github" / "CODEOWNERS").write_text("* @ml\n")
    sign_version(version, keys.load_private_key(key_pair.private_key))
    result = reference_verify(version, key_pair.public_key)
    assert result.returncode == 0, result.stderr + result.stdout


def test_agent_signature_then_tampered_fails_with_reference(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    sign_version(version, keys.load_private_key(key_pair.private_key))
    (version / "validation" / "inputs.bin").write_bytes(b"\x01\x02\x04")
    result = reference_verify(version, key_pair.public_key)
    assert result.returncode != 0
    assert "validation/inputs.bin" in result.stderr


def test_agent_signature_fails_with_reference_under_another_key(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    other = keys.write_key_pair(tmp_path / "keys", "other")
    sign_version(version, keys.load_private_key(key_pair.private_key))
    result = reference_verify(version, other.public_key)
    assert result.returncode != 0


def test_round_trip_agent_reference_agent(tmp_path: Path, key_pair: keys.KeyPairFiles) -> None:
    """Both tools produce the same manifest for the same directory."""
    version = make_version(tmp_path)
    private = keys.load_private_key(key_pair.private_key)
    sign_version(version, private)
    ours = verify_version(version, trust_of(key_pair)).manifest
    reference_sign(version, key_pair.private_key)
    theirs = verify_version(version, trust_of(key_pair)).manifest
    assert dict(ours) == dict(theirs)


# --------------------------------------------------------------------------- identity binding


def test_reference_signed_identity_binds_model_and_version(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    """docs: write identity.json, then sign with model_signing; the agent binds it."""
    version = make_version(tmp_path)  # repo/demo/3
    (version / IDENTITY_FILENAME).write_bytes(encode_identity(ModelIdentity("demo", 3)))
    reference_sign(version, key_pair.private_key)
    result = verify_version(version, trust_of(key_pair), identity=ModelIdentity("demo", 3))
    assert result.identity == ModelIdentity("demo", 3)
    with pytest.raises(IdentityMismatchError, match="signed as demo/3 but used as demo/9"):
        verify_version(version, trust_of(key_pair), identity=ModelIdentity("demo", 9))


def test_reference_signed_without_identity_is_refused_where_identity_is_required(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    reference_sign(version, key_pair.private_key)
    with pytest.raises(IdentityMissingError):
        verify_version(version, trust_of(key_pair), identity=ModelIdentity("demo", 3))


def test_agent_signed_identity_is_a_file_the_reference_verifies(
    tmp_path: Path, key_pair: keys.KeyPairFiles
) -> None:
    version = make_version(tmp_path)
    sign_version(version, keys.load_private_key(key_pair.private_key))
    assert (version / IDENTITY_FILENAME).is_file()
    (version / IDENTITY_FILENAME).write_bytes(encode_identity(ModelIdentity("demo", 9)))
    result = reference_verify(version, key_pair.public_key)  # an edited identity fails there too
    assert result.returncode != 0
    assert IDENTITY_FILENAME in result.stderr
