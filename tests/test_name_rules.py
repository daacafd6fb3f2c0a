"""Issue 17 item 9: every name validator full-matches, and controller ids are reserved.

Python's ``$`` also matches just before a trailing newline, and jsonschema's
``pattern`` searches: ``^[a-z]+$`` accepts ``"model\\n"``. Each validator here
must refuse a valid name with a newline appended.
"""

from __future__ import annotations

import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import build_config
from agent.controller import config as controller_config
from agent.controller.deploy import DeploymentError, check_devices
from agent.errors import AgentError, ConfigError
from agent.protocol import deployment as dep
from agent.protocol import tags, topics
from agent.protocol.names import RESERVED_DEVICE_PREFIX, is_reserved_device_id
from agent.signing import identity, keys, oms, strict_json

NAME_CHARS = string.ascii_letters + string.digits + "_"
# Valid for every validator: starts with a letter or digit, at most 31 characters.
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(NAME_CHARS, max_size=30),
).filter(lambda n: not is_reserved_device_id(n))
hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
endings = st.sampled_from(["\n", "\r\n", "\n\n"])


def _schema_ok(schema: dict[str, Any], value: str) -> bool:
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def _config_ok(overrides: dict[str, Any]) -> bool:
    try:
        build_config(overrides)
    except ConfigError:
        return False
    return True


@settings(max_examples=60, deadline=None)
@given(name=names, end=endings)
def test_no_validator_accepts_a_trailing_newline(name: str, end: str) -> None:
    bad = name + end
    # Every validator accepts the name itself ...
    assert topics.is_device_id(name) and not topics.is_device_id(bad)
    assert topics.is_model_name(name) and not topics.is_model_name(bad)
    assert identity.is_model_name(name) and not identity.is_model_name(bad)
    assert tags.is_tag(name) and not tags.is_tag(name + end)
    assert dep.DEPLOYMENT_ID.fullmatch(name) and not dep.DEPLOYMENT_ID.match(bad)
    assert dep.DEVICE_ID.match(name) and not dep.DEVICE_ID.match(bad)  # .match too: \Z
    assert topics.check_prefix(name) == name
    with pytest.raises(ValueError):
        topics.check_prefix(bad)
    assert topics.check_share_group(name) == name
    with pytest.raises(ValueError):
        topics.check_share_group(bad)
    dep.check_file_path(name, "p")
    with pytest.raises(AgentError):
        dep.check_file_path(bad, "p")
    with pytest.raises(identity.IdentityMalformedError):
        identity.ModelIdentity(bad, 1)
    # ... and so do the JSON-schema patterns (jsonschema searches).
    tag_schema = {"type": "string", "pattern": tags.TAG_PATTERN}
    assert _schema_ok(tag_schema, name) and not _schema_ok(tag_schema, name + end)
    member = {"type": "string", "pattern": controller_config._GROUP_MEMBER}
    assert _schema_ok(member, name) and not _schema_ok(member, bad)
    assert _schema_ok(member, f"tag:{name}")
    assert not _schema_ok(member, f"tag:{name}{end}")


@settings(max_examples=30, deadline=None)
@given(name=names, end=endings)
def test_the_agent_config_refuses_a_trailing_newline(name: str, end: str) -> None:
    assert _config_ok({"mqtt": {"device_id": name}})
    assert not _config_ok({"mqtt": {"device_id": name + end}})
    assert _config_ok({"mqtt": {"topic_prefix": name}})
    assert not _config_ok({"mqtt": {"topic_prefix": name + end}})
    assert _config_ok({"fleet": {"tags": [name]}})
    assert not _config_ok({"fleet": {"tags": [name + end]}})


@settings(max_examples=30, deadline=None)
@given(digest=hexes, end=endings)
def test_digests_refuse_a_trailing_newline(digest: str, end: str) -> None:
    assert dep.SHA256_HEX.match(digest) and not dep.SHA256_HEX.match(digest + end)
    assert strict_json.hex_digest(digest, "d") == digest
    with pytest.raises(oms.BundleMalformedError):
        strict_json.hex_digest(digest + end, "d")


