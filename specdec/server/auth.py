"""API keys: the key file, its reloading on SIGHUP, and the check on every call but health.

The key file holds one key per line; blank lines and `#` comments are ignored. After a key, on
its line, may come the grants it holds beyond plain calls (`GRANTS`):

    sk-team-a-3f9c...                           # may call
    sk-platform-71d2...  route:force route:threshold

Several keys may be valid at once, so a key is rotated by adding the new one, reloading, moving clients over, removing
the old one and reloading again. Clients send `authorization: Bearer <key>` metadata. Keys are
held only as SHA-256 digests and a presented key is compared with every one of them in constant
time, so neither the timing nor the message of a refusal says which keys exist.

A reload that cannot read the file, or finds no key in it, keeps the keys already loaded and logs
why: an empty or broken key file never turns authentication off. At start-up the same problems
stop the server instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import grpc

from specdec.errors import SpecdecError

log = logging.getLogger("specdec.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # load balancers and probes call it without a key
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send the metadata 'authorization: Bearer <key>'"
# What a key may be granted: forcing a routed request's tier (the paid frontier tier is a cost
# decision, not every client's), and overriding a route's confidence threshold.
GRANTS = ("route:force", "route:threshold")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_key_file(path: Path) -> dict[str, frozenset[str]]:
    """The keys in `path` and the grants of each; SpecdecError naming the file (and the line) if
    it cannot be read, holds no key, or grants something unknown."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecdecError(f"--api-key-file {path}: cannot read it ({e})") from e
    keys: dict[str, frozenset[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        # A comment starts at a word beginning with '#' (a key may hold '#' inside it).
        words = words[: next((i for i, w in enumerate(words) if w.startswith("#")), len(words))]
        if not words:
            continue
        key, grants = words[0], words[1:]
        unknown = [g for g in grants if g not in GRANTS]
        if unknown:
            raise SpecdecError(
                f"--api-key-file {path}: line {number}: unknown grant {unknown[0]!r}; known: {', '.join(GRANTS)}"
            )
        keys[key] = frozenset(grants)
    if not keys:
        raise SpecdecError(f"--api-key-file {path}: holds no key (one per line; # starts a comment)")
    return keys


class ApiKeys:
    """The valid keys (as digests), reloadable from their file while the server runs."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._digests, self._grants = _digested(read_key_file(path))

    @property
    def count(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). On any problem keep the current keys, log why, return False."""
        try:
            digests, grants = _digested(read_key_file(self.path))
        except SpecdecError as e:
            log.error("API keys not reloaded, the %d loaded before stay valid: %s", self.count, e)
            return False
        with self._lock:
            self._digests, self._grants = digests, grants
        log.info("API keys reloaded from %s: %d key(s)", self.path, len(digests))
        return True

    def grants(self, client: str) -> frozenset[str]:
        """What the key behind `client` (a `client_of` name) is granted; nothing for other names."""
        with self._lock:
            return self._grants.get(client, frozenset())

    def client_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The client a call's metadata authenticates ("key:" + a short digest prefix, which
        names the key in logs and limits without revealing it), or None."""
        presented = _bearer(metadata)
        if presented is None:
            return None
        digest = _digest(presented)
        with self._lock:
            digests = self._digests
        match = None
        for known in digests:  # every key is compared, whether or not one matched already
            if hmac.compare_digest(known, digest):
                match = known
        return None if match is None else _client_name(match)


def _client_name(digest: bytes) -> str:
    return "key:" + digest.hex()[:12]


def _digested(keys: dict[str, frozenset[str]]) -> tuple[list[bytes], dict[str, frozenset[str]]]:
    digests = [_digest(k) for k in keys]
    return digests, {_client_name(d): g for d, g in zip(digests, keys.values())}


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid key with UNAUTHENTICATED, except the health service.
    Reflection needs a key too: it describes the whole API."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler_call_details.method.startswith(HEALTH_PREFIX)
            or self.keys.client_of(handler_call_details.invocation_metadata) is not None
        ):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that only refuses the call."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # unreachable: abort raises; makes this an async generator

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codecs)
    return grpc.stream_stream_rpc_method_handler(stream, **codecs)
