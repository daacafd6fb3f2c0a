"""The agent's error hierarchy.

Every failure the agent reports to a client or upstream is one of these. Each
class carries a stable ``code`` (used in MQTT reports and logs); the gRPC status
mapping lives in one table in ``agent.serving.grpc_status``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports deliberately."""

    code = "internal"


class ConfigError(AgentError):
    """The agent's TOML config (or a CLI flag) is wrong; the message names the key."""

    code = "config_invalid"


class ModelNotFoundError(AgentError):
    """Unknown model name or version."""

    code = "model_not_found"


class ModelNotReadyError(AgentError):
    """The model exists but is not loaded (failed verification, unloaded, loading)."""

    code = "model_not_ready"


class InvalidInputError(AgentError):
    """A request's tensors do not fit the model; the message names the input."""

    code = "invalid_input"


class InputFailedModelError(InvalidInputError):
    """onnxruntime failed on a request run on its own: its content (an index out of
    range, say), not the model, is at fault. Never counted as a model fault."""

    code = "input_failed_model"


class QueueFullError(AgentError):
    """The model's bounded request queue is full."""

    code = "queue_full"


class DeadlineExceededError(AgentError):
    """The client's deadline passed before the request could run."""

    code = "deadline_exceeded"


class ServerUnavailableError(AgentError):
    """The server is starting or draining and takes no new work."""

    code = "unavailable"


class NotPermittedError(AgentError):
    """The operation is disabled by configuration (e.g. explicit model control off)."""

    code = "not_permitted"


class ModelConfigError(AgentError):
    """A model's config.pbtxt or ONNX graph is unusable; the message says why."""

    code = "model_config_invalid"


class InferenceFailedError(AgentError):
    """onnxruntime raised while running a request that passed validation."""

    code = "inference_failed"


class VerificationError(AgentError):
    """A model signature, a digest or a deployment failed verification."""

    code = "verification_failed"


class UnauthenticatedError(AgentError):
    """A call that needs credentials came without valid ones (no or a wrong token, no client
    certificate)."""

    code = "unauthenticated"


class PermissionDeniedError(AgentError):
    """The caller may not do this: the operation is switched off, or its identity is not
    among those allowed."""

    code = "permission_denied"
