"""Exceptions -> gRPC status codes and HTTP statuses, in one place."""

from __future__ import annotations

import grpc

from specdec.errors import (
    CapacityError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    SpecdecError,
)


def status_for(error: BaseException) -> grpc.StatusCode:
    from specdec.router.endpoints import EndpointError

    if isinstance(error, EndpointError):  # a route's remote tier failed for good
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, (RequestFailedError, CapacityError, SpecdecError)):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL


def http_error_for(error: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error type, code) for an error of the OpenAI-compatible API."""
    from specdec.server.openai_protocol import ModelNotFoundError

    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, InvalidRequestError):
        return 400, "invalid_request_error", None
    if isinstance(error, PermissionDeniedError):
        return 403, "permission_error", None
    if isinstance(error, QueueFullError):
        return 429, "rate_limit_exceeded", None
    if isinstance(error, ShuttingDownError):
        return 503, "service_unavailable", None
    return 500, "server_error", None
