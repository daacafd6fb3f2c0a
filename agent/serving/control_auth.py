"""Who may call the repository control RPCs (RepositoryModelLoad / RepositoryModelUnload).

Serving and control are separate: control is off unless ``control.enabled``,
and can require a bearer token (gRPC metadata ``authorization: Bearer <token>``,
compared in constant time) and/or a verified mutual-TLS client certificate,
optionally with its subject CN in a list. Every configured requirement must
hold. Missing or invalid credentials are UnauthenticatedError; a valid identity
that is not allowed (a CN not listed), or control switched off, is
PermissionDeniedError.

``ControlPolicy.authorize`` is pure; ``control_policy`` reads the token file.
"""

from __future__ import annotations

import hmac
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

log = logging.getLogger("agent.control")

MIN_TOKEN_CHARS = 16
_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class ControlCaller:
    """What a front end knows about who is calling."""

    authorization: tuple[str, ...] = ()  # every 'authorization' metadata value sent
    cert_cns: tuple[str, ...] = ()  # subject CNs of a client certificate TLS verified


@dataclass(frozen=True, slots=True)
class ControlPolicy:
    enabled: bool = False
    token: bytes | None = None  # None: no token required
    require_client_cert: bool = False
    client_cns: frozenset[str] = frozenset()  # empty: any certificate the client CA signed

    def authorize(self, caller: ControlCaller | None, what: str) -> None:
        """Raise unless ``caller`` may ``what`` (e.g. "unload models")."""
        if not self.enabled:
            raise PermissionDeniedError(
                f"cannot {what}: the repository control RPCs are off "
                "(set control.enabled = true in the agent config, and preferably "
                "control.token_file and/or a client certificate requirement)"
            )
        caller = caller or ControlCaller()
        if self.token is not None:
            self._check_token(caller, what)
        if self.require_client_cert or self.client_cns:
            self._check_cert(caller, what)

    def _check_token(self, caller: ControlCaller, what: str) -> None:
        assert self.token is not None
        if not caller.authorization:
            raise UnauthenticatedError(
                f"cannot {what}: a bearer token is required "
                "(send the gRPC metadata 'authorization: Bearer <token>'; "
                "tritonclient: headers={'authorization': 'Bearer <token>'})"
            )
        if len(caller.authorization) > 1:
            raise UnauthenticatedError(f"cannot {what}: more than one 'authorization' header")
        value = caller.authorization[0]
        if value[: len(_BEARER)].lower() != _BEARER:
            raise UnauthenticatedError(
                f"cannot {what}: the 'authorization' header is not 'Bearer <token>'"
            )
        sent = value[len(_BEARER) :].strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, self.token):
            raise UnauthenticatedError(f"cannot {what}: the bearer token is not valid")

    def _check_cert(self, caller: ControlCaller, what: str) -> None:
        if not caller.cert_cns:
            raise UnauthenticatedError(
                f"cannot {what}: a client certificate is required "
                "(connect with mutual TLS; a unix socket carries none)"
            )
        if self.client_cns and not self.client_cns.intersection(caller.cert_cns):
            raise PermissionDeniedError(
                f"cannot {what}: client certificate CN {', '.join(caller.cert_cns)!s} "
                "is not in control.client_cns"
            )


def control_policy(config: AgentConfig) -> ControlPolicy:
    """The policy ``config`` asks for; reads ``control.token_file`` (ConfigError if unusable)."""
    c = config.control
    token = None
    if c.token_file:
        path = Path(c.token_file)
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{config.source}: key 'control.token_file': cannot read {path}: {exc}"
            ) from None
        if len(text) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in text):
            raise ConfigError(
                f"{config.source}: key 'control.token_file': {path} must hold one token of at "
                f"least {MIN_TOKEN_CHARS} characters, no spaces (e.g. `openssl rand -hex 32`)"
            )
        if st.st_mode & stat.S_IROTH:
            log.warning(
                "the control token file is readable by every user",
                extra={"key": "control.token_file", "path": str(path)},
            )
        token = text.encode("utf-8")
    policy = ControlPolicy(
        enabled=c.enabled,
        token=token,
        require_client_cert=c.require_client_cert,
        client_cns=frozenset(c.client_cns),
    )
    if policy.enabled and token is None and not (policy.require_client_cert or policy.client_cns):
        log.warning(
            "repository control RPCs are on WITHOUT authentication: anyone who reaches the "
            "port can load and unload models (set control.token_file or "
            "control.require_client_cert)",
            extra={"key": "control.enabled"},
        )
    return policy
