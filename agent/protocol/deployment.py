"""Signed deployment documents: parse, verify, sign. Pure: no I/O, no clock.

A deployment (docs/fleet-protocol.md) tells one or more devices to run one
version of one model. It travels as a DSSE envelope signed with ECDSA P-256 by
a key in the device's *deployment* trust store (a directory of public keys that
is distinct from the model-signing trust store). ``verify_deployment`` checks,
in this order, and raises a :class:`DeploymentRejectedError` subclass whose
``code`` is the stable reason reported upstream:

==========================  ==================================================
``message_too_large``       the envelope is larger than the JSON limit
``message_malformed``       not UTF-8 JSON, duplicate keys, wrong or unknown
                            fields, bad base64, out-of-range values
``schema_unsupported``      unknown ``schema`` name or ``version``
``signature_missing``       no signature at all
``signature_untrusted_key`` signed only by keys the device does not trust
``signature_invalid``       a signature by a trusted key does not verify
``wrong_device``            the device's id is not in ``devices``
``expired``                 ``expires_at`` has passed (anti-freeze)
``not_yet_valid``           ``issued_at`` lies further in the future than the
                            allowed clock skew
``sequence_replayed``       ``sequence`` is not above the highest accepted one
``version_rollback``        ``model.version`` is not above the highest version
                            ever activated, and no downgrade is authorised
``unsafe_path``             a file path is absolute, climbs out, or is odd
``size_exceeded``           a declared size or their sum is above the limit
``model_unsigned``          ``files`` does not list ``model.sig``
==========================  ==================================================

After the download, ``check_signed_manifest`` compares the deployment's file
list with the manifest inside the version's ``model.sig`` (``file_set_mismatch``
on any difference: no mix-and-match of files that were never signed together).

The verification context (device id, clock, anti-replay and anti-rollback
counters, size limit) is passed in, so this module can be tested exhaustively
without a clock, a file system or a network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import VerificationError
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id
from agent.signing.keys import TrustStore
from agent.signing.oms import check_resource_name, key_id, pae, require_p256_private_key

SCHEMA_VERSION: Final = 1
ENVELOPE_SCHEMA: Final = "edge.deployment_envelope"
DEPLOYMENT_SCHEMA: Final = "edge.deployment"
PAYLOAD_TYPE: Final = "application/vnd.edge-agent.deployment+json"
MAX_MESSAGE_BYTES: Final = 64 * 1024  # every JSON message of the protocol
MAX_CLOCK_SKEW_S: Final = 300.0
MODEL_SIGNATURE_PATH: Final = "model.sig"
CONFIG_PATH: Final = "config.pbtxt"
MAX_FILES: Final = 1000
MAX_DEVICES: Final = 10_000
MAX_SIGNATURES: Final = 4
MAX_PATH_DEPTH: Final = 8
MAX_COMPONENT_LENGTH: Final = 255
MAX_PROBATION_S: Final = 7 * 24 * 3600

# The same shapes as docs/fleet-protocol.md and agent.serving.repository (which this pure
# module must not import: it pulls in agent.wire, which cannot share a process
# with tritonclient). Matched with fullmatch and ending in \Z: '$' would also
# accept a trailing newline ("dev-1\n").
DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*\Z")
_KEY_ID = re.compile(r"[0-9a-f]{64}\Z")

def is_device_id(value: object) -> bool:
    """1-64 letters, digits, '_', '.' or '-', not in the controllers' namespace
    (agent.protocol.names)."""
    return (
        isinstance(value, str)
        and DEVICE_ID.fullmatch(value) is not None
        and not is_reserved_device_id(value)
    )


# --------------------------------------------------------------------------- errors


class DeploymentRejectedError(VerificationError):
    """A deployment (or a file it names) was rejected; ``code`` says why."""

    code = "deployment_rejected"


class MessageTooLargeError(DeploymentRejectedError):
    code = "message_too_large"


class MalformedMessageError(DeploymentRejectedError):
    code = "message_malformed"


class UnsupportedSchemaError(DeploymentRejectedError):
    code = "schema_unsupported"


class DeploymentUnsignedError(DeploymentRejectedError):
    code = "signature_missing"


class UntrustedDeploymentKeyError(DeploymentRejectedError):
    code = "signature_untrusted_key"


class BadDeploymentSignatureError(DeploymentRejectedError):
    code = "signature_invalid"


class WrongDeviceError(DeploymentRejectedError):
    code = "wrong_device"


class ExpiredError(DeploymentRejectedError):
    code = "expired"


class NotYetValidError(DeploymentRejectedError):
    code = "not_yet_valid"


class ReplayError(DeploymentRejectedError):
    code = "sequence_replayed"


class RollbackError(DeploymentRejectedError):
    code = "version_rollback"


class UnsafePathError(DeploymentRejectedError):
    code = "unsafe_path"


class SizeExceededError(DeploymentRejectedError):
    code = "size_exceeded"


class ModelUnsignedError(DeploymentRejectedError):
    code = "model_unsigned"


class FileSetMismatchError(DeploymentRejectedError):
    code = "file_set_mismatch"


class DigestMismatchError(DeploymentRejectedError):
    code = "digest_mismatch"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class DeploymentFile:
    path: str  # relative to the version directory ("config.pbtxt" for the model config)
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Deployment:
    """A verified deployment."""

    deployment_id: str
    sequence: int
    devices: tuple[str, ...]
    issued_at: float
    expires_at: float
    model_name: str
    model_version: int
    files: tuple[DeploymentFile, ...]  # the version directory's files, model.sig included
    config: DeploymentFile | None  # the model's config.pbtxt, if the deployment sets one
    allow_downgrade: bool
    probation_s: float | None  # None: the device's configured default
    key_id: str  # the trusted key that signed it
    envelope_sha256: str  # identifies this exact message (re-deliveries are recognised)

    @property
    def artifacts(self) -> tuple[DeploymentFile, ...]:
        """Everything to download: the version's files, then the config if any."""
        return self.files + ((self.config,) if self.config is not None else ())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.artifacts)


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """What the device knows when it judges a deployment."""

    device_id: str
    now: float  # unix seconds
    highest_sequence: int  # the highest sequence accepted so far (0: none)
    highest_versions: Mapping[str, int] = field(default_factory=dict)  # model -> activated
    max_model_bytes: int = 4 * 1024**3
    max_clock_skew_s: float = MAX_CLOCK_SKEW_S
    max_message_bytes: int = MAX_MESSAGE_BYTES


