"""The ``keygen``, ``sign`` and ``verify`` subcommands of ``edge-agent``.

``add_signing_commands`` adds them to the main parser's subparsers; each sets
``func``, which takes the parsed namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.signing.identity import ModelIdentity

# agent.signing's keys, oms and version_dir (and with them cryptography) are imported
# by the commands themselves: `edge-agent serve` builds this parser too, and an agent
# that serves unsigned models (or has not loaded one yet) need not carry them.

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # anything not listed below
EXIT_USAGE: Final = 2  # argparse's own code for bad arguments
EXIT_KEY: Final = 3
EXIT_SIGNATURE_MALFORMED: Final = 4
EXIT_UNTRUSTED_KEY: Final = 5
EXIT_BAD_SIGNATURE: Final = 6
EXIT_FILE_SET: Final = 7
EXIT_DIGEST: Final = 8
EXIT_UNSAFE_ENTRY: Final = 9
EXIT_UNREADABLE: Final = 10
EXIT_IDENTITY: Final = 11

ExitCodes = tuple[tuple[type[AgentError] | tuple[type[AgentError], ...], int], ...]


@functools.cache
def exit_codes() -> ExitCodes:
    """Error classes -> exit code. First match wins; the order matters where classes
    are related."""
    from agent.signing import identity, keys, oms, version_dir

    return (
        (
            (
                keys.TrustStoreError,
                keys.KeyWriteError,
                oms.KeyFormatError,
                oms.UnsupportedKeyError,
            ),
            EXIT_KEY,
        ),
        (
            (
                oms.SignatureMissingError,
                oms.BundleMalformedError,
                oms.BundleMediaTypeError,
                oms.PayloadTypeError,
                oms.StatementTypeError,
                oms.PredicateTypeError,
                oms.SerializationUnsupportedError,
                oms.HashAlgorithmError,
                oms.DuplicateResourceError,
                oms.UnsafePathError,
                oms.ManifestInconsistentError,
            ),
            EXIT_SIGNATURE_MALFORMED,
        ),
        (oms.UntrustedKeyError, EXIT_UNTRUSTED_KEY),
        (oms.BadSignatureError, EXIT_BAD_SIGNATURE),
        (
            (
                oms.FileMissingError,
                oms.FileUnexpectedError,
                oms.FileRenamedError,
                version_dir.FileNotSignedError,
            ),
            EXIT_FILE_SET,
        ),
        (oms.FileDigestMismatchError, EXIT_DIGEST),
        (
            (version_dir.SymlinkRefusedError, version_dir.SpecialFileError),
            EXIT_UNSAFE_ENTRY,
        ),
        ((version_dir.FileReadError, version_dir.TooManyFilesError), EXIT_UNREADABLE),
        (
            (
                identity.IdentityMissingError,
                identity.IdentityMalformedError,
                identity.IdentityMismatchError,
            ),
            EXIT_IDENTITY,
        ),
    )

EXIT_CODE_HELP: Final = """\
exit codes:
  0   verified (or: key pair written, directory signed)
  1   any other error
  2   bad command-line arguments
  3   key or trust store unusable: unreadable or malformed PEM, wrong passphrase,
      not an ECDSA P-256 key (key_invalid, key_unsupported, trust_store_invalid,
      key_write_failed)
  4   model.sig missing or malformed: not JSON / truncated, wrong bundle media
      type, DSSE payload type, statement or predicate type, serialization method,
      hash algorithm, duplicate or unsafe file names, inconsistent statement,
      more than 8 signatures, 65536 files or 256 ignore paths
      (signature_missing, signature_malformed, signature_limit_exceeded,
      signature_media_type,
      signature_payload_type, signature_statement_type, signature_predicate_type,
      signature_serialization_unsupported, signature_hash_algorithm,
      signature_duplicate_resource, signature_unsafe_path,
      signature_manifest_inconsistent)
  5   signed by a key that is not trusted (signature_untrusted_key)
  6   signature does not verify (signature_invalid)
  7   files missing, added or renamed, or a file to load not signed (file_missing,
      file_unexpected, file_renamed, file_not_signed)
  8   a file's content differs from the signed digest (file_digest_mismatch)
  9   symlink or special file in the directory (file_symlink,
      file_symlink_escapes, file_special)
  10  a file or directory could not be read, or holds more than 65536 entries
      (file_unreadable, file_too_many)
  11  the signed identity.json is missing, malformed, or names another model or
      version than the directory is used as (identity_missing,
      identity_malformed, identity_mismatch)
