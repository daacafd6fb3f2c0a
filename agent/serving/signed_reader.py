"""The model reader the agent uses when signatures are required.

Every load (start-up, reload, explicit load, update activation) verifies the
whole version directory against the trust store, requires its signed
identity.json to name the directory's own ``<model>/<version>``, and hands
onnxruntime the very bytes that were hashed.

A model whose tensors keep their data in other files of the version (ONNX
external data, for models over protobuf's 2 GB) gets those files verified and
loaded in the same pass; they travel with the model as an
``onnx_external.ModelBytes``, and the session resolves every reference against
them alone (a reference to anything else is refused there, naming the tensor).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from pathlib import Path

from agent.common.buffers import FileBytes
from agent.errors import ConfigError
from agent.serving import onnx_external
from agent.serving.model_manager import ModelReader
from agent.signing.identity import identity_of_path
from agent.signing.keys import TrustStore
from agent.signing.version_dir import FileNotSignedError, verify_version


def load_trust_store(trust_dir: Path) -> TrustStore:
    try:
        return TrustStore.from_directory(trust_dir)
    except Exception as exc:  # any failure here is an operator's config problem
        raise ConfigError(f"key 'signing.trust_dir': {exc}") from exc


def signed_reader(trust_dir: Path) -> ModelReader:
    trust = load_trust_store(trust_dir)

    def read_verified(version_dir: Path, filename: str) -> FileBytes:
        # The signed identity must be the directory's place: <model>/<version>.
        expected = identity_of_path(version_dir)
        locations = external_locations(version_dir / filename)
        load = (filename, *sorted(locations - {filename}))
        try:
            verified = verify_version(version_dir, trust, load=load, identity=expected)
        except FileNotSignedError:
            if len(load) == 1:
                raise
            # An external file the signature does not list: load the model alone, and
            # the session refuses it with the tensor and location named.
            verified = verify_version(version_dir, trust, load=(filename,), identity=expected)
        model = verified.contents[filename]
        if not locations:
            return model
        files = {loc: verified.contents[loc] for loc in locations if loc in verified.contents}
        return onnx_external.ModelBytes(model, files)

    return read_verified


def external_locations(model_file: Path) -> set[str]:
    """The external data files ``model_file`` names, read before verification so that
    they are loaded by it (a hint: the session checks the verified model itself).

    Mapped, not read: a large model's weights are skipped, not paged in. Empty
    if the file is not a readable ONNX model (verification then has its say).
    """
    try:
        fd = os.open(model_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return set()
    try:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode) or size == 0:
            return set()
        data = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        with contextlib.closing(data):
            return {t.location for t in onnx_external.external_tensors(data)}
    except (OSError, ValueError, onnx_external.ExternalDataError):
        return set()
    finally:
        os.close(fd)
