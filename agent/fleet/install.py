"""The updater's file system work: staging, install into the repository, clean-up.

Layout under the state directory::

    downloads/<sha256>.part|.ranges partial files (resumable)
    staging/<sequence>/<version>/   the complete, verified version directory
    staging/<sequence>/config.pbtxt the deployment's model config, if any
    staging/<sequence>/previous-config.pbtxt|.absent  what it replaced (for a roll back)
    trash/                          removed version directories on their way out

Installing renames the staged version directory into ``<repo>/<model>/<version>``
(one atomic rename on one file system: the repository never holds a partial
file). Everything here blocks: the updater calls it on a worker thread, except
at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

from agent.common.durable import fsync_dir, fsync_tree, remove_temporaries, write_atomically
from agent.fleet.state_store import JobRecord
from agent.protocol.deployment import CONFIG_PATH, Deployment, from_record

log = logging.getLogger("agent.fleet")


class Installer:
    def __init__(self, state_dir: Path, repository: Path, keep_versions: int) -> None:
        self.repository = repository
        self.keep_versions = keep_versions
        self.staging_root = state_dir / "staging"
        self.downloads = state_dir / "downloads"
        self.trash = state_dir / "trash"

    def staging(self, deployment: Deployment) -> Path:
        return self.staging_root / str(deployment.sequence)

    def staged_version(self, deployment: Deployment) -> Path:
        return self.staging(deployment) / str(deployment.model_version)

    def target(self, name: str, version: int) -> Path:
        return self.repository / name / str(version)

    # -- start-up ----------------------------------------------------------------

    def prepare_directories(self) -> None:
        for directory in (self.staging_root, self.downloads, self.trash):
            directory.mkdir(parents=True, exist_ok=True)
            remove_temporaries(directory)
        self.empty(self.trash)

    def remove_leftovers(self, busy: JobRecord | None, managed: set[str]) -> None:
        """Everything that no running job (``busy``) needs: other jobs' staging and
        partial downloads, hidden leftovers of an install or removal in ``managed`` models."""
        keep_staging = {str(busy.sequence)} if busy is not None else set()
        keep_blobs = (
            {f.sha256 for f in from_record(busy.deployment).artifacts}
            if busy is not None
            else set()
        )
        for entry in self.staging_root.iterdir():
            if entry.name not in keep_staging:
                self.remove_tree(entry)
        for entry in self.downloads.iterdir():
            if entry.name.split(".")[0] not in keep_blobs:
                self.remove_tree(entry)
        # Hidden leftovers of a cross-file-system install or removal.
        for name in managed:
            model_dir = self.repository / name
            if model_dir.is_dir():
                for entry in model_dir.iterdir():
                    if entry.name.startswith((".incoming-", ".removed-")):
                        self.remove_tree(entry)

    # -- install -----------------------------------------------------------------

    def install(self, staged: Path, target: Path) -> None:
        model_dir = target.parent
        if not model_dir.is_dir():
            model_dir.mkdir(parents=True)
            fsync_dir(model_dir.parent)
        try:
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # State and repository on different file systems: copy into a hidden
            # directory the repository scan ignores, then rename that in.
            incoming = model_dir / f".incoming-{target.name}-{secrets.token_hex(4)}"
            shutil.copytree(staged, incoming)
            fsync_tree(incoming)
            os.rename(incoming, target)
            self.remove_tree(staged)
        fsync_dir(model_dir)
        fsync_dir(staged.parent)

    def swap_config(self, deployment: Deployment) -> None:
        staging = self.staging(deployment)
        current = self.repository / deployment.model_name / CONFIG_PATH
        saved = staging / "previous-config.pbtxt"
        absent = staging / "previous-config.absent"
        if not saved.exists() and not absent.exists():
            if current.is_file():
                write_atomically(saved, current.read_bytes())
            else:
                write_atomically(absent, b"")
        write_atomically(current, (staging / CONFIG_PATH).read_bytes(), mode=0o644)

    def restore_config(self, job: JobRecord) -> None:
        staging = self.staging_root / str(job.sequence)
        current = self.repository / job.model / CONFIG_PATH
        saved = staging / "previous-config.pbtxt"
        if saved.is_file():
            write_atomically(current, saved.read_bytes(), mode=0o644)
        elif (staging / "previous-config.absent").exists():
            current.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(current.parent)

    def config_text(self, deployment: Deployment) -> str | None:
        """The model config the staged version will serve with (its own, or the one there)."""
        if deployment.config is not None:
            return (self.staging(deployment) / CONFIG_PATH).read_text(encoding="utf-8")
        existing = self.repository / deployment.model_name / CONFIG_PATH
        return existing.read_text(encoding="utf-8") if existing.is_file() else None

    # -- clean-up ----------------------------------------------------------------

    def finish(self, job: JobRecord, failed: bool, active: int | None) -> None:
        """Idempotent: what a finished job leaves behind is put right and removed.
        ``failed``: the job ended other than succeeded; ``active``: the model's
        active version now."""
        if failed and job.installed and active != job.model_version:
            self.restore_config(job)
            self.remove_version(job.model, job.model_version)
            job.installed = False
        self.remove_tree(self.staging_root / str(job.sequence))
        with contextlib.suppress(KeyError, TypeError, ValueError):
            for artifact in from_record(job.deployment).artifacts:
                for suffix in (".part", ".ranges"):
                    (self.downloads / f"{artifact.sha256}{suffix}").unlink(missing_ok=True)

    def prune_versions(self, name: str, active: int, last_known_good: int | None) -> None:
        """After a success: remove the model's version directories below ``active``
        beyond the ``keep_versions - 1`` highest (the roll back targets)."""
        model_dir = self.repository / name
        try:
            # Only what the repository scan takes for a version (a real directory with
            # a canonical number); anything else there is not ours to remove.
            older = sorted(
                (int(e.name) for e in model_dir.iterdir()
                 if e.name.isascii() and e.name.isdigit() and e.name == str(int(e.name))
                 and e.is_dir() and not e.is_symlink() and 0 < int(e.name) < active),
                reverse=True,
            )
        except OSError as exc:
            log.warning("old versions not removed", extra={"model": name, "reason": str(exc)})
            return
        for version in older[self.keep_versions - 1 :]:
            if version == last_known_good:
                continue
            try:
                self.remove_version(name, version)
            except OSError as exc:  # the job has succeeded: a leftover is not a failure
                log.warning("old version not removed",
                            extra={"model": name, "version": version, "reason": str(exc)})
                continue
            log.info("old model version removed",
                     extra={"model": name, "version": version, "active_version": active,
                            "keep_versions": self.keep_versions})

    def remove_version(self, name: str, version: int) -> None:
        target = self.target(name, version)
        if not (target.exists() or target.is_symlink()):
            return
        self.trash.mkdir(parents=True, exist_ok=True)
        holding = self.trash / f"{name}-{version}-{secrets.token_hex(4)}"
        try:
            os.rename(target, holding)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            holding = target.parent / f".removed-{version}-{secrets.token_hex(4)}"
            os.rename(target, holding)
        fsync_dir(target.parent)
        self.remove_tree(holding)

    @staticmethod
    def remove_tree(path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)

    def empty(self, directory: Path) -> None:
        for entry in directory.iterdir():
            self.remove_tree(entry)
