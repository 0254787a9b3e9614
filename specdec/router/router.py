"""Routing one request: the route's primary tier answers first; the route's rules read that answer
(and the prompt) and, when any fires, the next tier of the cascade answers instead - reusing the
last local answer as its draft - until a tier's answer passes or the cascade ends.

- Rules (`routes.Rules`): `input_tokens_above` is read before anything runs (a prompt past it skips
  the tiers before the last, whose answers would be thrown away); `confidence_below` reads the
  answering model's own raw probabilities of its tokens (`confidence`, through the route's
  calibration when it has one); `schema_invalid` reads the request's `json_schema`
  (`validators`) and the arguments of every tool call (`tools`); `tools_needed` counts the
  answer's tool calls, when the request offered tools. A rule that cannot read a tier's answer
  (confidence of an endpoint's answer, which carries no probabilities) does not fire for it.
- Constraints (`specdec.grammar.Constraint`: a JSON Schema, any JSON object, a regex or a grammar):
  every local tier decodes under it, so the small answer and the big one both match it, and the
  small answer is still the big tier's draft - verified under the same grammar, exactly the big
  tier's own constrained output. An endpoint tier is asked for it as OpenAI's `response_format`
  (JSON kinds only: a regex or grammar cannot be sent to an endpoint, and is refused for a cascade
  that would run one). `schema_invalid` fires on an answer whose constraint is incomplete (cut by
  max_new_tokens, a stop string or the context) and, for the JSON kinds, on one that fails the
  schema (keywords the grammar does not enforce): the request's `json_schema` if it gave one, else
  the constraint's own schema.
- Overrides (`Override`, for API keys granted them - the server's check): a forced tier answers
  alone, no rule read; a threshold replaces the route's `confidence_below`.
- Draft reuse: escalating to a local mode, the last local answer is the target's external draft
  (`Request.external_draft`): the target verifies it in wide passes and keeps it up to its first
  disagreement, then generates on as that mode would. The output is exactly the mode's own (greedy:
  token for token; sampled: in distribution - a draft-tier answer escalated to speculative is
  verified against the draft model's q, anything else as point masses, which is exact for any
  proposal; `draft_request`), and an answer the target agrees with costs no per-token decoding.
- Endpoints (`endpoints`): an endpoint that fails moves the cascade on to its next tier; when no tier
  is left the route's `on_endpoint_failure` says whether that is an error (UNAVAILABLE, with the
  endpoint's message) or the last answer stands, flagged as a fallback.

Every result carries a `RouteRecord`: which tier answered, whether it escalated and why (each
reason with its measured value), the confidence, the schema verdict and what each tier spent.

The flow is written once, asynchronously (`Router.agenerate`): the server runs a local tier's request
through its engine loop, an in-process caller (`Router.generate`) through `Engine.generate`; an
endpoint's blocking call runs on a worker thread either way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from specdec.errors import InvalidRequestError, SpecdecError
from specdec.grammar import Constraint, ConstraintKind
from specdec.request import ConstraintOutcome, GenerationResult, Mode, Request
from specdec.router.endpoints import EndpointError
from specdec.router.routes import LOCAL_MODES, Route, RoutesConfig, RoutesError, Rules
from specdec.router.tools import Tool, ToolCall, calls_in, check_calls, with_tools
from specdec.router.validators import SchemaCache, check_json
from specdec.sampling import SamplingParams


@dataclass(frozen=True)
class TierSpend:
    tier: str
    prompt_tokens: int
    completion_tokens: int
    draft_tokens_reused: int = 0  # of the previous answer, accepted by this tier's target
    error: str | None = None  # the tier failed (an endpoint down): why


@dataclass(frozen=True)
class RouteRecord:
    route: str
    tier: str  # the tier whose answer is returned
    escalated: bool
    reasons: tuple[str, ...]  # every rule that fired, with its measured value, in the order they fired
    fired: tuple[str, ...]  # the same, as rule names (metrics labels): confidence_below, ..., endpoint_failed
    confidence: float | None  # the primary's (raw; None: it gave no probabilities, or was skipped)
    calibrated_confidence: float | None  # through the route's calibration, when it has one
    schema_valid: bool | None  # the returned answer's verdict (None: the request gave no schema)
    fallback: bool = False  # every escalation failed; the answer is an earlier tier's
    spent: tuple[TierSpend, ...] = ()
    tool_calls_valid: bool | None = None  # every call checked out (None: the request offered no tools)
    overridden: bool = False  # the request's Override decided (a forced tier or its own threshold)


def answering_spend(record: RouteRecord) -> TierSpend:
    """What the answering tier spent (after a fallback the last spend is the failed tier's)."""
    return next(s for s in reversed(record.spent) if s.tier == record.tier and s.error is None)


@dataclass(frozen=True)
class RoutedResult:
    text: str
    token_ids: list[int]  # empty for an endpoint's answer (its tokens are the endpoint's)
    finish_reason: str
    record: RouteRecord
    result: GenerationResult | None = field(default=None, repr=False)  # the answering local tier's
    tool_calls: tuple[ToolCall, ...] = ()  # the answer's, checked
    # How the answer stands against the request's constraint (None: it gave none). A local tier's
    # is its matcher's; an endpoint's is the schema check's verdict (complete = it validates).
    constraint: ConstraintOutcome | None = None


@dataclass(frozen=True)
class Verdict:
    """What the rules made of one tier's answer."""

    reasons: tuple[str, ...]
    fired: tuple[str, ...]  # the rule of each reason
    confidence: float | None
    calibrated: float | None
    schema_valid: bool | None
    tool_calls: tuple[ToolCall, ...] | None = None  # checked (None: the request offered no tools)


@dataclass(frozen=True)
class Override:
    """A request's own routing (`RouteOverride`; the server checks the caller may)."""

    tier: str | None = None  # answer with this tier of the route's cascade alone
    confidence_below: float | None = None  # in place of the route's threshold

    def __bool__(self) -> bool:
        return self.tier is not None or self.confidence_below is not None


class Router:
    def __init__(self, engine: Any, config: RoutesConfig, schemas: SchemaCache | None = None):
        self.engine = engine
        self.config = config
        self.schemas = schemas or SchemaCache()
        check_routes(config, engine.limits.has_draft, engine.limits.draft_answers)

    def generate(
        self,
        route_name: str,
        messages: list[dict[str, str]],
        params: SamplingParams | None = None,
        json_schema: Any = None,
        tools: tuple[Tool, ...] = (),
        override: Override | None = None,
        constraint: Constraint | None = None,
    ) -> RoutedResult:
        """Route one chat request in-process (blocking; not from inside a running event loop)."""

        async def run(request: Request) -> GenerationResult:
            [result] = self.engine.generate([request])
            return result

        routed = self.agenerate(
            route_name,
            messages,
            params,
            json_schema,
            run,
            tools=tools,
            override=override,
            constraint=constraint,
        )
        return asyncio.run(routed)

    async def agenerate(
        self,
        route_name: str,
        messages: list[dict[str, str]],
        params: SamplingParams | None,
        json_schema: Any,
        run: Callable[[Request], Awaitable[GenerationResult]],
        prompt: list[int] | None = None,
        tools: tuple[Tool, ...] = (),
        override: Override | None = None,
        constraint: Constraint | None = None,
    ) -> RoutedResult:
        """Route one chat request; `run` runs a local tier's request to its end. `prompt`: the
        messages (and tools: `tools.with_tools`) already rendered (the server tokenizes off its
        event loop). `constraint`: every tier's output constrained to it (the server has compiled
        it: `Engine.check_constraint`)."""
        override = override or Override()
        route = self._overridden(self.route(route_name), override)
        params = params or SamplingParams()
        if constraint is not None:
            constraint.check()  # named errors before its schema is read (the servers compiled it already)
            if json_schema is None:
                json_schema = constraint_schema(constraint)
        validator = None if json_schema is None else self.schemas.validator(json_schema)
        if prompt is None:
            prompt = self.engine.render_chat(with_tools(messages, tools))
        reasons: list[str] = []
        fired: list[str] = []
        tiers = list(route.tiers)
        too_long = input_too_long(route.rules, len(prompt))
        if override.tier is not None:
            reasons.append(f"route_override.tier {override.tier}")
            fired.append("override")
            tiers = [override.tier]
        elif too_long is not None and len(tiers) > 1:
            reasons.append(too_long)
            fired.append("input_tokens_above")
            tiers = tiers[-1:]  # the earlier tiers' answers would not be used
        if constraint is not None:
            check_constrained(route, tiers, constraint, tools)
        spent: list[TierSpend] = []
        answer: _Answer | None = None
        verdict: Verdict | None = None  # the rules on `answer`
        local: _Answer | None = None  # the last local answer: the next local tier's draft
        primary_verdict: Verdict | None = None
        for i, tier in enumerate(tiers):
            last = i == len(tiers) - 1
            try:
                answer = await self._run(
                    tier, prompt, messages, tier_params(params, i), local, run, tools, constraint
                )
            except EndpointError as e:
                spent.append(TierSpend(tier, 0, 0, error=str(e)))
                reasons.append(f"{tier} failed: {e}")
                fired.append("endpoint_failed")
                if not last:
                    continue
                if answer is None or verdict is None or route.on_endpoint_failure != "primary_answer":
                    raise
                return self._finish(
                    route, answer, verdict, reasons, fired, spent, primary_verdict, override, fallback=True
                )
            spent.append(answer.spend)
            local = answer if answer.result is not None else local
            calls = answer.calls if answer.calls is not None else calls_in(answer.text)
            checked = check_calls(calls, tools, self.schemas) if tools else None
            verdict = check_answer(
                route,
                answer.text,
                answer.token_probs,
                validator,
                checked,
                answer.constraint,
                answer.finish_reason,
            )
            if constraint is not None and answer.constraint is None:  # an endpoint's: the schema check says
                answer = replace(answer, constraint=ConstraintOutcome(complete=verdict.schema_valid is True))
            if tier == route.primary:
                primary_verdict = verdict
            if last or not verdict.reasons:
                return self._finish(route, answer, verdict, reasons, fired, spent, primary_verdict, override)
            reasons.extend(verdict.reasons)
            fired.extend(verdict.fired)
        raise AssertionError("the cascade ended without an answer")  # pragma: no cover

    def _overridden(self, route: Route, override: Override) -> Route:
        """The route as this request's override has it; InvalidRequestError naming the field for
        one it cannot take."""
        if override.tier is not None and override.tier not in route.tiers:
            raise InvalidRequestError(
                "route_override.tier",
                f"{override.tier!r} is not a tier of route {route.name!r} (its cascade: {', '.join(route.tiers)})",
            )
        threshold = override.confidence_below
        if threshold is None:
            return route
        if not 0 <= threshold <= 1:
            raise InvalidRequestError(
                "route_override.confidence_below", f"a threshold in [0, 1], got {threshold}"
            )
        if not route.escalate_to or route.primary not in LOCAL_MODES:
            raise InvalidRequestError(
                "route_override.confidence_below",
                f"route {route.name!r} has no local primary with a tier to escalate to",
            )
        return replace(route, rules=replace(route.rules, confidence_below=threshold))

    def route(self, name: str) -> Route:
        route = self.config.routes.get(name)
        if route is None:
            known = ", ".join(sorted(self.config.routes)) or "none are configured"
            raise InvalidRequestError("route", f"unknown route {name!r}; known: {known}")
        return route

    # ------------------------------------------------------------------------------------------

    async def _run(
        self,
        tier: str,
        prompt: list[int],
        messages: list[dict[str, str]],
        params: SamplingParams,
        previous: _Answer | None,  # the last local tier's answer, if any
        run: Callable[[Request], Awaitable[GenerationResult]],
        tools: tuple[Tool, ...],
        constraint: Constraint | None,
    ) -> _Answer:
        if tier not in LOCAL_MODES:
            return await asyncio.to_thread(self._endpoint, tier, messages, params, tools, constraint)
        draft = previous.result if previous is not None else None
        drafted_by = previous.tier if previous is not None else None
        result = await run(
            draft_request(self.engine, prompt, params, Mode(tier), draft, drafted_by, constraint)
        )
        if result.error:
            raise SpecdecError(f"tier {tier}: {result.error}")
        probs = torch.tensor([lp.logprob for lp in result.logprobs], dtype=torch.float64).exp()
        # The target keeps the draft up to its first disagreement and never re-emits a rejected
        # draft token, so the common prefix is exactly what it accepted of the previous answer.
        reused = _common_prefix(draft.token_ids, result.token_ids) if draft is not None else 0
        return _Answer(
            tier,
            result.text,
            result.finish_reason.value,
            probs,
            TierSpend(tier, result.prompt_tokens, len(result.token_ids), reused),
            result,
            constraint=result.constraint,
        )

    def _endpoint(
        self,
        tier: str,
        messages: list[dict[str, str]],
        params: SamplingParams,
        tools: tuple[Tool, ...],
        constraint: Constraint | None,
    ) -> _Answer:
        endpoint = self.config.endpoints[tier]
        fields: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if tools:  # the endpoint's own template renders them; its answer's calls come back parsed
            fields["tools"] = [t.openai() for t in tools]
        if constraint is not None:  # JSON kinds only (check_constrained)
            fields["response_format"] = response_format(constraint)
        if params.top_p < 1:
            fields["top_p"] = params.top_p
        if params.seed is not None:
            fields["seed"] = params.seed
        if params.stop:
            fields["stop"] = list(params.stop)
        reply = endpoint.chat(messages, **fields)
        return _Answer(
            tier,
            reply.text,
            reply.finish_reason or "stop",
            None,
            TierSpend(tier, reply.prompt_tokens, reply.completion_tokens),
            None,
            reply.tool_calls,
        )

    def _finish(
        self,
        route: Route,
        answer: _Answer,
        verdict: Verdict,  # the rules on `answer`
        reasons: list[str],
        fired: list[str],
        spent: list[TierSpend],
        primary: Verdict | None,  # the primary's own (None: it was skipped or failed)
        override: Override,
        fallback: bool = False,
    ) -> RoutedResult:
        record = RouteRecord(
            route=route.name,
            tier=answer.tier,
            escalated=answer.tier != route.primary,
            reasons=tuple(reasons),
            fired=tuple(fired),
            confidence=primary.confidence if primary is not None else None,
            calibrated_confidence=primary.calibrated if primary is not None else None,
            schema_valid=verdict.schema_valid,
            fallback=fallback,
            spent=tuple(spent),
            tool_calls_valid=None if verdict.tool_calls is None else all(c.valid for c in verdict.tool_calls),
            overridden=bool(override),
        )
        tokens = list(answer.result.token_ids) if answer.result is not None else []
        return RoutedResult(
            answer.text,
            tokens,
            answer.finish_reason,
            record,
            answer.result,
            verdict.tool_calls or (),
            answer.constraint,
        )


@dataclass(frozen=True)
class _Answer:
    tier: str
    text: str
    finish_reason: str
    token_probs: torch.Tensor | None  # the answering model's raw probability of each token (local tiers)
    spend: TierSpend
    result: GenerationResult | None
    calls: list[tuple[str, Any]] | None = None  # an endpoint's tool calls (a local tier's are in its text)
    constraint: ConstraintOutcome | None = None  # a constrained local tier's


def check_routes(config: RoutesConfig, has_draft: bool, draft_answers: bool) -> None:
    """What the served pair cannot run, refused at start-up by route: a draft or speculative tier
    without a draft, draft mode with a draft that cannot answer alone, and the rules this server
    does not evaluate yet."""
    for route in config.routes.values():
        needing = sorted({"draft", "speculative"} & route.local_modes)
        if needing and not has_draft:
            raise RoutesError(
                f"route {route.name!r}: tier {needing[0]!r}: this server has no draft model (--draft); "
                "use target or an endpoint"
            )
        if "draft" in route.tiers and not draft_answers:
            raise RoutesError(
                f"route {route.name!r}: tier 'draft': this pair's draft cannot answer alone (a subset-head "
                "or feature-reading draft speculates only); use speculative as the small tier"
            )
        if route.rules.confidence_below is not None and route.primary not in LOCAL_MODES:
            raise RoutesError(
                f"route {route.name!r}: confidence_below: the primary {route.primary!r} is an endpoint, whose "
                "answers carry no token probabilities"
            )


@dataclass(frozen=True)
class AnswerFacts:
    """What the rules read of one answer: measured live (`facts_of`), or recorded (`specdec eval`
    replays a route over recorded answers with the very same `rules_fired`)."""

    confidence: float | None  # raw (None: no token probabilities, an endpoint's answer)
    calibrated: float | None  # through the route's calibration, when it has one
    schema_valid: bool | None  # against json_schema (None: none given, or the answer calls tools)
    schema_error: str | None = None  # why not
    tool_calls: tuple[ToolCall, ...] | None = None  # checked (None: the request offered no tools)
    # A constrained local answer: whether its output is a whole match (None: unconstrained, or an
    # endpoint's answer, which the schema check alone judges); how it ended, when it is not.
    constraint_complete: bool | None = None
    finish_reason: str | None = None


def facts_of(
    route: Route,
    text: str,
    token_probs: torch.Tensor | None,
    validator: Any,
    tool_calls: tuple[ToolCall, ...] | None = None,
    constraint: ConstraintOutcome | None = None,
    finish_reason: str | None = None,
) -> AnswerFacts:
    confidence = calibrated = None
    if token_probs is not None:
        confidence = route.confidence(token_probs)
        calibrated = route.calibration(confidence) if route.calibration is not None else None
    schema_valid = schema_error = None
    if validator is not None and not tool_calls:  # an answer that calls tools is checked by its calls
        verdict = check_json(text, validator)
        schema_valid, schema_error = verdict.valid, verdict.error
    complete = constraint.complete if constraint is not None else None
    return AnswerFacts(
        confidence, calibrated, schema_valid, schema_error, tool_calls, complete, finish_reason
    )


def rules_fired(rules: Rules, facts: AnswerFacts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The rules that fire on an answer: (reasons with their values, rule names)."""
    reasons, fired = [], []
    judged = facts.calibrated if facts.calibrated is not None else facts.confidence
    threshold = rules.confidence_below
    if threshold is not None and judged is not None and judged < threshold:
        name = "calibrated confidence" if facts.calibrated is not None else "confidence"
        reasons.append(f"{name} {judged:.3f} < {threshold:g}")
        fired.append("confidence_below")
    if rules.schema_invalid and facts.constraint_complete is False:  # one reason: its schema check fails too
        reasons.append(
            f"schema_invalid: the output ended ({facts.finish_reason}) before its constraint was complete"
        )
        fired.append("schema_invalid")
    elif rules.schema_invalid and facts.schema_valid is False:
        reasons.append(f"schema_invalid: {facts.schema_error}")
        fired.append("schema_invalid")
    if facts.tool_calls is not None:
        invalid = [(i, c) for i, c in enumerate(facts.tool_calls) if not c.valid]
        if rules.schema_invalid and invalid:
            i, call = invalid[0]
            reasons.append(f"schema_invalid: tool call {i}: {call.error}")
            fired.append("schema_invalid")
        needed = rules.tools_needed
        if needed is not None and needed.holds(len(facts.tool_calls)):
            reasons.append(f"tool calls {len(facts.tool_calls)} {needed}")
            fired.append("tools_needed")
    return tuple(reasons), tuple(fired)


def input_too_long(rules: Rules, prompt_tokens: int) -> str | None:
    """The reason `input_tokens_above` fires on a prompt of this length, or None."""
    limit = rules.input_tokens_above
    return f"input_tokens {prompt_tokens} > {limit}" if limit is not None and prompt_tokens > limit else None


def check_answer(
    route: Route,
    text: str,
    token_probs: torch.Tensor | None,
    validator: Any,
    tool_calls: tuple[ToolCall, ...] | None = None,  # checked (None: the request offered no tools)
    constraint: ConstraintOutcome | None = None,  # a constrained local answer's
    finish_reason: str | None = None,
) -> Verdict:
    """The route's rules on one tier's answer: the reasons that fire, with their values."""
    facts = facts_of(route, text, token_probs, validator, tool_calls, constraint, finish_reason)
    reasons, fired = rules_fired(route.rules, facts)
    return Verdict(reasons, fired, facts.confidence, facts.calibrated, facts.schema_valid, tool_calls)


def draft_request(
    engine: Any,
    prompt: list[int],
    params: SamplingParams,
    mode: Mode,
    draft: GenerationResult | None,
    drafted_by: str | None = None,
    constraint: Constraint | None = None,
) -> Any:
    """The request of a local tier: the client's settings, token probabilities asked for (the
    confidence rule reads them), and the previous local answer as the external draft.

    An answer of the draft tier, escalated to speculative, is verified against the draft model's
    own q (`Request.external_draft_from_draft`): it was sampled from that q, under these settings.
    The q is recomputed in one wide pass, so this needs the recomputation to give the numbers the
    answer was drawn from: a float32 draft (reduced precision differs by ~1e-2 between pass
    shapes) and no top-k / top-p (a token at the truncation's edge could fall out of the
    recomputed support, where q = 0 would always accept it). Anything else - those, the target
    tier (which keeps no draft cache), an answer of another tier - is verified as point masses,
    which is exact for any proposal but accepts only with probability p. A constrained request's
    draft is verified under its grammar (as point masses: the engine's, `speculative._scored`)."""
    asked = replace(params, logprobs=True, top_logprobs=params.top_logprobs if params.logprobs else 0)
    external = list(draft.token_ids) if draft is not None and draft.token_ids else None
    reproducible = engine.draft is not None and engine.draft.dtype == torch.float32
    untruncated = params.top_k == 0 and params.top_p >= 1
    from_draft = (
        external is not None
        and drafted_by == Mode.DRAFT.value
        and mode is Mode.SPECULATIVE
        and reproducible
        and untruncated
    )
    return engine.make_request(
        prompt,
        asked,
        mode,
        external_draft=external,
        external_draft_from_draft=from_draft,
        constraint=constraint,
    )


def constraint_schema(constraint: Constraint) -> Any:
    """The JSON Schema a constrained answer is checked against (None: a regex or grammar, which
    its matcher's completeness alone judges)."""
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        return json.loads(constraint.text)
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return {"type": "object"}
    return None


def check_constrained(
    route: Route, tiers: list[str], constraint: Constraint, tools: tuple[Tool, ...]
) -> None:
    """What a constrained routed request cannot be, refused by the constraint's field: one that
    offers tools (a tool call is not output under the constraint), and a regex or grammar for a
    cascade with an endpoint tier (OpenAI's API takes JSON schemas only)."""
    if tools:
        raise InvalidRequestError(
            constraint.field, "a constrained answer cannot make tool calls; give tools or a constraint"
        )
    if constraint.kind in (ConstraintKind.REGEX, ConstraintKind.GRAMMAR):
        endpoint = next((t for t in tiers if t not in LOCAL_MODES), None)
        if endpoint is not None:
            raise InvalidRequestError(
                constraint.field,
                f"route {route.name!r} has the endpoint tier {endpoint!r}, which cannot be sent a "
                f"{constraint.kind.value} (only a JSON schema or JSON object); use a route of local tiers",
            )


def response_format(constraint: Constraint) -> dict[str, Any]:
    """The constraint as OpenAI's response_format, for an endpoint tier."""
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return {"type": "json_object"}
    schema = {"name": "response", "schema": json.loads(constraint.text)}
    return {"type": "json_schema", "json_schema": schema}


def tier_params(params: SamplingParams, index: int) -> SamplingParams:
    """The settings of the cascade's tier `index`: the client's, with a seed of the tier's own
    derived from the client's (a seeded route still reproduces). Were every tier to draw from one
    seed, a later tier's draft model would redraw the very numbers that made the answer it verifies."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index * 0x9E3779B97F4A7C15) % 2**63)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
