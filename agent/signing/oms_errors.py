"""Why an OpenSSF model signature was refused: one class per reason, each with its ``code``.

Raised by :mod:`agent.signing.oms` and :mod:`agent.signing.version_dir`; the
codes appear in logs, exit statuses and fleet reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.errors import VerificationError


class SignatureMissingError(VerificationError):
    """There is no signature: no model.sig, or a DSSE envelope with no signatures."""

    code = "signature_missing"


class BundleMalformedError(VerificationError):
    """model.sig is not a well-formed key-based sigstore bundle (JSON, fields, base64)."""

    code = "signature_malformed"


class BundleMediaTypeError(VerificationError):
    """The bundle's mediaType is not the sigstore bundle v0.3 JSON type."""

    code = "signature_media_type"


class PayloadTypeError(VerificationError):
    """The DSSE payloadType is not application/vnd.in-toto+json."""

    code = "signature_payload_type"


class StatementTypeError(VerificationError):
    """The signed payload is not an in-toto Statement v1."""

    code = "signature_statement_type"


class PredicateTypeError(VerificationError):
    """The statement's predicateType is not the OMS signature v1.0 predicate."""

    code = "signature_predicate_type"


class SerializationUnsupportedError(VerificationError):
    """The manifest was serialized with a method other than whole files."""

    code = "signature_serialization_unsupported"


class HashAlgorithmError(VerificationError):
    """The manifest (or one of its resources) uses a hash other than SHA-256."""

    code = "signature_hash_algorithm"


class DuplicateResourceError(VerificationError):
    """The manifest names the same file twice."""

    code = "signature_duplicate_resource"


class LimitExceededError(BundleMalformedError):
    """model.sig holds more signatures, resources or ignore paths than the agent accepts."""

    code = "signature_limit_exceeded"


class UnsafePathError(VerificationError):
    """A name in the manifest is absolute, climbs out with '..', or is otherwise unsafe."""

    code = "signature_unsafe_path"


class ManifestInconsistentError(VerificationError):
    """The statement contradicts itself (subject digest vs resources, ignored resources)."""

    code = "signature_manifest_inconsistent"


class UntrustedKeyError(VerificationError):
    """The signature names (or was made by) a key that is not in the trust store."""

    code = "signature_untrusted_key"


class BadSignatureError(VerificationError):
    """The signature does not verify under the trusted key it names."""

    code = "signature_invalid"


class UnsupportedKeyError(VerificationError):
    """A key is not an ECDSA P-256 key (another curve, RSA, Ed25519, ...)."""

    code = "key_unsupported"


class KeyFormatError(VerificationError):
    """A key file cannot be read as a PEM key (or the passphrase is wrong)."""

    code = "key_invalid"


class FileMissingError(VerificationError):
    """A file the signature lists is not in the version directory."""

    code = "file_missing"

    def __init__(self, paths: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.paths = tuple(paths)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.paths, str(self)))


class FileUnexpectedError(VerificationError):
    """The version directory holds a file the signature does not list."""

    code = "file_unexpected"

    def __init__(self, paths: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.paths = tuple(paths)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.paths, str(self)))


class FileRenamedError(VerificationError):
    """A signed file is present under another name (same content, different path)."""

    code = "file_renamed"

    def __init__(self, renames: Sequence[tuple[str, str]], message: str) -> None:
        super().__init__(message)
        self.renames = tuple(renames)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.renames, str(self)))


class FileDigestMismatchError(VerificationError):
    """A file's SHA-256 differs from the signed one (altered, truncated or extended)."""

    code = "file_digest_mismatch"

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{path}: content does not match the signature "
            f"(SHA-256 {actual}, signed {expected}); the file was altered, truncated or extended"
        )
        self.path = path
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.expected, self.actual))
