"""Model signing: the OpenSSF model signing format, keys and the trust store.

``oms`` is the pure format (build, sign, parse, verify); ``keys`` generates and
loads ECDSA P-256 keys and holds the trust store; ``version_dir`` signs and
verifies a version directory on disk; ``cli`` adds the keygen / sign / verify
subcommands to the agent's command line.
"""

# The names below are loaded on first use (PEP 562), not when the package is
# imported: `edge-agent serve` imports agent.signing.cli for its parser, and an agent
# that serves unsigned models must not pay for cryptography at start-up.
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.signing.keys import (
        KeyPairFiles,
        KeyWriteError,
        TrustedKey,
        TrustStore,
        TrustStoreError,
        generate_private_key,
        load_private_key,
        load_public_key,
        read_passphrase_file,
        write_key_pair,
    )
    from agent.signing.oms import (
        BadSignatureError,
        BundleMalformedError,
        BundleMediaTypeError,
        DuplicateResourceError,
        FileDigestMismatchError,
        FileMissingError,
        FileRenamedError,
        FileUnexpectedError,
        HashAlgorithmError,
        KeyFormatError,
        ManifestInconsistentError,
        PayloadTypeError,
        PredicateTypeError,
        SerializationUnsupportedError,
        SignatureMissingError,
        SignedManifest,
        StatementTypeError,
        UnsafePathError,
        UnsupportedKeyError,
        UntrustedKeyError,
        key_id,
        sign_manifest,
        verify_bundle,
    )
    from agent.signing.version_dir import (
        FileNotSignedError,
        FileReadError,
        SpecialFileError,
        SymlinkEscapesError,
        SymlinkRefusedError,
        VerifiedVersion,
        sign_version,
        verify_version,
    )

__all__ = [
    "BadSignatureError",
    "BundleMalformedError",
    "BundleMediaTypeError",
    "DuplicateResourceError",
    "FileDigestMismatchError",
    "FileMissingError",
    "FileNotSignedError",
    "FileReadError",
    "FileRenamedError",
    "FileUnexpectedError",
    "HashAlgorithmError",
    "KeyFormatError",
    "KeyPairFiles",
    "KeyWriteError",
    "ManifestInconsistentError",
    "PayloadTypeError",
    "PredicateTypeError",
    "SerializationUnsupportedError",
    "SignatureMissingError",
    "SignedManifest",
    "SpecialFileError",
    "StatementTypeError",
    "SymlinkEscapesError",
    "SymlinkRefusedError",
    "TrustStore",
    "TrustStoreError",
    "TrustedKey",
    "UnsafePathError",
    "UnsupportedKeyError",
    "UntrustedKeyError",
    "VerifiedVersion",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_passphrase_file",
    "sign_manifest",
    "sign_version",
    "verify_bundle",
    "verify_version",
    "write_key_pair",
]

_MODULES = ("keys", "oms", "version_dir")


def __getattr__(name: str) -> Any:
    import importlib

    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(f"agent.signing.{module}"), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module 'agent.signing' has no attribute {name!r}")
