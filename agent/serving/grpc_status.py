"""The one table mapping agent errors to gRPC status codes."""

from __future__ import annotations

import grpc

from agent import errors

_STATUS: dict[type[errors.AgentError], grpc.StatusCode] = {
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.NotPermittedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VerificationError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InferenceFailedError: grpc.StatusCode.INTERNAL,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: errors.AgentError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
