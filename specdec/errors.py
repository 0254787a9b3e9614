"""specdec's exceptions. Raised where the problem is found, mapped to a gRPC status in one place
(``specdec.server.status``); every message names what is wrong and what to do about it."""

from __future__ import annotations


class SpecdecError(Exception):
    """Base class of every error specdec raises on purpose."""


class CheckpointError(SpecdecError):
    """A checkpoint directory cannot be loaded: missing files, unsupported architecture, bad weights."""


class IncompatiblePairError(SpecdecError):
    """Draft and target cannot be paired (different tokenizers, ...)."""


class CapacityError(SpecdecError):
    """A configuration does not fit in memory (KV cache too large, ...)."""


class InvalidRequestError(SpecdecError):
    """A request field is out of range. ``field`` names it, for the client."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class PermissionDeniedError(SpecdecError):
    """The caller is known but not allowed this (an API key without the grant). ``field`` names
    what it asked for."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(SpecdecError):
    """The waiting queue is at its limit; the client should retry later."""


class RequestFailedError(SpecdecError):
    """One request's computation went bad (e.g. non-finite logits); the others go on."""


class ShuttingDownError(SpecdecError):
    """The engine is draining and takes no new requests."""


class NotFoundError(SpecdecError):
    """What the request names does not exist for this caller (an unknown or foreign response id)."""