def test_the_repository_refuses_a_model_named_with_a_newline(tmp_path: Path) -> None:
    # In a child process: agent.serving imports agent.wire, whose protobuf files
    # clash with tritonclient's, which other tests load into this process.
    (tmp_path / "demo\n" / "1").mkdir(parents=True)
    (tmp_path / "demo\n" / "1" / "model.onnx").write_bytes(b"x")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.errors import ModelNotFoundError\n"
        "from agent.serving.repository import check_model_name, scan_repository\n"
        "assert check_model_name('demo') == 'demo'\n"
        "try:\n"
        "    check_model_name('demo\\n')\n"
        "    sys.exit('accepted demo\\\\n')\n"
        "except ModelNotFoundError:\n"
        "    pass\n"
        "assert scan_repository(Path(sys.argv[1])) == {}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr


def test_key_names_refuse_a_trailing_newline(tmp_path: Path) -> None:
    with pytest.raises(keys.KeyWriteError):
        keys.write_key_pair(tmp_path, "ops\n")
    assert keys.write_key_pair(tmp_path, "ops").private_key.name == "ops.key.pem"


def test_every_name_pattern_in_the_tree_is_anchored_with_backslash_z() -> None:
    """A grep, so a new pattern ending in '$' does not slip in unnoticed."""
    root = Path(__file__).resolve().parent.parent / "agent"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "wire" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"""(re\.compile\(|"pattern":|_PATTERN\b.*=).*\$["')]""", line):
                offenders.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    assert offenders == []


# --------------------------------------------------------------------------- reserved ids


@pytest.mark.parametrize("device", ["controller", "Controller", "CONTROLLER-a", "controller.2"])
def test_controller_ids_are_reserved(device: str) -> None:
    assert is_reserved_device_id(device)
    assert dep.DEVICE_ID.fullmatch(device)  # the shape is fine: the name is reserved
    assert not topics.is_device_id(device)
    with pytest.raises(ConfigError, match="reserved"):
        build_config({"mqtt": {"device_id": device}})
    with pytest.raises(DeploymentError, match="reserved"):
        check_devices(["dev-1", device])
    # A device reporting under a reserved id is not taken for a device.
    assert topics.split_report_topic("edge", f"edge/devices/{device}/health") is None
    assert topics.device_of_request_topic("edge", f"edge/artifacts/request/{device}") is None


@pytest.mark.parametrize("device", ["dev-1", "my-controller", "ctl-1", "control"])
def test_other_ids_are_not_reserved(device: str) -> None:
    assert not is_reserved_device_id(device)
    assert topics.is_device_id(device)
    build_config({"mqtt": {"device_id": device}})
    check_devices([device])


def test_a_signed_deployment_naming_a_controller_id_is_malformed() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    doc = {
        "schema": dep.DEPLOYMENT_SCHEMA,
        "version": 1,
        "deployment_id": "d-1",
        "sequence": 1,
        "devices": ["dev-1", RESERVED_DEVICE_PREFIX],
        "issued_at": 1000.0,
        "expires_at": 2000.0,
        "model": {
            "name": "m",
            "version": 1,
            "files": [{"path": "model.sig", "sha256": "0" * 64, "size": 1}],
        },
    }
    envelope = dep.sign_deployment(doc, key)
    trust = keys.TrustStore.from_public_keys([(key.public_key(), "k")])
    with pytest.raises(dep.MalformedMessageError, match="reserved for controllers"):
        dep.verify_deployment(
            envelope, trust, dep.DeviceContext(device_id="dev-1", now=1500.0, highest_sequence=0)
        )


def test_a_host_name_in_the_controllers_namespace_is_not_taken_as_the_device_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from agent.errors import ConfigError
    from agent.fleet.settings import default_device_id

    monkeypatch.setattr(socket, "gethostname", lambda: "controller-7")
    with pytest.raises(ConfigError, match=r"mqtt\.device_id.*reserved"):
        default_device_id()
    monkeypatch.setattr(socket, "gethostname", lambda: "plant-a-3²")
    assert default_device_id() == "plant-a-3-"
