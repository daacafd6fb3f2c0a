"""The keygen / sign / verify subcommands, driven through a parser built here."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import AgentError, VerificationError
from agent.signing import cli, keys, oms, version_dir


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="edge-agent")
    cli.add_signing_commands(main.add_subparsers(dest="command", required=True))
    return main


def run(*argv: str | Path) -> int:
    args = parser().parse_args([str(a) for a in argv])
    code: int = args.func(args)
    return code


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(version dir, private key, public key), keys made and the version signed by the CLI."""
    assert run("keygen", "--out-dir", tmp_path / "keys", "--name", "ops") == 0
    version = tmp_path / "repo" / "m" / "1"
    (version / "sub").mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(4096))
    (version / "sub" / "vectors.bin").write_bytes(b"vectors")
    private = tmp_path / "keys" / "ops.key.pem"
    assert run("sign", version, "--private-key", private) == 0
    return version, private, tmp_path / "keys" / "ops.pub.pem"


def test_keygen_writes_a_0600_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("keygen", "--out-dir", tmp_path) == 0
    out = capsys.readouterr().out
    private = tmp_path / "model-signing.key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = keys.load_public_key(tmp_path / "model-signing.pub.pem")
    assert oms.key_id(public) in out


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("keygen", "--out-dir", tmp_path) == 0
    assert run("keygen", "--out-dir", tmp_path) == cli.EXIT_KEY
    assert "FAILED key_write_failed" in capsys.readouterr().err


def test_sign_and_verify_with_public_key(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, public = setup
    capsys.readouterr()
    assert run("verify", version, "--public-key", public) == 0
    kid = oms.key_id(keys.load_public_key(public))
    assert capsys.readouterr().out == f"OK 3 files, m/1, key {kid}\n"


def test_verify_with_trust_dir(setup: tuple[Path, Path, Path]) -> None:
    version, _, public = setup
    trust = public.parent / "trusted"
    trust.mkdir()
    (trust / "ops.pem").write_bytes(public.read_bytes())
    assert run("verify", version, "--trust-dir", trust) == 0


def test_passphrase_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pass").write_text("open sesame\n")
    (tmp_path / "wrong").write_text("close sesame\n")
    assert run("keygen", "--out-dir", tmp_path, "--passphrase-file", tmp_path / "pass") == 0
    version = tmp_path / "v" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"m")
    key = tmp_path / "model-signing.key.pem"
    assert run("sign", version, "--private-key", key) == cli.EXIT_KEY
    assert "encrypted" in capsys.readouterr().err
    wrong = run("sign", version, "--private-key", key, "--passphrase-file", tmp_path / "wrong")
    assert wrong == cli.EXIT_KEY
    assert "wrong passphrase" in capsys.readouterr().err
    assert run("sign", version, "--private-key", key, "--passphrase-file", tmp_path / "pass") == 0
    assert run("verify", version, "--public-key", tmp_path / "model-signing.pub.pem") == 0


def test_verify_needs_exactly_one_trust_source(setup: tuple[Path, Path, Path]) -> None:
    version, _, public = setup
    with pytest.raises(SystemExit) as info:
        run("verify", version)
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        run("verify", version, "--public-key", public, "--trust-dir", public.parent)


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run("verify", "--help")
    out = capsys.readouterr().out
    for code in range(3, 11):
        assert f"\n  {code} " in out
    assert "file_digest_mismatch" in out


# --------------------------------------------------------------------------- exit codes


def expect(
    capsys: pytest.CaptureFixture[str], version: Path, public: Path, exit_code: int, code: str
) -> None:
    capsys.readouterr()
    assert run("verify", version, "--public-key", public) == exit_code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"FAILED {code}: ")


def test_exit_digest_mismatch(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, public = setup
    with (version / "model.onnx").open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    expect(capsys, version, public, cli.EXIT_DIGEST, "file_digest_mismatch")


def test_exit_file_set(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    version, _, public = setup
    (version / "extra").write_bytes(b"x")
    expect(capsys, version, public, cli.EXIT_FILE_SET, "file_unexpected")
    (version / "extra").unlink()
    (version / "sub" / "vectors.bin").unlink()
    expect(capsys, version, public, cli.EXIT_FILE_SET, "file_missing")


def test_exit_untrusted_key(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, _ = setup
    other = keys.write_key_pair(tmp_path / "other", "x")
    expect(capsys, version, other.public_key, cli.EXIT_UNTRUSTED_KEY, "signature_untrusted_key")


def test_exit_bad_signature(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    version, private, public = setup
    sig = version / "model.sig"
    doc = json.loads(sig.read_bytes())
    forged = oms.sign_manifest(
        {"model.onnx": "00" * 32}, keys.load_private_key(private), model_name="x"
    )
    doc["dsseEnvelope"]["signatures"] = json.loads(forged)["dsseEnvelope"]["signatures"]
    sig.write_text(json.dumps(doc))
    expect(capsys, version, public, cli.EXIT_BAD_SIGNATURE, "signature_invalid")


def test_exit_malformed_signature(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, public = setup
    sig = version / "model.sig"
    sig.write_bytes(sig.read_bytes()[:-10])
    expect(capsys, version, public, cli.EXIT_SIGNATURE_MALFORMED, "signature_malformed")
    sig.unlink()
    expect(capsys, version, public, cli.EXIT_SIGNATURE_MALFORMED, "signature_missing")


def test_exit_unsafe_entry(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, public = setup
    (version / "escape").symlink_to("/etc/passwd")
    expect(capsys, version, public, cli.EXIT_UNSAFE_ENTRY, "file_symlink_escapes")


def test_exit_wrong_curve_key(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, _, _ = setup
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    expect(capsys, version, p384, cli.EXIT_KEY, "key_unsupported")


def test_exit_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = keys.write_key_pair(tmp_path, "k")
    expect(capsys, tmp_path / "nope", pair.public_key, cli.EXIT_UNREADABLE, "file_unreadable")


def test_every_signing_error_has_a_specific_exit_code() -> None:
    classes: set[type[AgentError]] = set()
    for module in (oms, keys, version_dir):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, AgentError):
                classes.add(obj)
    classes -= {AgentError, VerificationError}
    assert len(classes) >= 20
    for cls in classes:
        assert cli.exit_code_for(cls.__new__(cls)) not in (cli.EXIT_OK, cli.EXIT_ERROR), cls
