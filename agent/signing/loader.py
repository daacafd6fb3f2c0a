"""The model reader the agent uses when signatures are required.

Every load (start-up, reload, explicit load, update activation) verifies the
whole version directory against the trust store and hands onnxruntime the very
bytes that were hashed.
"""

from __future__ import annotations

from pathlib import Path

from agent.common.buffers import FileBytes
from agent.errors import ConfigError
from agent.serving.model_manager import ModelReader
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version


def load_trust_store(trust_dir: Path) -> TrustStore:
    try:
        return TrustStore.from_directory(trust_dir)
    except Exception as exc:  # any failure here is an operator's config problem
        raise ConfigError(f"key 'signing.trust_dir': {exc}") from exc


def signed_reader(trust_dir: Path) -> ModelReader:
    trust = load_trust_store(trust_dir)

    def read_verified(version_dir: Path, filename: str) -> FileBytes:
        return verify_version(version_dir, trust, load=(filename,)).contents[filename]

    return read_verified
