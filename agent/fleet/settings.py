"""The updater's settings, mapped from the agent config, and the device's topics."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.fleet.downloader import DownloadSettings
from agent.protocol.names import is_reserved_device_id


def default_device_id() -> str:
    """The host name, cut to what a device id may hold.

    A host name in the controllers' namespace (agent.protocol.names) is refused:
    the broker would grant it a controller's rights.
    """
    name = "".join(
        c if (c.isascii() and c.isalnum()) or c in "_.-" else "-" for c in socket.gethostname()
    )
    device = (name or "edge-agent")[:64]
    if is_reserved_device_id(device):
        raise ConfigError(
            f"mqtt.device_id: the host name {device!r} is a reserved (controller) id; "
            "set mqtt.device_id to this device's id"
        )
    return device


@dataclass(frozen=True, slots=True)
class UpdaterSettings:
    device_id: str
    prefix: str
    state_dir: Path
    repository: Path
    deployment_trust_dir: Path
    model_trust_dir: Path
    download: DownloadSettings
    chunk_timeout_s: float
    download_timeout_s: float
    max_model_bytes: int
    max_clock_skew_s: float
    probation_s: float
    probation_max_error_rate: float
    probation_min_requests: int
    max_start_attempts: int
    keep_versions: int
    tags: tuple[str, ...] = ()  # reported for the controllers' tag:<tag> groups

    @classmethod
    def from_config(cls, config: AgentConfig) -> UpdaterSettings:
        fleet = config.fleet
        return cls(
            device_id=config.mqtt.device_id or default_device_id(),
            prefix=config.mqtt.topic_prefix,
            state_dir=Path(config.state.dir),
            repository=Path(config.repository.path),
            deployment_trust_dir=Path(fleet.deployment_trust_dir),
            model_trust_dir=Path(config.signing.trust_dir),
            download=DownloadSettings(
                chunk_bytes=fleet.chunk_bytes,
                window=fleet.window,
                retries=fleet.chunk_retries,
                max_bytes_per_s=fleet.max_download_bytes_per_s,
            ),
            chunk_timeout_s=fleet.chunk_timeout_s,
            download_timeout_s=fleet.download_timeout_s,
            max_model_bytes=fleet.max_model_bytes,
            max_clock_skew_s=fleet.max_clock_skew_s,
            probation_s=fleet.probation_s,
            probation_max_error_rate=fleet.probation_max_error_rate,
            probation_min_requests=fleet.probation_min_requests,
            max_start_attempts=fleet.max_start_attempts,
            keep_versions=fleet.keep_versions,
            tags=fleet.tags,
        )


@dataclass(frozen=True, slots=True)
class Topics:
    desired: str
    reported: str
    jobs: str
    errors: str
    artifacts: str

    @classmethod
    def of(cls, prefix: str, device: str) -> Topics:
        base = f"{prefix}/devices/{device}"
        return cls(f"{base}/desired", f"{base}/reported", f"{base}/jobs", f"{base}/errors",
                   f"{base}/artifacts")
