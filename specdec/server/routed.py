"""What both protocols do for a routed request, in one place: the grants an override needs, the
prompt a local tier reads (tools included), the router's answer, its metrics, and the response id
that `Feedback` names (docs/ROUTING.md). The gRPC servicer and the HTTP app parse their own wire
formats into `RoutedFields` and turn the `RoutedResult` back into theirs; everything between is
here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from specdec.errors import InvalidRequestError, PermissionDeniedError
from specdec.grammar import Constraint
from specdec.request import GenerationResult, Request
from specdec.router.feedback import Answered, ResponseLedger, quality
from specdec.router.router import Override, RoutedResult, Router, RouteRecord
from specdec.router.routes import Drift
from specdec.router.tools import Tool, with_tools
from specdec.router.validators import SchemaCache
from specdec.sampling import SamplingParams
from specdec.server.auth import ApiKeys


@dataclass(frozen=True)
class RoutedFields:
    """A routed request's own fields, parsed from either protocol."""

    route: str
    messages: list[dict[str, str]]
    json_schema: Any  # parsed (None: none given)
    tools: tuple[Tool, ...]
    override: Override
    # The conversation as an endpoint tier is sent it, when it differs from `messages` (an
    # assistant's earlier tool calls, which `messages` writes into the content for local models).
    endpoint_messages: list[dict[str, Any]] | None = None
    constraint: Constraint | None = None  # every tier's output constrained to it


@dataclass(frozen=True)
class Hooks:
    """Where routed outcomes go (the server's metrics; None: nowhere)."""

    routed: Callable[[RouteRecord, Drift], None] | None = None
    feedback: Callable[[str, str, float], None] | None = None
    failed: Callable[[str, str], None] | None = None  # (route, status name in lower case)


class RoutedService:
    def __init__(self, engine: Any, router: Router | None, keys: ApiKeys | None, hooks: Hooks | None = None):
        self.engine = engine
        self.router = router  # None: no --routes; every routed request is refused
        self.keys = keys
        self.hooks = hooks or Hooks()
        self.ledger = ResponseLedger()  # routed responses that may get feedback, and whose they are
        # Compiled JSON Schemas (json_schema, tool parameters): the router's, or one of our own for
        # tools on plain chats of a server without routes.
        self.schemas = router.schemas if router is not None else SchemaCache()

    def serving(self) -> Router:
        if self.router is None:
            raise InvalidRequestError("route", "this server serves no routes (start it with --routes FILE)")
        return self.router

    async def prompt(self, fields: RoutedFields, client: str) -> list[int]:
        """The checks that need no model (the route is served, the caller may override), then the
        prompt every local tier reads, rendered off the event loop."""
        router = self.serving()
        router.route(fields.route)  # an unknown route is refused before anything is rendered
        self._check_grants(fields.override, client)
        return await asyncio.to_thread(self.engine.render_chat, with_tools(fields.messages, fields.tools))

    async def answer(
        self,
        fields: RoutedFields,
        prompt: list[int],
        params: SamplingParams,
        client: str,
        run: Callable[[Request], Awaitable[GenerationResult]],
    ) -> tuple[RoutedResult, str]:
        """The router's answer and the response id issued for it (scoped to `client`)."""
        router = self.serving()
        if fields.constraint is not None:  # compiled off the event loop (then cached)
            await asyncio.to_thread(router.engine.check_constraint, fields.constraint)
        routed = await router.agenerate(
            fields.route, fields.endpoint_messages or fields.messages, params, fields.json_schema, run,
            prompt=prompt, tools=fields.tools, override=fields.override, constraint=fields.constraint,
        )  # fmt: skip
        if self.hooks.routed is not None:
            self.hooks.routed(routed.record, router.route(fields.route).drift)
        return routed, self.ledger.issue(client, routed.record.route, routed.record.tier)

    def failed(self, route: str, status: str) -> None:
        """A routed request that failed with this status (its name, lower case)."""
        # Only a configured route is a label: a client's made-up name must not grow the metrics.
        if self.hooks.failed is not None and self.router is not None and route in self.router.config.routes:
            self.hooks.failed(route, status)

    def feedback(self, response_id: str, score: float | None, correct: bool | None, client: str) -> Answered:
        value = quality(score, correct)
        answered = self.ledger.take(response_id, client)
        if self.hooks.feedback is not None:
            self.hooks.feedback(answered.route, answered.tier, value)
        return answered

    def _check_grants(self, override: Override, client: str) -> None:
        """A request's route_override needs its API key granted what it overrides."""
        needed = [grant for grant, asked in (
            ("route:force", override.tier is not None),
            ("route:threshold", override.confidence_below is not None),
        ) if asked]  # fmt: skip
        if not needed:
            return
        if self.keys is None:
            raise PermissionDeniedError(
                "route_override", f"needs an API key granted {needed[0]}; this server has no --api-key-file"
            )
        missing = [g for g in needed if g not in self.keys.grants(client)]
        if missing:
            raise PermissionDeniedError(
                "route_override", f"this API key is not granted {missing[0]} (the key file grants it)"
            )