# --------------------------------------------------------------------------- JSON helpers


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_strict_json(data: bytes, what: str) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys, NaN/Infinity and a byte-order mark."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessageError(f"{what}: not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise MalformedMessageError(f"{what}: key {exc.args[0]!r} appears twice") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{what}: not valid JSON ({exc})") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{where}: expected a JSON object")
    return value


def _keys(obj: Mapping[str, Any], required: set[str], optional: set[str], where: str) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise MalformedMessageError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise MalformedMessageError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _string(obj: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str]) -> str:
    value = obj[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise MalformedMessageError(f"{where}.{key}: {_short(value)} is not valid")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = obj[key]
    if type(value) is not int or not low <= value <= high:
        raise MalformedMessageError(
            f"{where}.{key}: {_short(value)} is not an integer in [{low}, {high}]"
        )
    return value


def _number(obj: Mapping[str, Any], key: str, where: str, low: float, high: float) -> float:
    value = obj[key]
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise MalformedMessageError(f"{where}.{key}: {_short(value)} is not a number in range")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _schema(obj: Mapping[str, Any], name: str, where: str) -> None:
    if "schema" not in obj or "version" not in obj:
        raise MalformedMessageError(f"{where}: every message needs 'schema' and 'version'")
    if obj["schema"] != name:
        raise UnsupportedSchemaError(f"{where}: schema {_short(obj['schema'])}, expected {name!r}")
    if type(obj["version"]) is not int or obj["version"] != SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            f"{where}: {name} version {_short(obj['version'])} is not supported "
            f"(this agent speaks version {SCHEMA_VERSION})"
        )


