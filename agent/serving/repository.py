"""The on-disk model repository in Triton's layout.

``<repo>/<model>/config.pbtxt`` (optional) and ``<repo>/<model>/<version>/``
holding the model file. This module only looks: it lists models and versions,
reads config text and applies the version policy. Loading is elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelConfigError, ModelNotFoundError
from agent.wire import model_config_pb2 as mc

# Names a model may have: no separators, no leading dot, nothing a shell or a
# path join could misread. Applies to names from disk and from the network.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise ModelNotFoundError(f"'{name}' is not a valid model name")
    return name


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    name: str
    path: Path
    config_text: str | None  # None: no config.pbtxt, complete from the graph
    versions: tuple[int, ...]  # every numeric version directory, ascending


def scan_repository(root: Path) -> dict[str, RepositoryModel]:
    """Every model directory under ``root``; hidden and oddly named entries are skipped."""
    if not root.is_dir():
        raise ModelConfigError(f"model repository {root} is not a directory")
    models = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or not _NAME.match(entry.name):
            continue
        found = read_model(root, entry.name)
        if found.versions or found.config_text is not None:
            # A directory with neither is not a model (e.g. the example repo's keys/).
            models[found.name] = found
    return models


def read_model(root: Path, name: str) -> RepositoryModel:
    check_model_name(name)
    path = root / name
    if not path.is_dir():
        raise ModelNotFoundError(f"model '{name}' is not in the repository")
    config_file = path / "config.pbtxt"
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    versions = sorted(
        int(v.name)
        for v in path.iterdir()
        if v.is_dir() and not v.is_symlink() and v.name.isdigit() and int(v.name) > 0
    )
    return RepositoryModel(name, path, config_text, tuple(versions))


def select_versions(policy: mc.ModelVersionPolicy, available: tuple[int, ...]) -> list[int]:
    """Triton's version policy: latest N (default 1), all, or specific versions."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(available)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return list(available[-max(count, 1) :])
