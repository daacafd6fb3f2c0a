"""Fetching and checking a staged version: the download under its deadline, the
model signature and the deployment's digests (no mix-and-match)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path

from agent.common.background import run_in_background
from agent.common.buffers import FileBytes
from agent.errors import VerificationError
from agent.fleet.downloader import ChunkFetcher, Downloader, DownloadError, DownloadSettings
from agent.fleet.failures import JobFailure, failpoint
from agent.fleet.install import Installer
from agent.fleet.lifecycle import Event, Reason
from agent.fleet.ports import Clock
from agent.protocol.deployment import CONFIG_PATH, Deployment, check_signed_manifest
from agent.signing.identity import ModelIdentity
from agent.signing.keys import TrustStore
from agent.signing.version_dir import verify_version


def _identity(deployment: Deployment) -> ModelIdentity:
    # The signed identity.json must name what the deployment installs the files as.
    return ModelIdentity(deployment.model_name, deployment.model_version)


class _DeadlineExceededError(DownloadError):
    code = Reason.DOWNLOAD_DEADLINE_EXCEEDED


class _DeadlineFetcher:
    """The job's chunk fetcher bounded by the download's overall deadline.

    Per-chunk timeouts and retries cannot end a download whose controller answers
    just in time, or that waits for a broker that never comes back. No request
    or wait for the connection outlasts the deadline, and the downloader does
    not retry the error, so the transfer stops the way it does for other
    failures (partial files checkpointed and closed) instead of being cancelled
    mid-write or mid-hash.
    """

    def __init__(self, fetcher: ChunkFetcher, deadline: float, clock: Clock) -> None:
        self._fetcher = fetcher
        self._deadline = deadline  # clock.monotonic()
        self._clock = clock

    def _left(self) -> float:
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            raise _DeadlineExceededError("the download deadline has passed")
        return left

    async def wait_online(self) -> None:
        try:
            await asyncio.wait_for(self._fetcher.wait_online(), self._left())
        except TimeoutError:
            raise _DeadlineExceededError("the download deadline passed while offline") from None

    def online(self) -> bool:
        return self._fetcher.online()

    async def fetch(self, sha256: str, offset: int, length: int) -> bytes:
        try:
            return await asyncio.wait_for(
                self._fetcher.fetch(sha256, offset, length), self._left()
            )
        except TimeoutError:
            raise _DeadlineExceededError("the download deadline has passed") from None


async def download(
    deployment: Deployment, files: Installer, fetcher: ChunkFetcher,
    settings: DownloadSettings, timeout_s: float, clock: Clock,
    on_progress: Callable[[int, int], None], progress: Callable[[], tuple[int, int] | None],
) -> None:
    """Every file of the deployment into staging, resumably, or JobFailure."""
    staged = files.staged_version(deployment)
    targets = [(f, staged / f.path) for f in deployment.files]
    if deployment.config is not None:
        targets.append((deployment.config, files.staging(deployment) / CONFIG_PATH))
    # Per agent run: a restart resumes the download with a full allowance.
    bounded = _DeadlineFetcher(fetcher, clock.monotonic() + timeout_s, clock)
    downloader = Downloader(files.downloads, bounded, settings, on_progress)
    try:
        await downloader.download(targets)
        failpoint("downloaded", deployment.sequence)
    except VerificationError as exc:  # digest mismatch of a complete file
        raise JobFailure(exc.code, str(exc)) from None
    except _DeadlineExceededError:
        total = sum({f.sha256: f.size for f, _ in targets}.values())
        done, total = progress() or (0, total)
        raise JobFailure(
            Reason.DOWNLOAD_DEADLINE_EXCEEDED,
            f"the download did not finish within fleet.download_timeout_s = {timeout_s:g} s: "
            f"{done} of {total} bytes arrived",
            Event.TIME_OUT,
        ) from None
    except DownloadError as exc:
        event = Event.TIME_OUT if exc.code == Reason.DOWNLOAD_TIMED_OUT else Event.FAIL
        raise JobFailure(exc.code, str(exc), event) from None
    except OSError as exc:
        raise JobFailure(Reason.STORAGE_FAILED, f"cannot store the download: {exc}") from None


async def verify_staged(
    deployment: Deployment, staged: Path, trust: TrustStore, load: tuple[str, ...]
) -> dict[str, FileBytes]:
    """Model signature + every file + no mix-and-match; the verified bytes of ``load``."""
    try:
        # Hashing the whole version (100s of MB) at a low priority: serving first.
        verified = await run_in_background(
            partial(verify_version, identity=_identity(deployment)),
            staged, trust, load, name="fleet-verify",
        )
        check_signed_manifest(deployment, verified.manifest)
    except VerificationError as exc:
        raise JobFailure(exc.code, f"staged version rejected: {exc}") from None
    return dict(verified.contents)


async def same_files(deployment: Deployment, target: Path, trust: TrustStore) -> bool:
    """True if the version directory ``target`` holds the deployment's signed files."""
    try:
        existing = await run_in_background(
            partial(verify_version, identity=_identity(deployment)),
            target, trust, name="fleet-verify",
        )
        check_signed_manifest(deployment, existing.manifest)
    except VerificationError:
        return False
    return True
