"""Exceptions -> gRPC status codes, in one place."""

from __future__ import annotations

import grpc

from specdec.errors import (
    CapacityError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    SpecdecError,
)


def status_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, (RequestFailedError, CapacityError, SpecdecError)):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL
