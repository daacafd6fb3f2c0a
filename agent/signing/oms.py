"""The OpenSSF model signing (OMS) format, key-based ECDSA P-256. Pure: no I/O.

A signature (``model.sig``) is a sigstore bundle (media type v0.3) holding a
DSSE envelope whose payload is an in-toto Statement v1 with predicate type
``https://model_signing/signature/v1.0``::

    bundle
      mediaType             application/vnd.dev.sigstore.bundle.v0.3+json
      verificationMaterial  {publicKey: {hint: <key id>}, tlogEntries: []}
      dsseEnvelope          {payload: b64(statement), payloadType: application/vnd.in-toto+json,
                             signatures: [{sig: b64(DER ECDSA over PAE), keyid}]}
    statement
      _type                 https://in-toto.io/Statement/v1
      subject               [{name: <model name>, digest: {sha256: <root digest>}}]
      predicateType         https://model_signing/signature/v1.0
      predicate
        serialization       {method: files, hash_type: sha256, allow_symlinks, ignore_paths}
        resources           [{name: <relative path>, algorithm: sha256, digest: <hex>}, ...]

The root digest is SHA-256 over the concatenated raw resource digests in the
order the resources are listed. The key id (the bundle's public key "hint") is
the hex SHA-256 of the public key's PEM SubjectPublicKeyInfo encoding, exactly
as the reference ``model_signing`` tool computes it.

This module builds and signs statements from a ``{relative_path: sha256_hex}``
manifest, and parses and verifies bundles against a set of trusted keys. The
checks are stricter than the reference verifier where strictness costs no
interoperability: unknown bundle fields, non-canonical base64 and duplicate
JSON keys are rejected, so that any change to a signature file is detected.
Every rejection is a subclass of :class:`agent.errors.VerificationError` with
its own ``code``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.signing.oms_errors import (
    BadSignatureError as BadSignatureError,
)
from agent.signing.oms_errors import (
    BundleMalformedError as BundleMalformedError,
)
from agent.signing.oms_errors import (
    BundleMediaTypeError as BundleMediaTypeError,
)
from agent.signing.oms_errors import (
    DuplicateResourceError as DuplicateResourceError,
)
from agent.signing.oms_errors import (
    FileDigestMismatchError as FileDigestMismatchError,
)
from agent.signing.oms_errors import (
    FileMissingError as FileMissingError,
)
from agent.signing.oms_errors import (
    FileRenamedError as FileRenamedError,
)
from agent.signing.oms_errors import (
    FileUnexpectedError as FileUnexpectedError,
)
from agent.signing.oms_errors import (
    HashAlgorithmError as HashAlgorithmError,
)
from agent.signing.oms_errors import (
    KeyFormatError as KeyFormatError,
)
from agent.signing.oms_errors import (
    LimitExceededError as LimitExceededError,
)
from agent.signing.oms_errors import (
    ManifestInconsistentError as ManifestInconsistentError,
)
from agent.signing.oms_errors import (
    PayloadTypeError as PayloadTypeError,
)
from agent.signing.oms_errors import (
    PredicateTypeError as PredicateTypeError,
)
from agent.signing.oms_errors import (
    SerializationUnsupportedError as SerializationUnsupportedError,
)
from agent.signing.oms_errors import (
    SignatureMissingError as SignatureMissingError,
)
from agent.signing.oms_errors import (
    StatementTypeError as StatementTypeError,
)
from agent.signing.oms_errors import (
    UnsafePathError as UnsafePathError,
)
from agent.signing.oms_errors import (
    UnsupportedKeyError as UnsupportedKeyError,
)
from agent.signing.oms_errors import (
    UntrustedKeyError as UntrustedKeyError,
)
from agent.signing.strict_json import (
    base64_field,
    field_value,
    hex_digest,
    json_array,
    json_object,
    json_string,
    load_json,
    malformed,
    only_keys,
)

BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO_PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"
SERIALIZATION_METHOD: Final = "files"
HASH_ALGORITHM: Final = "sha256"
SIGNATURE_FILENAME: Final = "model.sig"

# What the reference tool leaves out of a directory's manifest by default: its
# own signature file and git metadata, each relative to the model root only.
# The agent signs with the same set, so that both tools see the same files.
DEFAULT_IGNORE_PATHS: Final[tuple[str, ...]] = (
    ".git",
    ".gitattributes",
    ".github",
    ".gitignore",
    SIGNATURE_FILENAME,
)

# Counts the bundle may hold. The reference tool writes one signature; each one
# costs an ECDSA verification (per trusted key when it names none), and the
# signatures are the part of model.sig that nobody signed, so they are few.
MAX_SIGNATURES: Final = 8
MAX_RESOURCES: Final = 65_536  # files one version may list
MAX_IGNORE_PATHS: Final = 256

# \Z, not $: '$' also matches before a trailing newline.
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}\Z")
_MAX_NAME_LENGTH = 4096


# --------------------------------------------------------------------------- keys


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's id: hex SHA-256 of its PEM SubjectPublicKeyInfo (the bundle's key hint)."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an ECDSA key on curve {key.curve.name}"
    return f"a {type(key).__name__.lstrip('_')}"


def require_p256_public_key(key: object, source: str = "key") -> ec.EllipticCurvePublicKey:
    """Return ``key`` if it is an ECDSA P-256 public key, else raise UnsupportedKeyError."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UnsupportedKeyError(
        f"{source} is {_describe_key(key)}; only ECDSA P-256 (secp256r1) keys are supported"
    )


def require_p256_private_key(key: object, source: str = "key") -> ec.EllipticCurvePrivateKey:
    """Return ``key`` if it is an ECDSA P-256 private key, else raise UnsupportedKeyError."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise UnsupportedKeyError(
        f"{source} is {_describe_key(key)}; only ECDSA P-256 (secp256r1) keys are supported"
    )


# --------------------------------------------------------------------------- names


def check_resource_name(name: object, where: str = "resource name") -> str:
    """Return ``name`` if it is a safe, canonical relative POSIX path, else raise.

    Canonical means exactly what the reference tool writes: components joined by
    single slashes, no '.', '..' or empty components, no leading or trailing slash.
    """
    if not isinstance(name, str):
        raise BundleMalformedError(f"{where}: expected a string, got {type(name).__name__}")
    if not name:
        raise UnsafePathError(f"{where}: empty file name")
    if len(name) > _MAX_NAME_LENGTH:
        raise UnsafePathError(f"{where}: file name longer than {_MAX_NAME_LENGTH} characters")
    if name.startswith("/"):
        raise UnsafePathError(f"{where}: {name!r} is an absolute path")
    if "\\" in name:
        raise UnsafePathError(f"{where}: {name!r} contains a backslash")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UnsafePathError(f"{where}: {name!r} contains a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"{where}: {name!r} is not valid UTF-8") from None
    for part in name.split("/"):
        if part == "..":
            raise UnsafePathError(f"{where}: {name!r} climbs out of the directory with '..'")
        if part in ("", "."):
            raise UnsafePathError(
                f"{where}: {name!r} is not a canonical relative path (empty or '.' component)"
            )
    return name


def is_ignored(name: str, ignore_paths: Iterable[str]) -> bool:
    """True if relative path ``name`` is one of ``ignore_paths`` or lies under one."""
    return any(name == p or name.startswith(p + "/") for p in ignore_paths)


def path_sort_key(name: str) -> tuple[str, ...]:
    """Sort key for relative paths: by components, as the reference tool orders resources."""
    return tuple(name.split("/"))


# --------------------------------------------------------------------------- signing


def root_digest(digests: Iterable[str]) -> str:
    """SHA-256 over the concatenated raw digests, in the given order (the subject digest)."""
    hasher = hashlib.sha256()
    for digest in digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def build_statement(
    manifest: Mapping[str, str],
    *,
    model_name: str,
    ignore_paths: Sequence[str] = DEFAULT_IGNORE_PATHS,
) -> dict[str, Any]:
    """The in-toto statement for a ``{relative_path: sha256_hex}`` manifest."""
    if len(manifest) > MAX_RESOURCES:
        raise LimitExceededError(f"{len(manifest)} files, more than the {MAX_RESOURCES} accepted")
    for name, digest in manifest.items():
        check_resource_name(name)
        if not _HEX_DIGEST.fullmatch(digest):
            raise BundleMalformedError(f"{name}: {digest!r} is not a hex SHA-256 digest")
    for path in ignore_paths:
        check_resource_name(path, "ignore path")
    names = sorted(manifest, key=path_sort_key)
    resources = [
        {"name": name, "algorithm": HASH_ALGORITHM, "digest": manifest[name].lower()}
        for name in names
    ]
    return {
        "_type": IN_TOTO_STATEMENT_TYPE,
        "subject": [
            {"name": model_name, "digest": {"sha256": root_digest(r["digest"] for r in resources)}}
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": SERIALIZATION_METHOD,
                "hash_type": HASH_ALGORITHM,
                "allow_symlinks": False,
                "ignore_paths": sorted(ignore_paths),
            },
            "resources": resources,
        },
    }


def encode_statement(statement: Mapping[str, Any]) -> bytes:
    """The statement as DSSE payload bytes (UTF-8 JSON)."""
    return json.dumps(statement, indent=2, ensure_ascii=False).encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature is computed over."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_payload(
    payload: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    payload_type: str = IN_TOTO_PAYLOAD_TYPE,
) -> bytes:
    """Sign ``payload`` with ``private_key`` and return the sigstore bundle JSON bytes."""
    key = require_p256_private_key(private_key, "the signing key")
    kid = key_id(key.public_key())
    signature = key.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": kid}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": payload_type,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"), "keyid": kid}],
        },
    }
    # Compact, no trailing newline: every byte of the file is significant.
    return json.dumps(bundle, separators=(",", ":")).encode("ascii")


def sign_manifest(
    manifest: Mapping[str, str],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    model_name: str,
    ignore_paths: Sequence[str] = DEFAULT_IGNORE_PATHS,
) -> bytes:
    """Build, encode and sign the statement for ``manifest``; return model.sig bytes."""
    statement = build_statement(manifest, model_name=model_name, ignore_paths=ignore_paths)
    return sign_payload(encode_statement(statement), private_key)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class SignedManifest:
    """What a verified signature vouches for."""

    files: Mapping[str, str]  # relative POSIX path -> lowercase hex SHA-256
    key_id: str  # id of the trusted key that verified the signature
    model_name: str  # the statement's subject name (informative only)
    ignore_paths: tuple[str, ...]  # paths the signer excluded (relative to the root)
    allow_symlinks: bool  # as recorded by the signer; the agent refuses symlinks regardless


@dataclass(frozen=True)
class _Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[tuple[bytes, str], ...]  # (DER signature, keyid)
    hint: str


def _parse_bundle(data: bytes) -> _Envelope:
    doc = json_object(load_json(data, "model.sig", BundleMalformedError), "bundle")
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type != BUNDLE_MEDIA_TYPE:
        raise BundleMediaTypeError(
            f"bundle mediaType is {media_type!r}, expected {BUNDLE_MEDIA_TYPE!r}"
        )
    json_string(doc, "mediaType", "bundle")
    if "messageSignature" in doc:
        malformed("bundle", "holds a messageSignature, expected a dsseEnvelope")
    only_keys(doc, ("mediaType", "verificationMaterial", "dsseEnvelope"), "bundle")

    material = json_object(
        field_value(doc, "verificationMaterial", "bundle"), "verificationMaterial"
    )
    for unsupported in ("certificate", "x509CertificateChain"):
        if unsupported in material:
            malformed(
                "verificationMaterial",
                f"holds a {unsupported}; only key-based (publicKey) signatures are supported",
            )
    only_keys(material, ("publicKey", "tlogEntries"), "verificationMaterial")
    public_key = json_object(
        field_value(material, "publicKey", "verificationMaterial"), "publicKey"
    )
    only_keys(public_key, ("hint",), "verificationMaterial.publicKey")
    hint = ""
    if "hint" in public_key and public_key["hint"] is not None:
        hint = json_string(public_key, "hint", "verificationMaterial.publicKey")
    if "tlogEntries" in material:
        # Transparency log entries are not used for key-based verification.
        json_array(material["tlogEntries"], "verificationMaterial.tlogEntries")

    envelope = json_object(field_value(doc, "dsseEnvelope", "bundle"), "dsseEnvelope")
    only_keys(envelope, ("payload", "payloadType", "signatures"), "dsseEnvelope")
    payload_type = json_string(envelope, "payloadType", "dsseEnvelope")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise PayloadTypeError(
            f"DSSE payloadType is {payload_type!r}, expected {IN_TOTO_PAYLOAD_TYPE!r}"
        )
    payload = base64_field(json_string(envelope, "payload", "dsseEnvelope"), "dsseEnvelope.payload")
    raw_signatures = json_array(field_value(envelope, "signatures", "dsseEnvelope"), "signatures")
    if not raw_signatures:
        raise SignatureMissingError("the DSSE envelope holds no signatures")
    if len(raw_signatures) > MAX_SIGNATURES:
        raise LimitExceededError(
            f"dsseEnvelope.signatures: {len(raw_signatures)} signatures, more than the "
            f"{MAX_SIGNATURES} accepted"
        )
    signatures = []
    for index, raw in enumerate(raw_signatures):
        where = f"dsseEnvelope.signatures[{index}]"
        entry = json_object(raw, where)
        only_keys(entry, ("sig", "keyid"), where)
        sig = base64_field(json_string(entry, "sig", where), f"{where}.sig")
        if not sig:
            raise SignatureMissingError(f"{where}.sig is empty")
        keyid = ""
        if "keyid" in entry and entry["keyid"] is not None:
            keyid = json_string(entry, "keyid", where)
        if keyid and hint and keyid != hint:
            malformed(
                where, f"keyid {keyid!r} disagrees with the bundle's public key hint {hint!r}"
            )
        signatures.append((sig, keyid))
    return _Envelope(payload_type, payload, tuple(signatures), hint)


def _check_signature(envelope: _Envelope, trusted: Mapping[str, ec.EllipticCurvePublicKey]) -> str:
    """Return the id of a trusted key that verifies one of the envelope's signatures."""
    message = pae(envelope.payload_type, envelope.payload)
    untrusted: list[str] = []
    tried: list[str] = []
    for sig, keyid in envelope.signatures:
        named = keyid or envelope.hint
        if named:
            if named not in trusted:
                untrusted.append(named)
                continue
            candidates = [named]
        else:
            candidates = sorted(trusted)
        for candidate in candidates:
            tried.append(candidate)
            try:
                trusted[candidate].verify(sig, message, ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                continue
            return candidate
    if tried:
        if envelope.hint or all(keyid for _, keyid in envelope.signatures):
            raise BadSignatureError(
                f"the signature does not verify under trusted key {tried[0]} that it names "
                "(signature or signed statement altered)"
            )
        raise BadSignatureError(
            "the signature names no key and verifies under none of the "
            f"{len(trusted)} trusted key(s)"
        )
    if not untrusted:
        raise UntrustedKeyError("the signature names no key and the trust store holds no keys")
    if not trusted:
        raise UntrustedKeyError(f"signed by key {untrusted[0]}, but the trust store holds no keys")
    raise UntrustedKeyError(f"signed by key {untrusted[0]}, which is not in the trust store")


def _parse_statement(payload: bytes) -> tuple[dict[str, str], str, tuple[str, ...], bool]:
    statement = json_object(
        load_json(payload, "signed statement", BundleMalformedError), "statement"
    )
    statement_type = field_value(statement, "_type", "statement")
    if statement_type != IN_TOTO_STATEMENT_TYPE:
        raise StatementTypeError(
            f"statement _type is {statement_type!r}, expected {IN_TOTO_STATEMENT_TYPE!r}"
        )
    predicate_type = field_value(statement, "predicateType", "statement")
    if predicate_type != PREDICATE_TYPE:
        raise PredicateTypeError(
            f"statement predicateType is {predicate_type!r}, expected {PREDICATE_TYPE!r}"
        )

    subjects = json_array(field_value(statement, "subject", "statement"), "statement.subject")
    if len(subjects) != 1:
        raise ManifestInconsistentError(
            f"statement.subject: expected exactly one subject, got {len(subjects)}"
        )
    subject = json_object(subjects[0], "statement.subject[0]")
    model_name = json_string(subject, "name", "statement.subject[0]")
    subject_digest = json_object(
        field_value(subject, "digest", "statement.subject[0]"), "statement.subject[0].digest"
    )
    if "sha256" not in subject_digest:
        raise HashAlgorithmError(
            "statement.subject[0].digest has no sha256 digest "
            f"(has {', '.join(sorted(subject_digest)) or 'none'})"
        )
    expected_root = hex_digest(subject_digest["sha256"], "statement.subject[0].digest.sha256")

    predicate = json_object(field_value(statement, "predicate", "statement"), "predicate")
    serialization_args = json_object(
        field_value(predicate, "serialization", "predicate"), "predicate.serialization"
    )
    method = field_value(serialization_args, "method", "predicate.serialization")
    if method != SERIALIZATION_METHOD:
        raise SerializationUnsupportedError(
            f"predicate.serialization.method is {method!r}; only {SERIALIZATION_METHOD!r} "
            "(one digest per whole file) is supported"
        )
    hash_type = field_value(serialization_args, "hash_type", "predicate.serialization")
    if hash_type != HASH_ALGORITHM:
        raise HashAlgorithmError(
            f"predicate.serialization.hash_type is {hash_type!r}; only {HASH_ALGORITHM!r} "
            "is supported"
        )
    allow_symlinks = field_value(serialization_args, "allow_symlinks", "predicate.serialization")
    if not isinstance(allow_symlinks, bool):
        malformed("predicate.serialization.allow_symlinks", "expected a boolean")
    ignore_paths: list[str] = []
    if "ignore_paths" in serialization_args:
        raw_ignore = json_array(
            serialization_args["ignore_paths"], "predicate.serialization.ignore_paths"
        )
        if len(raw_ignore) > MAX_IGNORE_PATHS:
            raise LimitExceededError(
                f"predicate.serialization.ignore_paths: {len(raw_ignore)} paths, more than "
                f"the {MAX_IGNORE_PATHS} accepted"
            )
        for index, path in enumerate(raw_ignore):
            ignore_paths.append(
                check_resource_name(path, f"predicate.serialization.ignore_paths[{index}]")
            )

    resources = json_array(field_value(predicate, "resources", "predicate"), "predicate.resources")
    if len(resources) > MAX_RESOURCES:
        raise LimitExceededError(
            f"predicate.resources: {len(resources)} files, more than the {MAX_RESOURCES} accepted"
        )
    files: dict[str, str] = {}
    ordered: list[str] = []
    for index, raw in enumerate(resources):
        where = f"predicate.resources[{index}]"
        resource = json_object(raw, where)
        name = check_resource_name(field_value(resource, "name", where), f"{where}.name")
        algorithm = field_value(resource, "algorithm", where)
        if algorithm != HASH_ALGORITHM:
            raise HashAlgorithmError(
                f"{where} ({name}): algorithm is {algorithm!r}; only {HASH_ALGORITHM!r} "
                "is supported"
            )
        digest = hex_digest(field_value(resource, "digest", where), f"{where}.digest")
        if name in files:
            raise DuplicateResourceError(f"{where}: {name!r} is listed more than once")
        if is_ignored(name, ignore_paths):
            raise ManifestInconsistentError(
                f"{where}: {name!r} is listed although it lies under an ignored path"
            )
        files[name] = digest
        ordered.append(digest)

    actual_root = root_digest(ordered)
    if actual_root != expected_root:
        raise ManifestInconsistentError(
            f"statement.subject digest is {expected_root}, but the resources hash to {actual_root}"
        )
    return files, model_name, tuple(ignore_paths), allow_symlinks


def verify_bundle(
    bundle: bytes, trusted_keys: Iterable[ec.EllipticCurvePublicKey]
) -> SignedManifest:
    """Verify model.sig bytes against trusted P-256 public keys; return the signed manifest.

    Raises a :class:`VerificationError` subclass naming the field or key at fault.
    The statement is only interpreted after its signature has verified.
    """
    trusted: dict[str, ec.EllipticCurvePublicKey] = {}
    for index, key in enumerate(trusted_keys):
        p256 = require_p256_public_key(key, f"trusted key #{index + 1}")
        trusted.setdefault(key_id(p256), p256)
    envelope = _parse_bundle(bundle)
    kid = _check_signature(envelope, trusted)
    files, model_name, ignore_paths, allow_symlinks = _parse_statement(envelope.payload)
    return SignedManifest(
        files=files,
        key_id=kid,
        model_name=model_name,
        ignore_paths=ignore_paths,
        allow_symlinks=allow_symlinks,
    )


# --------------------------------------------------------------------------- comparison


def check_file_set(
    signed: Mapping[str, str],
    present: Collection[str],
    digest_of: Callable[[str], str | None],
) -> None:
    """Raise if the files ``present`` are not exactly the files ``signed`` lists.

    ``digest_of`` is asked for the digest of each unexpected file (None if it
    cannot tell), to recognise a signed file that was renamed. Renames are
    reported first, then missing files, then unexpected ones; every message
    lists all differences.
    """
    present_set = set(present)
    missing = sorted(set(signed) - present_set, key=path_sort_key)
    unexpected = sorted(present_set - set(signed), key=path_sort_key)
    if not missing and not unexpected:
        return
    renames: list[tuple[str, str]] = []
    if missing:
        by_digest: dict[str, list[str]] = {}
        for name in missing:
            by_digest.setdefault(signed[name], []).append(name)
        for name in unexpected:
            digest = digest_of(name)
            if digest is not None and by_digest.get(digest):
                renames.append((by_digest[digest].pop(0), name))
    renamed_from = {old for old, _ in renames}
    renamed_to = {new for _, new in renames}
    missing = [name for name in missing if name not in renamed_from]
    unexpected = [name for name in unexpected if name not in renamed_to]

    parts: list[str] = []
    if renames:
        parts.append("renamed: " + ", ".join(f"{old!r} is now {new!r}" for old, new in renames))
    if missing:
        parts.append("missing: " + ", ".join(map(repr, missing)))
    if unexpected:
        parts.append("not covered by the signature: " + ", ".join(map(repr, unexpected)))
    message = "directory does not match the signature; " + "; ".join(parts)
    if renames:
        raise FileRenamedError(renames, message)
    if missing:
        raise FileMissingError(missing, message)
    raise FileUnexpectedError(unexpected, message)


def check_digest(name: str, signed: Mapping[str, str], actual_digest: str) -> None:
    """Raise FileDigestMismatchError if ``actual_digest`` is not the signed digest of ``name``."""
    expected = signed[name]
    if actual_digest.lower() != expected:
        raise FileDigestMismatchError(name, expected, actual_digest.lower())


def compare_manifest(signed: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Raise the specific error for the first difference between two manifests."""
    check_file_set(signed, actual.keys(), actual.get)
    for name in sorted(signed, key=path_sort_key):
        check_digest(name, signed, actual[name])
