"""The checks a config must pass before the agent starts: one verdict for
``edge-agent serve`` and ``edge-agent check-config``.

``build_config`` checks a config's shape; these check it against the machine:
the directories and files it names exist, can be read (or written), and hold
what they must (trust anchors, a token). Relative paths resolve against the
working directory of the process (under systemd: ``/``, so the service's config
uses absolute paths); every error names the key, the path it resolved to and
what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.common.paths import resolved
from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError


def _problem(config: AgentConfig, key: str, path: str, what: str, fix: str) -> ConfigError:
    return ConfigError(f"{config.source}: key '{key}': {resolved(path)} {what}; {fix}")


def _readable_dir(config: AgentConfig, key: str, path: str, fix: str) -> None:
    p = Path(path)
    if not p.exists():
        raise _problem(config, key, path, "does not exist", fix)
    if not p.is_dir():
        raise _problem(config, key, path, "is not a directory", fix)
    if not os.access(p, os.R_OK | os.X_OK):
        raise _problem(
            config, key, path, "cannot be read by this user",
            f"give user {_user()} read and search permission (r-x)",
        )


def _readable_file(config: AgentConfig, key: str, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise _problem(
            config, key, path, "is not a file" if p.exists() else "does not exist",
            f"put the file there or correct '{key}'",
        )
    if not os.access(p, os.R_OK):
        raise _problem(
            config, key, path, "cannot be read by this user",
            f"give user {_user()} read permission (e.g. group-readable, mode 0640)",
        )


def _writable_dir(config: AgentConfig, key: str, path: str) -> None:
    # The agent creates it at start if its parent is writable.
    p = Path(path)
    target = p if p.exists() else p.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise _problem(config, key, path, "is not a directory", f"correct '{key}'")
    if not os.access(target, os.W_OK | os.X_OK):
        where = "" if target == p else f" (nor can it be created in {target})"
        raise _problem(
            config, key, path, f"cannot be written by this user{where}",
            f"create it owned by user {_user()}, mode 0700",
        )


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def check_startup(config: AgentConfig) -> list[str]:
    """Raise ConfigError for the first thing that would stop start-up; return warnings
    (things that do not stop serving but will make a feature fail)."""
    warnings: list[str] = []
    _readable_dir(
        config, "repository.path", config.repository.path,
        "create it and put the model directories in it, or set 'repository.path' "
        "(or --repository) to the model repository",
    )
    if not config.signing.allow_unsigned_models:
        _readable_dir(
            config, "signing.trust_dir", config.signing.trust_dir,
            "create it and copy the model-signing public keys (*.pem) into it, or set "
            "'signing.trust_dir' to where they are",
        )
        from agent.serving.signed_reader import load_trust_store

        load_trust_store(Path(config.signing.trust_dir))  # *.pem present and valid
    s = config.server
    for key, path in (
        ("server.tls_cert", s.tls_cert),
        ("server.tls_key", s.tls_key),
        ("server.tls_client_ca", s.tls_client_ca),
    ):
        if path:
            _readable_file(config, key, path)
    if s.unix_socket:
        _writable_dir(config, "server.unix_socket", str(Path(s.unix_socket).parent))
    if config.control.token_file:
        _readable_file(config, "control.token_file", config.control.token_file)
    from agent.serving.control_auth import control_policy

    control_policy(config)  # the token's form
    _writable_dir(config, "state.dir", config.state.dir)
    m = config.mqtt
    if m.enabled:
        for key, path in (
            ("mqtt.tls_ca", m.tls_ca), ("mqtt.tls_cert", m.tls_cert), ("mqtt.tls_key", m.tls_key)
        ):
            if path:
                _readable_file(config, key, path)
        # Not fatal at start (serving goes on), but every deployment would be rejected.
        from agent.signing.keys import TrustStore

        try:
            TrustStore.from_directory(Path(config.fleet.deployment_trust_dir))
        except AgentError as exc:
            where = resolved(config.fleet.deployment_trust_dir)
            warnings.append(
                f"key 'fleet.deployment_trust_dir': {exc} ({where}): "
                "every deployment will be rejected until the controller's deployment public "
                "key is installed there"
            )
    return warnings
