"""What a signed version directory says it is: ``identity.json``, naming model and version.

The OMS statement lists files and digests but nothing that ties them to a place
in a repository: the reference ``model_signing`` tool names its subject after
the directory (``"3"`` for ``<repo>/demo/3``) and has no option to name the
model. So a version directory carries a small file, signed like any other::

    {"schema": "edge.model_identity", "version": 1, "model": "demo", "model_version": 3}

Whoever loads, installs or publishes a version compares it with where the
version is going (``<model>/<version>`` in the repository, the deployment's
model and version, the publish command's arguments) and refuses any difference.
Pure: no I/O.

The name rules here are the agent's single definition of a model name; the
protocol and the repository apply the same shape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Final

from agent.errors import VerificationError

IDENTITY_FILENAME: Final = "identity.json"
IDENTITY_SCHEMA: Final = "edge.model_identity"
IDENTITY_SCHEMA_VERSION: Final = 1
MAX_IDENTITY_BYTES: Final = 4096
MAX_MODEL_VERSION: Final = 2**63 - 1

# \Z, not $: '$' also matches before a trailing newline ("model\n").
MODEL_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_VERSION_TEXT: Final = re.compile(r"[1-9][0-9]{0,18}\Z")


def is_model_name(value: object) -> bool:
    """1-128 of letters, digits, '_', '.', '-'; not starting with '.' or '-'; no '..'."""
    return isinstance(value, str) and MODEL_NAME.fullmatch(value) is not None and ".." not in value


class IdentityMissingError(VerificationError):
    """The version's signature does not cover an identity.json (unbound to model/version)."""

    code = "identity_missing"


class IdentityMalformedError(VerificationError):
    """The signed identity.json is not a well-formed identity document."""

    code = "identity_malformed"


class IdentityMismatchError(VerificationError):
    """The signed identity names another model or version than the place it is used for."""

    code = "identity_mismatch"


@dataclass(frozen=True, order=True)
class ModelIdentity:
    model: str
    version: int

    def __post_init__(self) -> None:
        if not is_model_name(self.model):
            raise IdentityMalformedError(f"{self.model!r} is not a valid model name")
        if type(self.version) is not int or not 1 <= self.version <= MAX_MODEL_VERSION:
            raise IdentityMalformedError(f"{self.version!r} is not a model version (1..2^63-1)")

    def __str__(self) -> str:
        return f"{self.model}/{self.version}"


def identity_of_path(version_dir: PurePath) -> ModelIdentity:
    """The identity a repository path ``.../<model>/<version>`` stands for.

    The version must be written canonically (``3``, not ``03``), as the loader names it.
    """
    version = version_of_path(version_dir)
    try:
        return ModelIdentity(version_dir.parent.name, version)
    except IdentityMalformedError as exc:
        raise IdentityMismatchError(f"{version_dir}: not under a model directory: {exc}") from None


def version_of_path(version_dir: PurePath) -> int:
    """The version number a directory's name stands for, if written canonically."""
    name = version_dir.name
    if not _VERSION_TEXT.fullmatch(name) or int(name) > MAX_MODEL_VERSION:
        raise IdentityMismatchError(
            f"{version_dir}: {name!r} is not a canonical version number "
            "(a version directory is <model>/<version>, e.g. demo/3)"
        )
    return int(name)


def encode_identity(identity: ModelIdentity) -> bytes:
    """The identity.json bytes for ``identity`` (compact keys, one trailing newline)."""
    doc = {
        "schema": IDENTITY_SCHEMA,
        "version": IDENTITY_SCHEMA_VERSION,
        "model": identity.model,
        "model_version": identity.version,
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise IdentityMalformedError(f"{IDENTITY_FILENAME}: field {key!r} appears twice")
        result[key] = value
    return result


def parse_identity(data: bytes) -> ModelIdentity:
    """Parse identity.json bytes strictly (exact fields, no duplicates, bounded size)."""
    where = IDENTITY_FILENAME
    if len(data) > MAX_IDENTITY_BYTES:
        raise IdentityMalformedError(f"{where}: {len(data)} bytes, more than {MAX_IDENTITY_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, IdentityMalformedError):
            raise
        raise IdentityMalformedError(f"{where}: not UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise IdentityMalformedError(f"{where}: expected a JSON object")
    fields = {"schema", "version", "model", "model_version"}
    if set(doc) != fields:
        missing = sorted(fields - set(doc))
        unknown = sorted(set(doc) - fields)
        raise IdentityMalformedError(
            f"{where}: missing field(s) {missing}, unknown field(s) {unknown}"
        )
    if doc["schema"] != IDENTITY_SCHEMA or doc["version"] != IDENTITY_SCHEMA_VERSION \
            or type(doc["version"]) is not int:
        raise IdentityMalformedError(
            f"{where}: schema {doc['schema']!r} version {doc['version']!r}, expected "
            f"{IDENTITY_SCHEMA!r} version {IDENTITY_SCHEMA_VERSION}"
        )
    try:
        return ModelIdentity(doc["model"], doc["model_version"])
    except IdentityMalformedError as exc:
        raise IdentityMalformedError(f"{where}: {exc}") from None


def check_identity(signed: ModelIdentity | None, expected: ModelIdentity, where: str) -> None:
    """Raise unless the signed identity is present and is ``expected``."""
    if signed is None:
        raise IdentityMissingError(
            f"{where}: the signature covers no {IDENTITY_FILENAME}, so it does not say which "
            f"model and version it signs; expected {expected} (re-sign with "
            f"'edge-agent sign --model {expected.model} --version {expected.version}')"
        )
    if signed != expected:
        raise IdentityMismatchError(
            f"{where}: signed as {signed} but used as {expected} (a signed version copied to "
            "another model name or version number is refused)"
        )
