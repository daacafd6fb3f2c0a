"""Issue 17 item 4: a signature binds the model name and version it was made for.

A signed version directory copied to another version number or model name is
refused (by the agent at load, by ``edge-agent verify``, by the controller's
publish and by the device's update path), with a reason naming both identities;
everything else keeps serving. The binding is ``identity.json``, a signed file
like any other, so the reference ``model_signing`` tool signs and verifies it
unchanged (tests/test_signing_interop.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.signing import cli, keys, oms
from agent.signing.identity import (
    IDENTITY_FILENAME,
    IdentityMalformedError,
    IdentityMismatchError,
    IdentityMissingError,
    ModelIdentity,
    encode_identity,
    identity_of_path,
    parse_identity,
)
from agent.signing.version_dir import SIGNATURE_FILENAME, sign_version, verify_version
from tests.agent_process import REPO_ROOT, AgentProcess, write_toml

MODELS = REPO_ROOT / "models"


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return keys.generate_private_key()


def trust_of(key: ec.EllipticCurvePrivateKey) -> keys.TrustStore:
    return keys.TrustStore.from_public_keys([(key.public_key(), "test key")])


def make_version(root: Path, model: str = "demo", version: int = 3) -> Path:
    directory = root / "repo" / model / str(version)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"\x08\x07 not really onnx")
    return directory


# --------------------------------------------------------------------------- the real agent


def _index(address: str) -> dict[str, tuple[str, str]]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(address) as client:
        index = client.get_model_repository_index()
    return {f"{m.name}:{m.version}": (m.state, m.reason) for m in index.models}


def test_a_signed_version_moved_to_another_version_or_model_is_not_served(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(MODELS, repo)
    # Version 2 copied to version 9 (the newest: the policy picks it), and all_dtypes
    # copied under another model's name. Both carry valid signatures by a trusted key.
    shutil.copytree(repo / "tabular_classifier" / "2", repo / "tabular_classifier" / "9")
    shutil.copytree(repo / "all_dtypes" / "1", repo / "renamed_dtypes" / "1")
    config = write_toml(
        tmp_path / "agent.toml",
        {
            "server": {"address": "127.0.0.1:0"},
            "repository": {"path": str(repo)},
            "signing": {"trust_dir": str(MODELS / "keys" / "trusted")},
            "state": {"dir": str(tmp_path / "state")},
        },
    )
    with AgentProcess(config) as agent:
        agent.wait_serving()
        index = _index(agent.address)
        state, reason = index["tabular_classifier:9"]
        assert state == "UNAVAILABLE"
        assert "signed as tabular_classifier/2 but used as tabular_classifier/9" in reason
        state, reason = index["renamed_dtypes:1"]
        assert state == "UNAVAILABLE"
        assert "signed as all_dtypes/1 but used as renamed_dtypes/1" in reason
        # The other models are served.
        assert index["all_dtypes:1"] == ("READY", "")
        assert index["text_features:1"] == ("READY", "")


# --------------------------------------------------------------------------- verify_version


def test_sign_version_writes_the_identity_from_the_path(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    sign_version(version, key)
    assert parse_identity((version / IDENTITY_FILENAME).read_bytes()) == ModelIdentity("demo", 3)
    verified = verify_version(version, trust_of(key), identity=ModelIdentity("demo", 3))
    assert verified.identity == ModelIdentity("demo", 3)
    assert IDENTITY_FILENAME in verified.manifest
    assert verified.model_name == "demo/3"  # the statement's subject, informative


def test_a_copy_to_another_version_or_model_is_refused(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    sign_version(version, key)
    trust = trust_of(key)
    for model, number in (("demo", 9), ("other", 3), ("other", 9)):
        copy = tmp_path / "repo" / model / str(number)
        shutil.copytree(version, copy, dirs_exist_ok=True)
        with pytest.raises(IdentityMismatchError) as err:
            verify_version(copy, trust, identity=identity_of_path(copy))
        assert f"signed as demo/3 but used as {model}/{number}" in str(err.value)
        assert err.value.code == "identity_mismatch"


def test_identity_is_checked_before_the_files_are_hashed(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    sign_version(version, key)
    (version / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IdentityMismatchError):
        verify_version(version, trust_of(key), identity=ModelIdentity("demo", 4))


def test_a_version_without_identity_is_refused_when_one_is_expected(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    bundle = oms.sign_manifest(
        {"model.onnx": hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()},
        key,
        model_name="3",
    )
    (version / SIGNATURE_FILENAME).write_bytes(bundle)
    assert verify_version(version, trust_of(key)).identity is None  # verifies, unbound
    with pytest.raises(IdentityMissingError, match=r"covers no identity\.json"):
        verify_version(version, trust_of(key), identity=ModelIdentity("demo", 3))


def test_an_unsigned_identity_file_does_not_count(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """identity.json added after signing is an unexpected file, never a binding."""
    version = make_version(tmp_path)
    bundle = oms.sign_manifest(
        {"model.onnx": hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()},
        key,
        model_name="3",
    )
    (version / SIGNATURE_FILENAME).write_bytes(bundle)
    (version / IDENTITY_FILENAME).write_bytes(encode_identity(ModelIdentity("demo", 3)))
    with pytest.raises(IdentityMissingError):
        verify_version(version, trust_of(key), identity=ModelIdentity("demo", 3))
    with pytest.raises(oms.FileUnexpectedError):
        verify_version(version, trust_of(key))


def test_an_edited_identity_fails_its_digest(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    sign_version(version, key)
    copy = tmp_path / "repo" / "demo" / "9"
    shutil.copytree(version, copy)
    (copy / IDENTITY_FILENAME).write_bytes(encode_identity(ModelIdentity("demo", 9)))
    with pytest.raises(oms.FileDigestMismatchError, match=r"identity\.json"):
        verify_version(copy, trust_of(key), identity=ModelIdentity("demo", 9))


def test_explicit_identity_and_an_existing_identity(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    staged = tmp_path / "staging" / "v-next"  # not a <model>/<version> path
    staged.mkdir(parents=True)
    (staged / "model.onnx").write_bytes(b"x")
    with pytest.raises(IdentityMismatchError, match="canonical version number"):
        sign_version(staged, key)
    sign_version(staged, key, model_name="demo", version=7)
    sign_version(staged, key)  # neither given: the identity already there is kept
    assert verify_version(staged, trust_of(key)).identity == ModelIdentity("demo", 7)
    sign_version(staged, key, version=8, model_name="demo")
    assert verify_version(staged, trust_of(key)).identity == ModelIdentity("demo", 8)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"schema": "edge.model_identity", "version": 1, "model": "m"}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m", "model_version": 1,'
        b' "extra": 0}',
        b'{"schema": "edge.model_identity", "version": 2, "model": "m", "model_version": 1}',
        b'{"schema": "other", "version": 1, "model": "m", "model_version": 1}',
        b'{"schema": "edge.model_identity", "version": true, "model": "m", "model_version": 1}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m", "model_version": true}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m", "model_version": 0}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m", "model_version": 1.0}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m\\n", "model_version": 1}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "../m", "model_version": 1}',
        b'{"schema": "edge.model_identity", "version": 1, "model": "m", "model": "n",'
        b' "model_version": 1}',
        b"\xff\xfe",
        b" " * 5000,
    ],
)
def test_malformed_identity_is_refused(data: bytes) -> None:
    with pytest.raises(IdentityMalformedError):
        parse_identity(data)


def test_a_signed_but_malformed_identity_is_refused(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    version = make_version(tmp_path)
    (version / IDENTITY_FILENAME).write_text(json.dumps({"model": "demo", "version": 3}))
    manifest = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in version.iterdir()
    }
    (version / SIGNATURE_FILENAME).write_bytes(oms.sign_manifest(manifest, key, model_name="3"))
    with pytest.raises(IdentityMalformedError):
        verify_version(version, trust_of(key), identity=ModelIdentity("demo", 3))


# --------------------------------------------------------------------------- the CLI


def _cli(*argv: str | Path) -> int:
    import argparse

    main = argparse.ArgumentParser(prog="edge-agent")
    cli.add_signing_commands(main.add_subparsers(dest="command", required=True))
    args = main.parse_args([str(a) for a in argv])
    code: int = args.func(args)
    return code


def test_cli_sign_and_verify_bind_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = keys.write_key_pair(tmp_path / "keys", "ops")
    version = make_version(tmp_path)
    assert _cli("sign", version, "--private-key", pair.private_key) == cli.EXIT_OK
    assert "as demo/3" in capsys.readouterr().out
    assert _cli("verify", version, "--public-key", pair.public_key) == cli.EXIT_OK
    assert "demo/3" in capsys.readouterr().out
    moved = tmp_path / "repo" / "demo" / "9"
    shutil.copytree(version, moved)
    assert _cli("verify", moved, "--public-key", pair.public_key) == cli.EXIT_IDENTITY
    assert "FAILED identity_mismatch" in capsys.readouterr().err
    assert _cli(
        "verify", moved, "--public-key", pair.public_key, "--model", "demo", "--version", "3"
    ) == cli.EXIT_OK
    # Re-signing the copy on purpose binds it to its new place.
    assert _cli(
        "sign", moved, "--private-key", pair.private_key, "--model", "demo", "--version", "9"
    ) == cli.EXIT_OK
    assert _cli("verify", moved, "--public-key", pair.public_key) == cli.EXIT_OK


# --------------------------------------------------------------------------- controller publish


def test_publish_refuses_a_version_signed_as_another(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    from agent.controller.store import ArtifactStore

    version = make_version(tmp_path)
    sign_version(version, key)
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(IdentityMismatchError, match="signed as demo/3 but used as demo/4"):
        store.publish(version, "demo", 4, trust_of(key))
    with pytest.raises(IdentityMismatchError, match="used as other/3"):
        store.publish(version, "other", 3, trust_of(key))
    assert store.publish(version, "demo", 3, trust_of(key)).version == 3