def _strict_base64(value: Any, where: str) -> bytes:
    """Standard padded base64, and only its canonical encoding (one text per byte string)."""
    if not isinstance(value, str):
        raise MalformedMessageError(f"{where}: expected a base64 string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessageError(f"{where}: not valid base64") from None
    if base64.b64encode(decoded).decode("ascii") != value:
        raise MalformedMessageError(f"{where}: not canonical base64")
    return decoded


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class _Envelope:
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (key id, DER signature)


def _parse_envelope(data: bytes, limit: int) -> _Envelope:
    if len(data) > limit:
        raise MessageTooLargeError(
            f"deployment envelope is {len(data)} bytes, more than the limit of {limit}"
        )
    envelope = _object(load_strict_json(data, "deployment envelope"), "deployment envelope")
    where = "deployment envelope"
    _schema(envelope, ENVELOPE_SCHEMA, where)
    _keys(envelope, {"schema", "version", "payloadType", "payload", "signatures"}, set(), where)
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise UnsupportedSchemaError(
            f"{where}.payloadType: {_short(envelope['payloadType'])}, expected {PAYLOAD_TYPE!r}"
        )
    payload = _strict_base64(envelope["payload"], f"{where}.payload")
    raw = envelope["signatures"]
    if not isinstance(raw, list):
        raise MalformedMessageError(f"{where}.signatures: expected a list")
    if not raw:
        raise DeploymentUnsignedError("the deployment carries no signature")
    if len(raw) > MAX_SIGNATURES:
        raise MalformedMessageError(f"{where}.signatures: more than {MAX_SIGNATURES}")
    signatures = []
    for index, entry in enumerate(raw):
        at = f"{where}.signatures[{index}]"
        entry = _object(entry, at)
        _keys(entry, {"keyid", "sig"}, set(), at)
        kid = _string(entry, "keyid", at, _KEY_ID)
        sig = _strict_base64(entry["sig"], f"{at}.sig")
        if not sig:
            raise DeploymentUnsignedError(f"{at}.sig is empty")
        signatures.append((kid, sig))
    return _Envelope(payload, tuple(signatures))


def _check_signatures(envelope: _Envelope, trust: TrustStore) -> str:
    """The id of the trusted key that signed; every trusted signature must verify."""
    message = pae(PAYLOAD_TYPE, envelope.payload)
    keys = {key.key_id: key.public_key for key in trust}
    good = ""
    for kid, sig in envelope.signatures:
        public_key = keys.get(kid)
        if public_key is None:
            continue  # another key (e.g. during a key rotation); not evidence either way
        try:
            public_key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise BadDeploymentSignatureError(
                f"the signature by trusted deployment key {kid} does not verify "
                "(deployment altered or forged)"
            ) from None
        good = good or kid
    if not good:
        named = ", ".join(kid for kid, _ in envelope.signatures)
        raise UntrustedDeploymentKeyError(
            f"signed by {named}, not by a key in the deployment trust store "
            f"({len(trust)} key(s))"
        )
    return good


def check_file_path(path: Any, where: str) -> str:
    """``path`` if it is a safe relative path inside a version directory, else UnsafePathError."""
    if not isinstance(path, str):
        raise MalformedMessageError(f"{where}: expected a string")
    try:
        check_resource_name(path, where)
    except VerificationError as exc:
        raise UnsafePathError(str(exc)) from None
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafePathError(f"{where}: {path!r} is nested more than {MAX_PATH_DEPTH} deep")
    for part in parts:
        if len(part) > MAX_COMPONENT_LENGTH or not _PATH_COMPONENT.fullmatch(part):
            raise UnsafePathError(
                f"{where}: {path!r}: each component must be letters, digits and '_.+=-', "
                "not start with '.' or '-', and be at most 255 long"
            )
    return str(path)


def _file(raw: Any, where: str, limit: int, fixed_path: str | None = None) -> DeploymentFile:
    entry = _object(raw, where)
    required = {"sha256", "size"} if fixed_path else {"path", "sha256", "size"}
    _keys(entry, required, set(), where)
    path = fixed_path or check_file_path(entry["path"], f"{where}.path")
    sha = _string(entry, "sha256", where, SHA256_HEX)
    size = entry["size"]
    if type(size) is not int or size < 0:
        raise MalformedMessageError(f"{where}.size: {_short(size)} is not a size")
    if size > limit:
        raise SizeExceededError(
            f"{where}: {path} declares {size} bytes, more than the limit of {limit}"
        )
    return DeploymentFile(path, sha, size)


def _parse_deployment(payload: bytes, kid: str, envelope_sha: str, limit: int) -> Deployment:
    where = "deployment"
    doc = _object(load_strict_json(payload, where), where)
    _schema(doc, DEPLOYMENT_SCHEMA, where)
    _keys(
        doc,
        {"schema", "version", "deployment_id", "sequence", "devices", "issued_at", "expires_at",
         "model"},
        {"allow_downgrade", "probation_s"},
        where,
    )
    deployment_id = _string(doc, "deployment_id", where, DEPLOYMENT_ID)
    sequence = _int(doc, "sequence", where, 1, 2**63 - 1)
    devices = doc["devices"]
    if (
        not isinstance(devices, list)
        or not 1 <= len(devices) <= MAX_DEVICES
        or not all(is_device_id(d) for d in devices)
        or len(set(devices)) != len(devices)
    ):
        raise MalformedMessageError(
            f"{where}.devices: expected 1-{MAX_DEVICES} distinct device ids (none starting "
            f"with {RESERVED_DEVICE_PREFIX!r}, reserved for controllers)"
        )
    issued_at = _number(doc, "issued_at", where, 0, 2**40)
    expires_at = _number(doc, "expires_at", where, 0, 2**40)
    if expires_at <= issued_at:
        raise MalformedMessageError(f"{where}: expires_at is not after issued_at")
    allow_downgrade = doc.get("allow_downgrade", False)
    if type(allow_downgrade) is not bool:
        raise MalformedMessageError(f"{where}.allow_downgrade: expected true or false")
    probation: float | None = None
    if doc.get("probation_s") is not None:
        probation = _number(doc, "probation_s", where, 0, MAX_PROBATION_S)

    model = _object(doc["model"], f"{where}.model")
    at = f"{where}.model"
    _keys(model, {"name", "version", "files"}, {"config"}, at)
    name = _string(model, "name", at, MODEL_NAME)
    if ".." in name:
        raise MalformedMessageError(f"{at}.name: {name!r} is not a valid model name")
    version = _int(model, "version", at, 1, 2**63 - 1)
    raw_files = model["files"]
    if not isinstance(raw_files, list) or not 1 <= len(raw_files) <= MAX_FILES:
        raise MalformedMessageError(f"{at}.files: expected a list of 1-{MAX_FILES} files")
    files = tuple(_file(f, f"{at}.files[{i}]", limit) for i, f in enumerate(raw_files))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise MalformedMessageError(f"{at}.files: a path is listed twice")
    prefixes = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    if prefixes & set(paths):
        raise UnsafePathError(f"{at}.files: a path is both a file and a directory")
    config = None
    if model.get("config") is not None:
        config = _file(model["config"], f"{at}.config", limit, fixed_path=CONFIG_PATH)
    return Deployment(
        deployment_id=deployment_id,
        sequence=sequence,
        devices=tuple(devices),
        issued_at=issued_at,
        expires_at=expires_at,
        model_name=name,
        model_version=version,
        files=files,
        config=config,
        allow_downgrade=allow_downgrade,
        probation_s=probation,
        key_id=kid,
        envelope_sha256=envelope_sha,
    )


# --------------------------------------------------------------------------- verification


def verify_deployment(data: bytes, trust: TrustStore, context: DeviceContext) -> Deployment:
    """Parse and verify a deployment envelope for the device in ``context``.

    Raises a :class:`DeploymentRejectedError` subclass (see the module docstring).
    """
    envelope = _parse_envelope(data, context.max_message_bytes)
    kid = _check_signatures(envelope, trust)
    deployment = _parse_deployment(
        envelope.payload, kid, hashlib.sha256(data).hexdigest(), context.max_model_bytes
    )
    d = deployment
    if context.device_id not in d.devices:
        raise WrongDeviceError(
            f"deployment {d.deployment_id} is for {', '.join(d.devices[:5])}"
            f"{' ...' if len(d.devices) > 5 else ''}, not for {context.device_id}"
        )
    if context.now >= d.expires_at:
        raise ExpiredError(
            f"deployment {d.deployment_id} expired {context.now - d.expires_at:.0f}s ago"
        )
    if d.issued_at > context.now + context.max_clock_skew_s:
        raise NotYetValidError(
            f"deployment {d.deployment_id} is issued {d.issued_at - context.now:.0f}s in the "
            f"future (more than the allowed clock skew of {context.max_clock_skew_s:.0f}s)"
        )
    if d.sequence <= context.highest_sequence:
        raise ReplayError(
            f"deployment {d.deployment_id} has sequence {d.sequence}; this device has already "
            f"accepted {context.highest_sequence}"
        )
    highest = context.highest_versions.get(d.model_name, 0)
    if d.model_version <= highest and not d.allow_downgrade:
        raise RollbackError(
            f"{d.model_name} version {d.model_version} is not above version {highest}, the "
            "highest ever activated here, and the deployment does not allow a downgrade"
        )
    if d.total_bytes > context.max_model_bytes:
        raise SizeExceededError(
            f"deployment {d.deployment_id} declares {d.total_bytes} bytes in total, more than "
            f"the limit of {context.max_model_bytes}"
        )
    if MODEL_SIGNATURE_PATH not in {f.path for f in d.files}:
        raise ModelUnsignedError(
            f"deployment {d.deployment_id} lists no {MODEL_SIGNATURE_PATH}: the version is unsigned"
        )
    return deployment


def check_signed_manifest(deployment: Deployment, manifest: Mapping[str, str]) -> None:
    """Raise unless ``files`` minus model.sig is exactly the signed ``manifest`` (path -> sha256).

    Run on the downloaded version after its model.sig verified: a deployment may
    only combine files that the model signer signed together.
    """
    declared = {f.path: f.sha256 for f in deployment.files if f.path != MODEL_SIGNATURE_PATH}
    if declared == dict(manifest):
        return
    missing = sorted(set(manifest) - set(declared))
    extra = sorted(set(declared) - set(manifest))
    differ = sorted(p for p in set(declared) & set(manifest) if declared[p] != manifest[p])
    parts = []
    if missing:
        parts.append(f"signed but not deployed: {', '.join(missing)}")
    if extra:
        parts.append(f"deployed but not signed: {', '.join(extra)}")
    if differ:
        parts.append(f"digest differs from the signed one: {', '.join(differ)}")
    raise FileSetMismatchError(
        f"deployment {deployment.deployment_id} does not match the model signature: "
        + "; ".join(parts)
    )


def to_record(deployment: Deployment) -> dict[str, Any]:
    """A verified deployment as plain JSON values (for the state file)."""
    d = deployment
    return {
        "deployment_id": d.deployment_id,
        "sequence": d.sequence,
        "devices": list(d.devices),
        "issued_at": d.issued_at,
        "expires_at": d.expires_at,
        "model_name": d.model_name,
        "model_version": d.model_version,
        "files": [[f.path, f.sha256, f.size] for f in d.files],
        "config": [d.config.path, d.config.sha256, d.config.size] if d.config else None,
        "allow_downgrade": d.allow_downgrade,
        "probation_s": d.probation_s,
        "key_id": d.key_id,
        "envelope_sha256": d.envelope_sha256,
    }


def from_record(record: Mapping[str, Any]) -> Deployment:
    """The deployment a :func:`to_record` result came from (the state file is trusted)."""
    config = record.get("config")
    return Deployment(
        deployment_id=str(record["deployment_id"]),
        sequence=int(record["sequence"]),
        devices=tuple(record["devices"]),
        issued_at=float(record["issued_at"]),
        expires_at=float(record["expires_at"]),
        model_name=str(record["model_name"]),
        model_version=int(record["model_version"]),
        files=tuple(DeploymentFile(str(p), str(s), int(n)) for p, s, n in record["files"]),
        config=DeploymentFile(str(config[0]), str(config[1]), int(config[2])) if config else None,
        allow_downgrade=bool(record["allow_downgrade"]),
        probation_s=None if record.get("probation_s") is None else float(record["probation_s"]),
        key_id=str(record["key_id"]),
        envelope_sha256=str(record["envelope_sha256"]),
    )


def peek_deployment_id(data: bytes) -> str:
    """The deployment id of an envelope *without verifying it* (for reports), or ''."""
    try:
        envelope = json.loads(data[:MAX_MESSAGE_BYTES])
        payload = json.loads(base64.b64decode(envelope["payload"], validate=True))
        value = payload["deployment_id"]
    except Exception:
        return ""
    return value if isinstance(value, str) and DEPLOYMENT_ID.fullmatch(value) else ""


# --------------------------------------------------------------------------- signing


def encode_payload(deployment: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a deployment document (compact, keys sorted)."""
    return json.dumps(deployment, separators=(",", ":"), sort_keys=True).encode("utf-8")


def sign_deployment(
    deployment: Mapping[str, Any], private_key: ec.EllipticCurvePrivateKey
) -> bytes:
    """The signed envelope (the ``desired`` payload) for ``deployment``.

    ``deployment`` is the document of docs/fleet-protocol.md; it is encoded as is
    (this function does not validate it, so tests can sign broken documents).
    """
    key = require_p256_private_key(private_key, "the deployment key")
    payload = encode_payload(deployment)
    signature = key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    envelope = {
        "schema": ENVELOPE_SCHEMA,
        "version": SCHEMA_VERSION,
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")
