"""The two trust stores an update needs: deployments' signers and models' signers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.fleet.failures import JobFailure
from agent.protocol.deployment import (
    Deployment,
    DeploymentRejectedError,
    DeviceContext,
    verify_deployment,
)
from agent.signing.keys import TrustStore

log = logging.getLogger("agent.fleet")


class TrustUnavailableError(DeploymentRejectedError):
    code = "trust_store_invalid"


@dataclass(frozen=True, slots=True)
class Trust:
    """Loaded once at start; a store that failed to load rejects every update, with why."""

    deployment: TrustStore | None = None
    model: TrustStore | None = None
    error: str = ""

    @classmethod
    def load(cls, deployment_dir: Path, model_dir: Path) -> Trust:
        errors = []
        deployment = model = None
        try:
            deployment = TrustStore.from_directory(deployment_dir)
        except AgentError as exc:
            errors.append(f"deployment trust store: {exc}")
        try:
            model = TrustStore.from_directory(model_dir)
        except AgentError as exc:
            errors.append(f"model trust store: {exc}")
        error = "; ".join(errors)
        if errors:
            log.error("fleet updates will be rejected", extra={"reason": error})
        return cls(deployment, model, error)

    def verify_deployment(self, payload: bytes, context: DeviceContext) -> Deployment:
        """The verified deployment, or DeploymentRejectedError (with its reason code)."""
        if self.deployment is None:
            raise TrustUnavailableError(self.error or "no deployment trust store")
        return verify_deployment(payload, self.deployment, context)

    def models(self) -> TrustStore:
        """The model signers, or JobFailure: a staged version cannot be checked."""
        if self.model is None:
            raise JobFailure("trust_store_invalid", self.error or "no model trust store")
        return self.model
