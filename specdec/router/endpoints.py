"""Remote tiers of a route: an OpenAI-compatible chat endpoint (`kind: openai` in the routes file).

    endpoints:
      frontier-api: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: "big",
                     api_key_env: FRONTIER_API_KEY, timeout_s: 30, retries: 2}

Anything that serves `POST {base_url}/chat/completions` the way OpenAI does is such an endpoint:
OpenAI itself, vLLM, TGI, llama.cpp's server - and another specdec's HTTP API, which is how one
specdec escalates to another. The key is read from the environment variable the config names (the
routes file never holds a secret), when the call is made, so rotating it needs no restart.

A call is retried `retries` times on what a retry can cure - a connection that fails or times out,
HTTP 408, 409, 429 and 5xx - after the server's `Retry-After` (capped) or an exponential backoff;
any other status fails at once with the endpoint's own error message. After `failures_to_cool`
calls in a row have failed so (their retries spent), the endpoint cools down: for `cooldown_s` every
call fails at once, without touching the network, so a dead endpoint costs requests no timeouts and
is not hammered while it recovers; the first call after the cool-down tries again, and a success
resets the count. The call is blocking (the standard library's HTTP client: no dependency for one
POST); the router runs it off the event loop, so the count is kept under a lock.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from specdec.errors import SpecdecError
from specdec.router.tools import openai_calls

RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 10.0  # a server asking for longer is not waited for past this


class EndpointError(SpecdecError):
    """An endpoint call failed for good (after its retries): `status` is the last HTTP status
    (None: no answer at all)."""

    def __init__(self, endpoint: str, message: str, status: int | None = None):
        super().__init__(f"endpoint {endpoint}: {message}")
        self.endpoint = endpoint
        self.status = status


@dataclass(frozen=True)
class EndpointAnswer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # the whole call, retries included
    attempts: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)  # the endpoint's response body
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)  # (name, arguments) of each call


@dataclass(frozen=True)
class OpenAIEndpoint:
    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5  # the first retry's wait without Retry-After; doubled each time
    failures_to_cool: int = 3  # failed calls in a row that start a cool-down (0: never cool down)
    cooldown_s: float = 30.0
    _cooling: _Cooldown = field(default_factory=lambda: _Cooldown(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SpecdecError(
                f"endpoint {self.name}: base_url must be an http(s) URL, got {self.base_url!r}"
            )
        if not self.model:
            raise SpecdecError(f"endpoint {self.name}: model must be named")
        if not self.timeout_s > 0:
            raise SpecdecError(f"endpoint {self.name}: timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise SpecdecError(f"endpoint {self.name}: retries must be >= 0, got {self.retries}")
        if self.failures_to_cool < 0 or not self.cooldown_s >= 0 or not self.backoff_s >= 0:
            raise SpecdecError(
                f"endpoint {self.name}: failures_to_cool, cooldown_s and backoff_s must be >= 0"
            )

    def chat(self, messages: list[dict[str, str]], **fields: Any) -> EndpointAnswer:
        """One chat completion (`fields`: max_tokens, temperature, seed, stop, ... as the OpenAI
        API names them), the first choice's text."""
        body = {"model": self.model, "messages": messages, **fields}
        started = time.monotonic()
        self._cooling.check(self.name)
        try:
            reply, attempts = self._post("/chat/completions", body)
        except EndpointError as e:
            if e.status is None or e.status in RETRYABLE:  # it is down or overloaded, not our request
                self._cooling.failed(self.failures_to_cool, self.cooldown_s, str(e))
            raise
        self._cooling.succeeded()
        try:
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            return EndpointAnswer(
                text=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                seconds=time.monotonic() - started,
                attempts=attempts,
                raw=reply,
                tool_calls=openai_calls(choice["message"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EndpointError(self.name, f"answered 200 without a chat completion ({e!r})", 200) from None

    # ------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(self.name, f"its API key variable {self.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        url = urllib.parse.urlsplit(self.base_url.rstrip("/") + path)
        payload = json.dumps(body).encode()
        headers = self._headers()
        wait = self.backoff_s
        last = "no attempt"
        status: int | None = None
        for attempt in range(1, self.retries + 2):
            retry_after = None
            try:
                status, data, retry_after = self._once(url, payload, headers)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
                status, last = None, f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    try:
                        return json.loads(data), attempt
                    except (ValueError, RecursionError):
                        raise EndpointError(
                            self.name, "answered 200 with a body that is not JSON", 200
                        ) from None
                last = f"HTTP {status}: {_error_message(data)}"
                if status not in RETRYABLE:
                    raise EndpointError(self.name, last, status)
            if attempt <= self.retries:
                time.sleep(min(retry_after, MAX_RETRY_AFTER_S) if retry_after is not None else wait)
                wait *= 2
        raise EndpointError(self.name, f"failed after {self.retries + 1} attempt(s); last: {last}", status)

    def _once(self, url: urllib.parse.SplitResult, payload: bytes, headers: dict[str, str]):
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = kind(url.hostname, url.port, timeout=self.timeout_s)
        try:
            target = url.path + (f"?{url.query}" if url.query else "")
            connection.request("POST", target, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, data, _retry_after(response.getheader("Retry-After"))
        finally:
            connection.close()


class _Cooldown:
    """Consecutive failed calls of one endpoint, and until when it is cooling down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0
        self._last = ""

    def check(self, name: str) -> None:
        with self._lock:
            left = self._until - time.monotonic()
            if left > 0:
                raise EndpointError(
                    name,
                    f"cooling down for {left:.1f} s more after {self._failures} failed calls in a row "
                    f"(last: {self._last})",
                )

    def failed(self, threshold: int, cooldown_s: float, message: str) -> None:
        with self._lock:
            self._failures += 1
            self._last = message
            if threshold and self._failures >= threshold:
                self._until = time.monotonic() + cooldown_s

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._until = 0.0


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing for a capped wait
        return None


def _error_message(data: bytes) -> str:
    """The message of an OpenAI error body, or the start of whatever the body is."""
    try:
        error = json.loads(data).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    except (ValueError, AttributeError, RecursionError):
        pass
    return data[:200].decode("utf-8", "replace") or "(empty body)"