"""


def exit_code_for(error: AgentError) -> int:
    """The documented exit code for ``error``."""
    for classes, code in exit_codes():
        if isinstance(error, classes):
            return code
    return EXIT_ERROR


def _fail(error: AgentError) -> int:
    print(f"FAILED {error.code}: {error}", file=sys.stderr)
    return exit_code_for(error)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    from agent.signing import keys

    path: Path | None = args.passphrase_file
    return keys.read_passphrase_file(path) if path is not None else None


def run_keygen(args: argparse.Namespace) -> int:
    from agent.signing import keys

    try:
        pair = keys.write_key_pair(args.out_dir, args.name, _passphrase(args))
    except AgentError as error:
        return _fail(error)
    print(f"private key {pair.private_key} (mode 0600)")
    print(f"public key  {pair.public_key}")
    print(f"key id      {pair.key_id}")
    return EXIT_OK


def run_sign(args: argparse.Namespace) -> int:
    from agent.signing import keys, oms, version_dir

    try:
        private_key = keys.load_private_key(args.private_key, _passphrase(args))
        path = version_dir.sign_version(
            args.version_dir, private_key, model_name=args.model, version=args.version
        )
        signed = oms.verify_bundle(path.read_bytes(), [private_key.public_key()])
    except AgentError as error:
        return _fail(error)
    except OSError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"signed {len(signed.files)} files into {path} as {signed.model_name}, "
        f"key {signed.key_id}"
    )
    return EXIT_OK


def _expected_identity(args: argparse.Namespace) -> ModelIdentity | None:
    """What ``verify`` requires identity.json to say: --model/--version, else the path
    if it is .../MODEL/VERSION (None: any identity, as long as there is one)."""
    from agent.signing import identity

    if args.model is None and args.version is None:
        try:
            return identity.identity_of_path(args.version_dir.resolve())
        except identity.IdentityMismatchError:
            return None  # a staging directory: not placed in a repository yet
    if args.model is None or args.version is None:
        raise identity.IdentityMismatchError("give both --model and --version, or neither")
    return identity.ModelIdentity(args.model, args.version)


def run_verify(args: argparse.Namespace) -> int:
    from agent.signing import identity, keys, version_dir

    try:
        if args.public_key is not None:
            trust = keys.TrustStore.from_public_key_files([args.public_key])
        else:
            trust = keys.TrustStore.from_directory(args.trust_dir)
        expected = _expected_identity(args)
        verified = version_dir.verify_version(args.version_dir, trust, identity=expected)
        if verified.identity is None:
            raise identity.IdentityMissingError(
                f"{args.version_dir}: the signature covers no identity.json, so the agent "
                "would not load it (sign with --model and --version)"
            )
    except AgentError as error:
        return _fail(error)
    print(f"OK {len(verified.manifest)} files, {verified.identity}, key {verified.key_id}")
    return EXIT_OK


def add_signing_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``keygen``, ``sign`` and ``verify`` to the main parser's subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter

    keygen = subparsers.add_parser(
        "keygen",
        help="make an ECDSA P-256 model-signing key pair",
        description=(
            "Write NAME.key.pem (PKCS#8, mode 0600, encrypted if a passphrase is given) "
            "and NAME.pub.pem into DIR. Existing files are never overwritten. Put the "
            "public key in the agent's trust directory to trust models it signs."
        ),
        epilog=EXIT_CODE_HELP,
        formatter_class=formatter,
    )
    keygen.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where the key pair goes"
    )
    keygen.add_argument("--name", default="model-signing", help="file name stem")
    keygen.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="F",
        help="encrypt the private key with the passphrase in F (one trailing newline dropped)",
    )
    keygen.set_defaults(func=run_keygen)

    sign = subparsers.add_parser(
        "sign",
        help="sign a model version directory (writes VERSION_DIR/model.sig)",
        description=(
            "Sign every file in VERSION_DIR in the OpenSSF model signing format "
            "(sigstore bundle, DSSE, in-toto statement, one SHA-256 per file) and write "
            "VERSION_DIR/model.sig atomically. Like the reference model_signing tool, "
            "model.sig and top-level git metadata (.git, .gitattributes, .github, "
            ".gitignore) are not signed. Symlinks and special files are refused. "
            "First writes VERSION_DIR/identity.json naming the model and version (from "
            "--model/--version, else from the path .../MODEL/VERSION, else an "
            "identity.json already there), which binds the signature to that place."
        ),
        epilog=EXIT_CODE_HELP,
        formatter_class=formatter,
    )
    sign.add_argument(
        "version_dir", type=Path, metavar="VERSION_DIR", help="the version directory to sign"
    )
    sign.add_argument(
        "--private-key", type=Path, required=True, metavar="K", help="ECDSA P-256 private key (PEM)"
    )
    _identity_arguments(sign, "write into identity.json")
    sign.add_argument(
        "--passphrase-file", type=Path, metavar="F", help="passphrase of an encrypted key"
    )
    sign.set_defaults(func=run_sign)

    verify = subparsers.add_parser(
        "verify",
        help="verify a model version directory against a key or the trust store",
        description=(
            "Verify VERSION_DIR/model.sig against a trusted key, then check that the "
            "directory holds exactly the signed files with the signed SHA-256 digests, "
            "and that its signed identity.json names --model/--version (default: the "
            "path, .../MODEL/VERSION, if it is one; else any identity), as the agent "
            "requires. "
            "Prints 'OK <n> files, MODEL/VERSION, key <id>' or 'FAILED <code>: <reason>'."
        ),
        epilog=EXIT_CODE_HELP,
        formatter_class=formatter,
    )
    verify.add_argument(
        "version_dir", type=Path, metavar="VERSION_DIR", help="the version directory to check"
    )
    _identity_arguments(verify, "required in identity.json")
    trust = verify.add_mutually_exclusive_group(required=True)
    trust.add_argument("--public-key", type=Path, metavar="P", help="trust this PEM public key")
    trust.add_argument(
        "--trust-dir", type=Path, metavar="D", help="trust every *.pem public key in D"
    )
    verify.set_defaults(func=run_verify)


def _positive_version(text: str) -> int:
    if not text.isascii() or not text.isdigit() or text.startswith("0") or len(text) > 19:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (1, 2, ...)")
    return int(text)


def _identity_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--model", metavar="NAME", help=f"model name {what} (default: from the path)"
    )
    parser.add_argument(
        "--version", type=_positive_version, metavar="N",
        help=f"model version {what} (default: from the path)",
    )
