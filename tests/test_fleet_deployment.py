"""Signed deployments: every threat of the design brief is rejected with its reason code."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import VerificationError
from agent.protocol import deployment as dep
from agent.protocol.deployment import (
    Deployment,
    DeviceContext,
    check_signed_manifest,
    sign_deployment,
    verify_deployment,
)
from agent.signing.keys import TrustStore
from agent.signing.oms import key_id, pae
from agent.signing.version_dir import sign_version, verify_version

DEPLOY_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
MODEL_KEY = ec.generate_private_key(ec.SECP256R1())
TRUST = TrustStore.from_public_keys([(DEPLOY_KEY.public_key(), "deploy.pub.pem")])
MODEL_TRUST = TrustStore.from_public_keys([(MODEL_KEY.public_key(), "model.pub.pem")])
NOW = 1_800_000_000.0
SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "edge.deployment",
        "version": 1,
        "deployment_id": "d-0001",
        "sequence": 42,
        "devices": ["dev-001", "dev-002"],
        "issued_at": int(NOW) - 60,
        "expires_at": int(NOW) + 3600,
        "model": {
            "name": "tabular_classifier",
            "version": 3,
            "files": [
                {"path": "model.onnx", "sha256": SHA_A, "size": 1000},
                {"path": "model.sig", "sha256": SHA_B, "size": 200},
            ],
        },
        "allow_downgrade": False,
        "probation_s": 30,
    }
    for key, value in changes.items():
        if key.startswith("model_"):
            doc["model"][key[len("model_") :]] = value
        else:
            doc[key] = value
    return doc


def context(**changes: Any) -> DeviceContext:
    values: dict[str, Any] = {
        "device_id": "dev-001",
        "now": NOW,
        "highest_sequence": 41,
        "highest_versions": {"tabular_classifier": 2},
        "max_model_bytes": 10_000,
    }
    values.update(changes)
    return DeviceContext(**values)


def verify(data: bytes, ctx: DeviceContext | None = None, trust: TrustStore = TRUST) -> Deployment:
    return verify_deployment(data, trust, ctx or context())


def rejected(data: bytes, code: str, ctx: DeviceContext | None = None) -> VerificationError:
    with pytest.raises(dep.DeploymentRejectedError) as info:
        verify(data, ctx)
    assert info.value.code == code, str(info.value)
    return info.value


def envelope_of(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


def reencode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- acceptance


def test_a_good_deployment_verifies_with_every_field() -> None:
    signed = sign_deployment(document(), DEPLOY_KEY)
    d = verify(signed)
    assert d.deployment_id == "d-0001"
    assert d.sequence == 42
    assert d.devices == ("dev-001", "dev-002")
    assert (d.model_name, d.model_version) == ("tabular_classifier", 3)
    assert [f.path for f in d.files] == ["model.onnx", "model.sig"]
    assert d.total_bytes == 1200
    assert d.probation_s == 30.0
    assert d.key_id == key_id(DEPLOY_KEY.public_key())
    assert d.envelope_sha256 == hashlib.sha256(signed).hexdigest()
    assert d.config is None


def test_the_envelope_has_the_documented_shape() -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    assert envelope["schema"] == "edge.deployment_envelope"
    assert envelope["version"] == 1
    assert envelope["payloadType"] == "application/vnd.edge-agent.deployment+json"
    assert json.loads(base64.b64decode(envelope["payload"])) == document()
    assert envelope["signatures"][0]["keyid"] == key_id(DEPLOY_KEY.public_key())


def test_the_config_travels_as_config_pbtxt_and_counts_towards_the_size() -> None:
    config = {"sha256": SHA_A, "size": 500}
    d = verify(sign_deployment(document(model_config=config), DEPLOY_KEY))
    assert d.config == dep.DeploymentFile("config.pbtxt", SHA_A, 500)
    assert d.total_bytes == 1700
    assert [a.path for a in d.artifacts] == ["model.onnx", "model.sig", "config.pbtxt"]


def test_a_downgrade_is_accepted_only_when_the_signed_document_allows_it() -> None:
    doc = document(model_version=1)
    rejected(sign_deployment(doc, DEPLOY_KEY), "version_rollback")
    doc["allow_downgrade"] = True
    assert verify(sign_deployment(doc, DEPLOY_KEY)).model_version == 1


def test_a_second_signature_by_an_unknown_key_is_ignored_key_rotation() -> None:
    signed = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    other = envelope_of(sign_deployment(document(), OTHER_KEY))
    signed["signatures"].insert(0, other["signatures"][0])
    assert verify(reencode(signed)).key_id == key_id(DEPLOY_KEY.public_key())


def test_a_record_round_trip_gives_the_same_deployment() -> None:
    d = verify(sign_deployment(document(model_config={"sha256": SHA_B, "size": 7}), DEPLOY_KEY))
    assert dep.from_record(json.loads(json.dumps(dep.to_record(d)))) == d


def test_peek_finds_the_id_without_verifying_and_never_raises() -> None:
    assert dep.peek_deployment_id(sign_deployment(document(), OTHER_KEY)) == "d-0001"
    assert dep.peek_deployment_id(b"\xff garbage") == ""
    assert dep.peek_deployment_id(sign_deployment(document(deployment_id="../x"), OTHER_KEY)) == ""


# --------------------------------------------------------------------------- threats


def test_tampered_payload_is_rejected() -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    evil = document(model_version=99)
    envelope["payload"] = base64.b64encode(dep.encode_payload(evil)).decode()
    rejected(reencode(envelope), "signature_invalid")


def test_tampered_signature_is_rejected() -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    rejected(reencode(envelope), "signature_invalid")


def test_a_signature_moved_to_another_payload_type_does_not_verify() -> None:
    # The payload type is part of what is signed (DSSE PAE).
    payload = dep.encode_payload(document())
    sig = DEPLOY_KEY.sign(pae("application/json", payload), ec.ECDSA(hashes.SHA256()))
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    envelope["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    rejected(reencode(envelope), "signature_invalid")


def test_unsigned_deployment_is_rejected() -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    envelope["signatures"] = []
    rejected(reencode(envelope), "signature_missing")


def test_deployment_signed_by_a_wrong_key_is_rejected() -> None:
    rejected(sign_deployment(document(), OTHER_KEY), "signature_untrusted_key")


def test_a_model_signing_key_cannot_sign_deployments() -> None:
    # Distinct trust stores: the model signer's key is not a deployment key.
    with pytest.raises(dep.UntrustedDeploymentKeyError):
        verify_deployment(sign_deployment(document(), MODEL_KEY), TRUST, context())
    # ... and the other way round the deployment key verifies nothing in MODEL_TRUST.
    with pytest.raises(dep.UntrustedDeploymentKeyError):
        verify_deployment(sign_deployment(document(), DEPLOY_KEY), MODEL_TRUST, context())


def test_a_forged_signature_claiming_the_trusted_key_id_is_rejected() -> None:
    envelope = envelope_of(sign_deployment(document(), OTHER_KEY))
    envelope["signatures"][0]["keyid"] = key_id(DEPLOY_KEY.public_key())
    rejected(reencode(envelope), "signature_invalid")


def test_replayed_deployment_is_rejected() -> None:
    signed = sign_deployment(document(sequence=42), DEPLOY_KEY)
    assert verify(signed, context(highest_sequence=41)).sequence == 42
    err = rejected(signed, "sequence_replayed", context(highest_sequence=42))
    assert "42" in str(err)
    rejected(sign_deployment(document(sequence=7), DEPLOY_KEY), "sequence_replayed")


def test_expired_deployment_is_rejected() -> None:
    signed = sign_deployment(document(expires_at=int(NOW) - 1), DEPLOY_KEY)
    rejected(signed, "expired")
    exact = sign_deployment(document(expires_at=int(NOW)), DEPLOY_KEY)
    rejected(exact, "expired")


def test_deployment_issued_in_the_future_is_rejected_beyond_the_clock_skew() -> None:
    within = document(issued_at=int(NOW) + 200, expires_at=int(NOW) + 9000)
    assert verify(sign_deployment(within, DEPLOY_KEY)).issued_at == NOW + 200
    beyond = document(issued_at=int(NOW) + 3600, expires_at=int(NOW) + 9000)
    rejected(sign_deployment(beyond, DEPLOY_KEY), "not_yet_valid")


def test_deployment_for_another_device_is_rejected() -> None:
    signed = sign_deployment(document(devices=["dev-002", "dev-003"]), DEPLOY_KEY)
    err = rejected(signed, "wrong_device")
    assert "dev-001" in str(err)


def test_rollback_to_an_older_or_the_same_version_is_rejected() -> None:
    rejected(sign_deployment(document(model_version=2), DEPLOY_KEY), "version_rollback")
    rejected(sign_deployment(document(model_version=1), DEPLOY_KEY), "version_rollback")
    # Another model's counter is independent.
    other = document(model_name="other_model", model_version=1)
    assert verify(sign_deployment(other, DEPLOY_KEY)).model_version == 1


def test_endless_data_a_file_larger_than_the_limit_is_rejected() -> None:
    files = [
        {"path": "model.onnx", "sha256": SHA_A, "size": 10_001},
        {"path": "model.sig", "sha256": SHA_B, "size": 10},
    ]
    rejected(sign_deployment(document(model_files=files), DEPLOY_KEY), "size_exceeded")


def test_endless_data_the_sum_of_sizes_above_the_limit_is_rejected() -> None:
    files = [
        {"path": "a.bin", "sha256": SHA_A, "size": 6000},
        {"path": "model.sig", "sha256": SHA_B, "size": 100},
    ]
    doc = document(model_files=files, model_config={"sha256": SHA_A, "size": 4000})
    rejected(sign_deployment(doc, DEPLOY_KEY), "size_exceeded")


@pytest.mark.parametrize(
    "path",
    [
        "../model.onnx",
        "a/../../etc/passwd",
        "/etc/passwd",
        "a//b",
        "./model.onnx",
        "a\\b",
        ".hidden",
        "-rf",
        "a/b/c/d/e/f/g/h/i",
        "x" * 256,
        "model\x00.onnx",
        "",
    ],
)
def test_path_traversal_and_odd_names_are_rejected(path: str) -> None:
    files = [
        {"path": path, "sha256": SHA_A, "size": 1},
        {"path": "model.sig", "sha256": SHA_B, "size": 1},
    ]
    rejected(sign_deployment(document(model_files=files), DEPLOY_KEY), "unsafe_path")


def test_a_path_that_is_both_file_and_directory_is_rejected() -> None:
    files = [
        {"path": "a", "sha256": SHA_A, "size": 1},
        {"path": "a/b", "sha256": SHA_A, "size": 1},
        {"path": "model.sig", "sha256": SHA_B, "size": 1},
    ]
    rejected(sign_deployment(document(model_files=files), DEPLOY_KEY), "unsafe_path")


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 200, "..a"])
def test_model_names_that_could_escape_the_repository_are_rejected(name: str) -> None:
    rejected(sign_deployment(document(model_name=name), DEPLOY_KEY), "message_malformed")


def test_deployment_ids_are_restricted() -> None:
    rejected(sign_deployment(document(deployment_id="a/b"), DEPLOY_KEY), "message_malformed")


def test_a_deployment_without_model_signature_is_rejected() -> None:
    files = [{"path": "model.onnx", "sha256": SHA_A, "size": 1}]
    rejected(sign_deployment(document(model_files=files), DEPLOY_KEY), "model_unsigned")


def test_oversized_envelope_is_rejected_before_parsing() -> None:
    data = b"{" + b" " * (64 * 1024) + b"}"
    rejected(data, "message_too_large")
    huge_devices = [f"d{i}" for i in range(9000)] + ["dev-001"]
    rejected(sign_deployment(document(devices=huge_devices), DEPLOY_KEY), "message_too_large")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b"null",
        b'{"schema": "edge.deployment_envelope", "version": 1}',
        b'{"schema":"edge.deployment_envelope","schema":"edge.deployment_envelope","version":1}',
        b"[" * 100_000,
    ],
)
def test_malformed_envelopes_are_rejected(data: bytes) -> None:
    with pytest.raises(dep.DeploymentRejectedError) as info:
        verify(data)
    assert info.value.code in {"message_malformed", "message_too_large"}


def test_envelope_with_an_unknown_field_is_rejected() -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    envelope["extra"] = 1
    rejected(reencode(envelope), "message_malformed")


@pytest.mark.parametrize("text", ["QR==", "QQ", "QQ=", "Q Q==", "QQ==\n", "-_==", 5])
def test_non_canonical_base64_is_rejected(text: Any) -> None:
    assert base64.b64decode("QQ==") == b"A"
    with pytest.raises(dep.MalformedMessageError):
        dep._strict_base64(text, "x")
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    envelope["payload"] = text
    rejected(reencode(envelope), "message_malformed")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schema", "edge.deployment_envelope2"),
        ("version", 2),
        ("version", True),
        ("payloadType", "application/json"),
    ],
)
def test_unknown_envelope_schema_or_version_is_rejected(field: str, value: Any) -> None:
    envelope = envelope_of(sign_deployment(document(), DEPLOY_KEY))
    envelope[field] = value
    rejected(reencode(envelope), "schema_unsupported")


@pytest.mark.parametrize(("field", "value"), [("schema", "edge.other"), ("version", 2)])
def test_unknown_payload_schema_or_version_is_rejected(field: str, value: Any) -> None:
    rejected(sign_deployment(document(**{field: value}), DEPLOY_KEY), "schema_unsupported")


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": "42"},
        {"sequence": 42.0},
        {"sequence": 0},
        {"sequence": True},
        {"devices": []},
        {"devices": ["dev-001", "dev-001"]},
        {"devices": "dev-001"},
        {"issued_at": "yesterday"},
        {"expires_at": int(NOW) - 120},  # before issued_at
        {"allow_downgrade": 1},
        {"probation_s": -1},
        {"model_version": 0},
        {"model_version": "3"},
        {"model_files": []},
        {"model_files": [{"path": "model.sig", "sha256": SHA_A.upper(), "size": 1}]},
        {"model_files": [{"path": "model.sig", "sha256": SHA_A, "size": -1}]},
        {"model_files": [{"path": "model.sig", "sha256": SHA_A, "size": 1, "mode": 7}]},
        {"model_files": [{"path": "model.sig", "sha256": SHA_A, "size": 1}] * 2},
        {"model_extra": 1},
        {"unknown": 1},
    ],
)
def test_malformed_deployment_documents_are_rejected(changes: dict[str, Any]) -> None:
    rejected(sign_deployment(document(**changes), DEPLOY_KEY), "message_malformed")


def test_missing_required_fields_are_rejected() -> None:
    for field in ("deployment_id", "sequence", "devices", "issued_at", "expires_at", "model"):
        doc = document()
        del doc[field]
        rejected(sign_deployment(doc, DEPLOY_KEY), "message_malformed")


def test_checks_are_independent_of_the_trust_store_size() -> None:
    both = TrustStore.from_public_keys(
        [(DEPLOY_KEY.public_key(), "a"), (OTHER_KEY.public_key(), "b")]
    )
    assert verify(sign_deployment(document(), OTHER_KEY), trust=both).sequence == 42


# --------------------------------------------------------------------------- mix-and-match


def signed_version(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    version = tmp_path / "m" / "3"
    for name, data in files.items():
        (version / name).parent.mkdir(parents=True, exist_ok=True)
        (version / name).write_bytes(data)
    sign_version(version, MODEL_KEY)
    manifest = dict(verify_version(version, MODEL_TRUST).manifest)
    return version, manifest


def deployment_for(version: Path, names: list[str]) -> Deployment:
    files = []
    for name in [*names, "identity.json", "model.sig"]:  # sign_version writes identity.json
        data = (version / name).read_bytes()
        files.append({"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    doc = document(model_files=files)
    return verify(sign_deployment(doc, DEPLOY_KEY), context(max_model_bytes=10**6))


def test_the_deployed_file_set_must_equal_the_signed_manifest(tmp_path: Path) -> None:
    version, manifest = signed_version(
        tmp_path, {"model.onnx": b"weights", "validation.json": b"{}"}
    )
    check_signed_manifest(deployment_for(version, ["model.onnx", "validation.json"]), manifest)
    with pytest.raises(dep.FileSetMismatchError, match="signed but not deployed"):
        check_signed_manifest(deployment_for(version, ["model.onnx"]), manifest)


def test_mix_and_match_a_file_from_another_signed_version_is_rejected(tmp_path: Path) -> None:
    v3, manifest3 = signed_version(tmp_path / "a", {"model.onnx": b"v3 weights"})
    v2, _ = signed_version(tmp_path / "b", {"model.onnx": b"v2 weights"})
    d3 = deployment_for(v3, ["model.onnx"])
    d2 = deployment_for(v2, ["model.onnx"])
    # v2's model with v3's signature: each half was signed, never together.
    mixed = copy.copy(d3)
    object.__setattr__(mixed, "files", (d2.files[0], d3.files[1]))
    with pytest.raises(dep.FileSetMismatchError, match="digest differs"):
        check_signed_manifest(mixed, manifest3)


def test_mix_and_match_an_extra_unsigned_file_is_rejected(tmp_path: Path) -> None:
    version, manifest = signed_version(tmp_path, {"model.onnx": b"weights"})
    (version / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(dep.FileSetMismatchError, match="deployed but not signed"):
        check_signed_manifest(deployment_for(version, ["model.onnx", "extra.bin"]), manifest)


# --------------------------------------------------------------------------- properties


SIGNED = sign_deployment(document(), DEPLOY_KEY)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SIGNED) - 1), st.integers(1, 255))
def test_any_byte_flip_in_the_envelope_is_rejected(index: int, flip: int) -> None:
    data = bytearray(SIGNED)
    data[index] ^= flip
    with pytest.raises(dep.DeploymentRejectedError):
        verify(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected_with_a_known_code(data: bytes) -> None:
    with pytest.raises(dep.DeploymentRejectedError) as info:
        verify(data)
    assert info.value.code in {
        "message_malformed", "schema_unsupported", "signature_missing", "message_too_large"
    }


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(document())), JSON_VALUES)
def test_a_signed_document_with_any_field_replaced_never_verifies_wrongly(
    field: str, value: Any
) -> None:
    doc = document()
    doc[field] = value
    try:
        d = verify(sign_deployment(doc, DEPLOY_KEY))
    except dep.DeploymentRejectedError:
        return
    # Accepted: then it is a legitimate deployment for this device, newer and in date.
    assert "dev-001" in d.devices
    assert d.sequence > 41
    assert d.expires_at > NOW
    assert d.total_bytes <= 10_000
