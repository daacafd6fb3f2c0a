"""The pure OMS format: building, signing, parsing and verifying, and every tamper case."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import VerificationError
from agent.signing import oms

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC = KEY.public_key()

MODEL = {
    "model.onnx": b"\x08\x07onnx-model-bytes" * 50,
    "validation/inputs.npy": b"inputs",
    "validation/expected.npy": b"expected",
    "profile.json": b"{}",
}


def manifest_of(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def signed(contents: dict[str, bytes] = MODEL, key: ec.EllipticCurvePrivateKey = KEY) -> bytes:
    return oms.sign_manifest(manifest_of(contents), key, model_name="demo")


def statement_of(bundle: bytes) -> dict[str, Any]:
    doc = json.loads(bundle)
    result: dict[str, Any] = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    return result


def resign(statement: dict[str, Any], key: ec.EllipticCurvePrivateKey = KEY) -> bytes:
    """Sign an arbitrary (possibly wrong) statement with a trusted key."""
    return oms.sign_payload(json.dumps(statement).encode(), key)


def edit(bundle: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Change the unsigned bundle JSON (the signature stays as it was)."""
    doc = json.loads(bundle)
    change(doc)
    return json.dumps(doc, separators=(",", ":")).encode()


def with_root_digest(statement: dict[str, Any]) -> dict[str, Any]:
    digests = [r["digest"] for r in statement["predicate"]["resources"]]
    statement["subject"][0]["digest"]["sha256"] = oms.root_digest(digests)
    return statement


# --------------------------------------------------------------------------- the format


def test_round_trip_returns_the_signed_manifest() -> None:
    result = oms.verify_bundle(signed(), [PUBLIC])
    assert dict(result.files) == manifest_of(MODEL)
    assert result.key_id == oms.key_id(PUBLIC)
    assert result.model_name == "demo"
    assert result.allow_symlinks is False
    assert set(result.ignore_paths) == set(oms.DEFAULT_IGNORE_PATHS)


