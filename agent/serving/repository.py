"""The on-disk model repository in Triton's layout.

``<repo>/<model>/config.pbtxt`` (optional) and ``<repo>/<model>/<version>/``
holding the model file. This module only looks: it lists models and versions,
reads config text and applies the version policy. Loading is elsewhere.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelConfigError, ModelNotFoundError
from agent.wire import model_config_pb2 as mc

# Names a model may have: no separators, no leading dot, nothing a shell or a
# path join could misread. Applies to names from disk and from the network.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")  # \Z: no trailing newline


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise ModelNotFoundError(f"'{name}' is not a valid model name")
    return name


# Version directories: ASCII digits only (str.isdigit() also accepts "²", which
# int() refuses), no leading zero ("01" would be version 1 beside "1"), at most
# 18 digits (an int64, as in Triton's version_policy).
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
# Top-level files that are documentation or tooling, not misplaced models.
_NOT_MODEL_SUFFIXES = frozenset(
    {".md", ".txt", ".rst", ".py", ".sh", ".json", ".toml", ".yaml", ".yml", ".cfg", ".ini"}
)


def shown(name: str) -> str:
    """A file name made printable for logs and RPC messages (undecodable bytes escaped)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class EntryProblem:
    """An entry that looks like a model or a version but cannot be one."""

    model: str  # the model it belongs to ("" for a name that is not a model name)
    version: str  # the version entry's (printable) name; "" for the model entry itself
    entry: str  # its path relative to the repository root, printable
    reason: str


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    name: str
    path: Path
    config_text: str | None  # None: no config.pbtxt, complete from the graph
    versions: tuple[int, ...]  # every usable version directory, ascending
    problems: tuple[EntryProblem, ...] = ()  # version entries that are not usable


@dataclass(frozen=True, slots=True)
class RepositoryScan:
    models: dict[str, RepositoryModel]
    # Model-named entries that cannot be a model (a dangling symlink, a file...) -> why.
    broken: dict[str, EntryProblem]
    ignored: tuple[EntryProblem, ...]  # entries whose names cannot be model names


def _odd_entry(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be a real directory for a ``what``, or None if it is one."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = shown(os.readlink(path))
        except OSError:
            target = "?"
        try:
            path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"is a symlink loop (-> {target})"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"is a dangling symlink (-> {target})"
            return f"is a symlink (-> {target}) that cannot be followed ({exc.strerror})"
        # Symlinks are not followed: what they point at is outside what was checked.
        return f"is a symlink (-> {target}); {what}s must be real directories"
    if not stat.S_ISDIR(st.st_mode):
        return f"is not a directory; a {what} is a directory"
    return None


def scan_repository(root: Path) -> dict[str, RepositoryModel]:
    """Every model directory under ``root`` (see ``scan_repository_entries``)."""
    return scan_repository_entries(root).models


def scan_repository_entries(root: Path) -> RepositoryScan:
    """Every model directory under ``root``, and every entry that cannot be one.

    Hidden entries are skipped; so are top-level files with a documentation or
    tooling suffix (README.md, *.py). Nothing about one entry stops the scan of
    the others; only an unreadable ``root`` raises.
    """
    if not root.is_dir():
        raise ModelConfigError(f"model repository {root} is not a directory")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ModelConfigError(f"model repository {root} cannot be read: {exc}") from exc
    models: dict[str, RepositoryModel] = {}
    broken: dict[str, EntryProblem] = {}
    ignored: list[EntryProblem] = []
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        if not _NAME.fullmatch(name) or ".." in name:
            ignored.append(EntryProblem("", "", shown(name), "is not a valid model name"))
            continue
        if entry.suffix.lower() in _NOT_MODEL_SUFFIXES and _is_plain_file(entry):
            continue
        try:
            found = read_model(root, name)
        except ModelConfigError as exc:
            broken[name] = EntryProblem(name, "", shown(name), str(exc))
            continue
        if found.versions or found.config_text is not None or found.problems:
            # A directory with none is not a model (e.g. the example repo's keys/).
            models[name] = found
    return RepositoryScan(models, broken, tuple(ignored))


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def read_model(root: Path, name: str) -> RepositoryModel:
    """The model ``name``: its config text, usable versions and unusable version entries.

    Raises ModelNotFoundError if there is no such entry, ModelConfigError (naming
    why) if the entry cannot be a model: a symlink, a file, unreadable.
    """
    check_model_name(name)
    path = root / name
    if not os.path.lexists(path):
        raise ModelNotFoundError(f"model '{name}' is not in the repository")
    odd = _odd_entry(path, "model")
    if odd is not None:
        raise ModelConfigError(f"model '{name}': {path} {odd}")
    config_text = None
    config_file = path / "config.pbtxt"
    try:
        if config_file.is_file():
            config_text = config_file.read_text(encoding="utf-8")
        children = sorted(path.iterdir())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"model '{name}': cannot be read: {exc}") from exc
    versions = []
    problems = []
    for child in children:
        version = child.name
        if not version.isnumeric():
            continue  # not version-like (labels.txt, config.pbtxt, ...)
        where = f"{name}/{shown(version)}"
        if not _VERSION.fullmatch(version):
            if not version.isascii():
                why = "is not a version number: version directories are named with ASCII digits"
            elif version.startswith("0"):
                why = ("is not a version number: a leading zero (version numbers start at 1 "
                       "and are written without one)")
            else:
                why = "is not a version number: more than 18 digits"
            problems.append(EntryProblem(name, shown(version), where, why))
            continue
        odd = _odd_entry(child, "version")
        if odd is not None:
            problems.append(EntryProblem(name, version, where, f"version {version} {odd}"))
            continue
        versions.append(int(version))
    return RepositoryModel(name, path, config_text, tuple(sorted(versions)), tuple(problems))


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