def test_bundle_has_the_reference_layout() -> None:
    doc = json.loads(signed())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"] == {
        "publicKey": {"hint": oms.key_id(PUBLIC)},
        "tlogEntries": [],
    }
    envelope = doc["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert len(envelope["signatures"]) == 1
    statement = statement_of(signed())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    serialization_args = statement["predicate"]["serialization"]
    assert serialization_args["method"] == "files"
    assert serialization_args["hash_type"] == "sha256"
    assert serialization_args["allow_symlinks"] is False
    assert "model.sig" in serialization_args["ignore_paths"]
    resources = statement["predicate"]["resources"]
    assert all(set(r) == {"name", "algorithm", "digest"} for r in resources)
    assert all(r["algorithm"] == "sha256" for r in resources)
    # Sorted by path components, as the reference tool sorts PurePosixPath objects.
    names = [r["name"] for r in resources]
    assert names == sorted(names, key=lambda n: pathlib.PurePosixPath(n))
    raw = b"".join(bytes.fromhex(r["digest"]) for r in resources)
    assert statement["subject"] == [
        {"name": "demo", "digest": {"sha256": hashlib.sha256(raw).hexdigest()}}
    ]


def test_resources_sort_by_path_components_not_by_string() -> None:
    manifest = manifest_of({"a-b": b"1", "a/b": b"2"})
    statement = oms.build_statement(manifest, model_name="m")
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["a/b", "a-b"]


def test_pae_is_dsse_v1() -> None:
    assert oms.pae("application/vnd.in-toto+json", b"hello") == (
        b"DSSEv1 28 application/vnd.in-toto+json 5 hello"
    )


def test_key_id_is_sha256_of_the_pem_public_key() -> None:
    pem = PUBLIC.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert oms.key_id(PUBLIC) == hashlib.sha256(pem).hexdigest()


def test_signature_file_is_compact_with_no_trailing_newline() -> None:
    bundle = signed()
    assert not bundle.endswith(b"\n")
    assert b" " not in bundle


def test_reference_style_bundle_without_keyid_or_hint_verifies() -> None:
    # The reference tool writes keyid ""; older versions wrote no key hint.
    def strip(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["keyid"] = ""
        doc["verificationMaterial"]["publicKey"] = {}

    result = oms.verify_bundle(edit(signed(), strip), [OTHER_KEY.public_key(), PUBLIC])
    assert result.key_id == oms.key_id(PUBLIC)


def test_several_trusted_keys_pick_the_one_named() -> None:
    bundle = signed(key=OTHER_KEY)
    result = oms.verify_bundle(bundle, [PUBLIC, OTHER_KEY.public_key()])
    assert result.key_id == oms.key_id(OTHER_KEY.public_key())


def test_error_codes_are_distinct_verification_errors() -> None:
    classes = [
        obj
        for obj in vars(oms).values()
        if isinstance(obj, type)
        and issubclass(obj, VerificationError)
        and obj is not VerificationError
    ]
    assert len(classes) >= 15
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    assert "verification_failed" not in codes


# --------------------------------------------------------------------------- tamper: files


def test_flipped_byte_in_model_is_a_digest_mismatch() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = dict(MODEL)
    data = bytearray(tampered["model.onnx"])
    data[10] ^= 0x01
    tampered["model.onnx"] = bytes(data)
    with pytest.raises(oms.FileDigestMismatchError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert info.value.path == "model.onnx"
    assert "model.onnx" in str(info.value)
    assert info.value.code == "file_digest_mismatch"


def test_truncated_file_is_a_digest_mismatch() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = dict(MODEL, **{"model.onnx": MODEL["model.onnx"][:-1]})
    with pytest.raises(oms.FileDigestMismatchError, match="truncated"):
        oms.compare_manifest(manifest, manifest_of(tampered))


def test_added_file_is_unexpected() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = dict(MODEL, **{"extra.onnx": b"evil"})
    with pytest.raises(oms.FileUnexpectedError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert info.value.paths == ("extra.onnx",)
    assert "extra.onnx" in str(info.value)


def test_removed_file_is_missing() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = {k: v for k, v in MODEL.items() if k != "profile.json"}
    with pytest.raises(oms.FileMissingError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert info.value.paths == ("profile.json",)


def test_renamed_file_is_reported_as_a_rename() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = {("model2.onnx" if k == "model.onnx" else k): v for k, v in MODEL.items()}
    with pytest.raises(oms.FileRenamedError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert info.value.renames == (("model.onnx", "model2.onnx"),)
    assert "'model.onnx' is now 'model2.onnx'" in str(info.value)


def test_removed_and_added_with_other_content_is_missing_not_renamed() -> None:
    manifest = oms.verify_bundle(signed(), [PUBLIC]).files
    tampered = {k: v for k, v in MODEL.items() if k != "profile.json"}
    tampered["other.json"] = b"[]"
    with pytest.raises(oms.FileMissingError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert "other.json" in str(info.value)  # the message lists every difference


def test_signature_over_a_different_model_does_not_match() -> None:
    other_model = {"model.onnx": b"a different model"}
    manifest = oms.verify_bundle(signed(other_model), [PUBLIC]).files
    with pytest.raises(VerificationError):
        oms.compare_manifest(manifest, manifest_of(MODEL))


def test_payload_of_another_model_under_this_signature_is_a_bad_signature() -> None:
    other = json.loads(signed({"model.onnx": b"a different model"}))

    def swap(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["payload"] = other["dsseEnvelope"]["payload"]

    with pytest.raises(oms.BadSignatureError) as info:
        oms.verify_bundle(edit(signed(), swap), [PUBLIC])
    assert info.value.code == "signature_invalid"


# --------------------------------------------------------------------------- tamper: keys


def test_signature_by_an_untrusted_key() -> None:
    with pytest.raises(oms.UntrustedKeyError) as info:
        oms.verify_bundle(signed(key=OTHER_KEY), [PUBLIC])
    assert oms.key_id(OTHER_KEY.public_key()) in str(info.value)
    assert info.value.code == "signature_untrusted_key"


def test_empty_trust_store_trusts_nothing() -> None:
    with pytest.raises(oms.UntrustedKeyError, match="holds no keys"):
        oms.verify_bundle(signed(), [])


def test_hint_pointing_at_a_trusted_key_but_signed_by_another() -> None:
    def claim_trusted(doc: dict[str, Any]) -> None:
        doc["verificationMaterial"]["publicKey"]["hint"] = oms.key_id(PUBLIC)
        doc["dsseEnvelope"]["signatures"][0]["keyid"] = oms.key_id(PUBLIC)

    with pytest.raises(oms.BadSignatureError):
        oms.verify_bundle(edit(signed(key=OTHER_KEY), claim_trusted), [PUBLIC])


def test_unnamed_signature_by_untrusted_key() -> None:
    def strip(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["keyid"] = ""
        doc["verificationMaterial"]["publicKey"] = {}

    with pytest.raises(oms.BadSignatureError, match="names no key"):
        oms.verify_bundle(edit(signed(key=OTHER_KEY), strip), [PUBLIC])


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
        lambda: ec.generate_private_key(ec.SECP256K1()).public_key(),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["p384", "secp256k1", "rsa", "ed25519"],
)
def test_trusted_key_of_the_wrong_curve_or_type(make_key: Callable[[], Any]) -> None:
    with pytest.raises(oms.UnsupportedKeyError, match="P-256") as info:
        oms.verify_bundle(signed(), [PUBLIC, make_key()])
    assert info.value.code == "key_unsupported"


def test_signing_with_a_key_of_the_wrong_curve() -> None:
    with pytest.raises(oms.UnsupportedKeyError, match="secp384r1"):
        oms.sign_manifest(
            manifest_of(MODEL), ec.generate_private_key(ec.SECP384R1()), model_name="m"
        )


# --------------------------------------------------------------------------- tamper: signature file


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"model.sig"',
        b"\xff\xfe{}",
        b"{" * 100_000,
        b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}',
    ],
    ids=["empty", "open-brace", "null", "array", "string", "not-utf8", "deep", "no-envelope"],
)
def test_corrupt_signature_file(data: bytes) -> None:
    with pytest.raises(oms.BundleMalformedError) as info:
        oms.verify_bundle(data, [PUBLIC])
    assert info.value.code == "signature_malformed"


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_signature_file(fraction: float) -> None:
    bundle = signed()
    with pytest.raises(oms.BundleMalformedError, match="truncated"):
        oms.verify_bundle(bundle[: int(len(bundle) * fraction)], [PUBLIC])


def test_duplicate_json_keys_are_malformed() -> None:
    bundle = signed().replace(b'{"mediaType":', b'{"mediaType":"x","mediaType":', 1)
    with pytest.raises(oms.BundleMalformedError, match="twice"):
        oms.verify_bundle(bundle, [PUBLIC])


def test_unknown_bundle_field_is_malformed() -> None:
    def add(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["extra"] = "x"

    with pytest.raises(oms.BundleMalformedError, match="extra"):
        oms.verify_bundle(edit(signed(), add), [PUBLIC])


def test_certificate_bundles_are_refused() -> None:
    def add(doc: dict[str, Any]) -> None:
        doc["verificationMaterial"]["x509CertificateChain"] = {"certificates": []}

    with pytest.raises(oms.BundleMalformedError, match="key-based"):
        oms.verify_bundle(edit(signed(), add), [PUBLIC])


def test_non_canonical_base64_is_malformed() -> None:
    def pad_bits(doc: dict[str, Any]) -> None:
        payload = doc["dsseEnvelope"]["payload"]
        doc["dsseEnvelope"]["payload"] = base64.b64encode(base64.b64decode(payload) + b"x")[
            :-1
        ].decode()

    with pytest.raises(oms.BundleMalformedError, match="base64"):
        oms.verify_bundle(edit(signed(), pad_bits), [PUBLIC])


def test_keyid_disagreeing_with_hint_is_malformed() -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["keyid"] = "0" * 64

    with pytest.raises(oms.BundleMalformedError, match="disagrees"):
        oms.verify_bundle(edit(signed(), change), [PUBLIC])


def test_wrong_bundle_media_type() -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.2"

    with pytest.raises(oms.BundleMediaTypeError, match=r"version=0\.2") as info:
        oms.verify_bundle(edit(signed(), change), [PUBLIC])
    assert info.value.code == "signature_media_type"


def test_wrong_dsse_payload_type() -> None:
    payload = oms.encode_statement(oms.build_statement(manifest_of(MODEL), model_name="m"))
    bundle = oms.sign_payload(payload, KEY, payload_type="application/json")
    with pytest.raises(oms.PayloadTypeError, match="application/json") as info:
        oms.verify_bundle(bundle, [PUBLIC])
    assert info.value.code == "signature_payload_type"


def test_no_signature() -> None:
    def drop(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"] = []

    with pytest.raises(oms.SignatureMissingError) as info:
        oms.verify_bundle(edit(signed(), drop), [PUBLIC])
    assert info.value.code == "signature_missing"


def test_empty_signature_value() -> None:
    def blank(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["sig"] = ""

    with pytest.raises(oms.SignatureMissingError):
        oms.verify_bundle(edit(signed(), blank), [PUBLIC])


def test_signature_over_other_bytes_is_bad() -> None:
    other_sig = base64.b64encode(KEY.sign(b"something else", ec.ECDSA(hashes.SHA256())))

    def replace(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["sig"] = other_sig.decode()

    with pytest.raises(oms.BadSignatureError):
        oms.verify_bundle(edit(signed(), replace), [PUBLIC])


def test_garbage_signature_bytes_are_bad() -> None:
    def replace(doc: dict[str, Any]) -> None:
        doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(b"not DER").decode()

    with pytest.raises(oms.BadSignatureError):
        oms.verify_bundle(edit(signed(), replace), [PUBLIC])


# ------------------------------------------------------------ tamper: signed statement


def base_statement() -> dict[str, Any]:
    return oms.build_statement(manifest_of(MODEL), model_name="m")


def test_wrong_statement_type() -> None:
    statement = base_statement()
    statement["_type"] = "https://in-toto.io/Statement/v0.1"
    with pytest.raises(oms.StatementTypeError, match=r"v0\.1"):
        oms.verify_bundle(resign(statement), [PUBLIC])


@pytest.mark.parametrize(
    "predicate_type",
    ["https://model_signing/Digests/v0.1", "https://slsa.dev/provenance/v1", ""],
)
def test_wrong_predicate_type(predicate_type: str) -> None:
    statement = base_statement()
    statement["predicateType"] = predicate_type
    with pytest.raises(oms.PredicateTypeError) as info:
        oms.verify_bundle(resign(statement), [PUBLIC])
    assert info.value.code == "signature_predicate_type"


@pytest.mark.parametrize("hash_type", ["sha512", "blake2", "blake3", "SHA256"])
def test_wrong_serialization_hash_algorithm(hash_type: str) -> None:
    statement = base_statement()
    statement["predicate"]["serialization"]["hash_type"] = hash_type
    with pytest.raises(oms.HashAlgorithmError, match=hash_type) as info:
        oms.verify_bundle(resign(statement), [PUBLIC])
    assert info.value.code == "signature_hash_algorithm"


def test_wrong_resource_hash_algorithm() -> None:
    statement = base_statement()
    statement["predicate"]["resources"][1]["algorithm"] = "md5"
    with pytest.raises(oms.HashAlgorithmError, match=r"resources\[1\]"):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_subject_without_sha256_is_a_wrong_hash_algorithm() -> None:
    statement = base_statement()
    statement["subject"][0]["digest"] = {"sha512": "00" * 64}
    with pytest.raises(oms.HashAlgorithmError):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_shard_serialization_is_unsupported() -> None:
    statement = base_statement()
    statement["predicate"]["serialization"]["method"] = "shards"
    with pytest.raises(oms.SerializationUnsupportedError, match="shards"):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_duplicate_resource_names() -> None:
    statement = base_statement()
    resources = statement["predicate"]["resources"]
    resources.append(dict(resources[0], digest="ab" * 32))
    with pytest.raises(oms.DuplicateResourceError, match=resources[0]["name"]) as info:
        oms.verify_bundle(resign(with_root_digest(statement)), [PUBLIC])
    assert info.value.code == "signature_duplicate_resource"


@pytest.mark.parametrize(
    "name",
    [
        "../evil.onnx",
        "a/../../evil",
        "sub/..",
        "/etc/passwd",
        "//server/share",
        "a//b",
        "./model.onnx",
        "a/./b",
        "dir/",
        "",
        "a\\..\\b",
        "line\nbreak",
        "nul\x00",
        "\ud800",
    ],
)
def test_unsafe_resource_names(name: str) -> None:
    statement = base_statement()
    statement["predicate"]["resources"][0]["name"] = name
    with pytest.raises(oms.UnsafePathError) as info:
        oms.verify_bundle(resign(with_root_digest(statement)), [PUBLIC])
    assert info.value.code == "signature_unsafe_path"


@pytest.mark.parametrize("path", [".", "..", "/", "../x", ""])
def test_unsafe_ignore_paths(path: str) -> None:
    statement = base_statement()
    statement["predicate"]["serialization"]["ignore_paths"] = [path]
    with pytest.raises(oms.UnsafePathError):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_resource_under_an_ignored_path_is_inconsistent() -> None:
    statement = base_statement()
    statement["predicate"]["serialization"]["ignore_paths"] = ["validation"]
    with pytest.raises(oms.ManifestInconsistentError, match="ignored"):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_subject_digest_must_match_resources() -> None:
    statement = base_statement()
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    with pytest.raises(oms.ManifestInconsistentError, match="subject"):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_exactly_one_subject() -> None:
    statement = base_statement()
    statement["subject"].append(statement["subject"][0])
    with pytest.raises(oms.ManifestInconsistentError, match="one subject"):
        oms.verify_bundle(resign(statement), [PUBLIC])


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("predicate", "resources"), {}),
        (("predicate", "serialization", "allow_symlinks"), "false"),
        (("predicate", "resources", 0, "digest"), "xyz"),
        (("predicate", "resources", 0, "name"), 7),
        (("subject",), "demo"),
    ],
)
def test_malformed_statement_fields(path: tuple[str | int, ...], value: object) -> None:
    statement = base_statement()
    target: Any = statement
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(oms.BundleMalformedError):
        oms.verify_bundle(resign(statement), [PUBLIC])


def test_unknown_predicate_fields_are_ignored_as_v1_requires() -> None:
    statement = base_statement()
    statement["predicate"]["model_card"] = {"license": "apache-2.0"}
    assert oms.verify_bundle(resign(statement), [PUBLIC]).files == manifest_of(MODEL)


def test_uppercase_digests_are_accepted_and_normalised() -> None:
    statement = base_statement()
    for resource in statement["predicate"]["resources"]:
        resource["digest"] = resource["digest"].upper()
    assert oms.verify_bundle(resign(statement), [PUBLIC]).files == manifest_of(MODEL)


# --------------------------------------------------------------------------- properties

file_names = st.lists(
    st.text(alphabet="abcdefgh_.-", min_size=1, max_size=6).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=3,
).map("/".join)
models = st.dictionaries(file_names, st.binary(min_size=1, max_size=64), min_size=1, max_size=4)


_bundles: dict[tuple[tuple[str, bytes], ...], bytes] = {}


def signed_once(contents: dict[str, bytes]) -> bytes:
    """ECDSA signatures are randomised; hypothesis replays need the same bytes per input."""
    key = tuple(sorted(contents.items()))
    if key not in _bundles:
        _bundles[key] = signed(contents)
    return _bundles[key]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=models, position=st.integers(0, 2**20), mask=st.integers(1, 255))
def test_any_single_byte_change_to_the_signature_is_rejected(
    contents: dict[str, bytes], position: int, mask: int
) -> None:
    bundle = signed_once(contents)
    index = position % len(bundle)
    tampered = bundle[:index] + bytes([bundle[index] ^ mask]) + bundle[index + 1 :]
    with pytest.raises(VerificationError):
        oms.verify_bundle(tampered, [PUBLIC])


@settings(max_examples=300, deadline=None)
@given(contents=models, data=st.data())
def test_any_single_byte_change_to_a_signed_file_is_rejected(
    contents: dict[str, bytes], data: st.DataObject
) -> None:
    manifest = oms.verify_bundle(signed_once(contents), [PUBLIC]).files
    name = data.draw(st.sampled_from(sorted(contents)), label="file")
    blob = contents[name]
    index = data.draw(st.integers(0, len(blob) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    tampered = dict(contents)
    tampered[name] = blob[:index] + bytes([blob[index] ^ mask]) + blob[index + 1 :]
    with pytest.raises(oms.FileDigestMismatchError) as info:
        oms.compare_manifest(manifest, manifest_of(tampered))
    assert info.value.path == name


@given(st.text(max_size=30))
def test_accepted_names_are_canonical_relative_paths(name: str) -> None:
    try:
        oms.check_resource_name(name)
    except VerificationError:
        return
    path = pathlib.PurePosixPath(name)
    assert str(path) == name
    assert not path.is_absolute()
    assert ".." not in path.parts


def test_errors_survive_pickling() -> None:
    import pickle

    errors: list[VerificationError] = [
        oms.FileDigestMismatchError("a", "00" * 32, "11" * 32),
        oms.FileMissingError(["a"], "missing: 'a'"),
        oms.FileUnexpectedError(["b"], "not covered: 'b'"),
        oms.FileRenamedError([("a", "b")], "renamed"),
        oms.UntrustedKeyError("signed by key x"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.code == error.code


# --------------------------------------------------------------------------- bounded counts


def _with_signatures(bundle: bytes, count: int) -> bytes:
    doc = json.loads(bundle)
    doc["dsseEnvelope"]["signatures"] = doc["dsseEnvelope"]["signatures"] * count
    return json.dumps(doc).encode()


def test_at_most_max_signatures_are_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bundle = oms.sign_manifest(manifest_of(MODEL), key, model_name="m")
    accepted = _with_signatures(bundle, oms.MAX_SIGNATURES)
    assert oms.verify_bundle(accepted, [key.public_key()]).files
    with pytest.raises(oms.LimitExceededError, match="signatures, more than the 8 accepted"):
        oms.verify_bundle(_with_signatures(bundle, oms.MAX_SIGNATURES + 1), [key.public_key()])


def test_a_flood_of_signatures_is_refused_before_any_is_checked() -> None:
    """Unsigned, keyless signatures would each be tried against every trusted key."""
    key = ec.generate_private_key(ec.SECP256R1())
    doc = json.loads(oms.sign_manifest(manifest_of(MODEL), key, model_name="m"))
    doc["verificationMaterial"]["publicKey"] = {}
    doc["dsseEnvelope"]["signatures"] = [{"sig": "MEQCIA=="}] * 100_000
    with pytest.raises(oms.LimitExceededError) as err:
        oms.verify_bundle(json.dumps(doc).encode(), [key.public_key()])
    assert err.value.code == "signature_limit_exceeded"


def test_resource_and_ignore_path_counts_are_bounded() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    statement = oms.build_statement(manifest_of(MODEL), model_name="m")
    many = [dict(statement["predicate"]["resources"][0], name=f"f{i}")
            for i in range(oms.MAX_RESOURCES + 1)]
    statement["predicate"]["resources"] = many
    statement["subject"][0]["digest"]["sha256"] = oms.root_digest(r["digest"] for r in many)
    bundle = oms.sign_payload(oms.encode_statement(statement), key)
    with pytest.raises(oms.LimitExceededError, match="65536 accepted"):
        oms.verify_bundle(bundle, [key.public_key()])
    statement = oms.build_statement(manifest_of(MODEL), model_name="m")
    statement["predicate"]["serialization"]["ignore_paths"] = [
        f"i{i}" for i in range(oms.MAX_IGNORE_PATHS + 1)
    ]
    bundle = oms.sign_payload(oms.encode_statement(statement), key)
    with pytest.raises(oms.LimitExceededError, match="ignore_paths"):
        oms.verify_bundle(bundle, [key.public_key()])
