"""Protobuf <-> core types, at the edge: the core never sees a proto.

`request_from_proto` checks what only the wire format can get wrong (which prompt field is set,
enum values, message roles, sizes) and builds a Request; the engine's own validation (ranges,
vocabulary, context) runs after it, so every bad field gets INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from specdec.chat import check_message_count
from specdec.engine import Engine
from specdec.errors import InvalidRequestError
from specdec.grammar import Constraint, ConstraintKind
from specdec.request import (
    ConstraintOutcome,
    FinishReason,
    GenerationResult,
    Mode,
    Request,
    RequestOutput,
    SpecStats,
    Timing,
    TokenLogprob,
)
from specdec.router.router import Override, answering_spend
from specdec.router.tools import call_block, parse_tools
from specdec.router.validators import SchemaCache
from specdec.sampling import SamplingParams
from specdec.server.routed import RoutedFields
from specdec.v1 import specdec_pb2 as pb
from specdec.validation import check_prompt_chars

MAX_REQUEST_ID_CHARS = 256
ROLES = ("system", "user", "assistant", "tool")
DEFAULTS = SamplingParams()

_MODES = {
    pb.MODE_UNSPECIFIED: None,
    pb.MODE_SPECULATIVE: Mode.SPECULATIVE,
    pb.MODE_TARGET: Mode.TARGET,
    pb.MODE_DRAFT: Mode.DRAFT,
}
_MODE_TO_PB = {Mode.SPECULATIVE: pb.MODE_SPECULATIVE, Mode.TARGET: pb.MODE_TARGET, Mode.DRAFT: pb.MODE_DRAFT}
_FINISH_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}


def check_text_fits(engine: Engine, msg: pb.GenerateRequest) -> None:
    """Refuse prompt text (or chat content) that cannot fit the context, without tokenizing it.
    `Engine.encode` and `Engine.render_chat` check the same; this lets the server do it before
    handing the request to a worker thread."""
    check_prompt_chars(len(msg.prompt), engine.limits, "prompt")
    check_prompt_chars(sum(len(m.content) for m in msg.messages), engine.limits, "messages")


def prompt_ids(engine: Engine, msg: pb.GenerateRequest) -> list[int]:
    """Token ids of whichever prompt field is set (exactly one must be)."""
    given = [name for name, present in (
        ("prompt", bool(msg.prompt)),
        ("prompt_token_ids", len(msg.prompt_token_ids) > 0),
        ("messages", len(msg.messages) > 0),
    ) if present]  # fmt: skip
    if not given:
        raise InvalidRequestError(
            "prompt",
            "give exactly one of prompt, prompt_token_ids or messages (none was set, or it was empty)",
        )
    if len(given) > 1:
        raise InvalidRequestError(
            given[1], f"give exactly one of prompt, prompt_token_ids or messages (got {' and '.join(given)})"
        )
    if msg.prompt:
        return engine.encode(msg.prompt)  # refuses text that cannot fit before tokenizing it
    if msg.messages:
        return engine.render_chat(chat_messages(msg))
    return list(msg.prompt_token_ids)


def request_from_proto(engine: Engine, msg: pb.GenerateRequest, ids: list[int]) -> Request:
    if msg.mode not in _MODES:
        raise InvalidRequestError("mode", f"unknown value {msg.mode}; one of {', '.join(pb.Mode.keys())}")
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    temperature = msg.temperature if msg.HasField("temperature") else DEFAULTS.temperature
    top_p = msg.top_p if msg.HasField("top_p") else DEFAULTS.top_p
    if math.isnan(temperature):
        raise InvalidRequestError("temperature", "must be a finite number >= 0 (0 = greedy), got NaN")
    if math.isnan(top_p):
        raise InvalidRequestError("top_p", "must be in (0, 1], got NaN")
    if msg.HasField("seed") and msg.seed > 2**63 - 1:
        raise InvalidRequestError("seed", f"must be in [0, 2**63 - 1], got {msg.seed}")
    if msg.top_logprobs and not msg.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs = true")
    if msg.num_speculative_tokens < 0:
        raise InvalidRequestError(
            "num_speculative_tokens", f"must be >= 0 (0 = adaptive), got {msg.num_speculative_tokens}"
        )
    params = SamplingParams(
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else DEFAULTS.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=msg.top_k if msg.HasField("top_k") else DEFAULTS.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )
    return Request(
        prompt_ids=ids,
        params=params,
        mode=_MODES[msg.mode],
        num_speculative_tokens=msg.num_speculative_tokens,
        request_id=msg.request_id,
        constraint=constraint_from_proto(msg),
    )


def chat_messages(msg: pb.GenerateRequest) -> list[dict[str, str]]:
    """The request's messages as a local model reads them, their count and roles checked."""
    return conversation(msg)[0]


def conversation(msg: pb.GenerateRequest) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The request's messages as a local model reads them - an assistant's earlier tool calls
    written into its content in the call format (`router.tools`) - and as an OpenAI endpoint is
    sent them (`tool_calls` and `tool_call_id` in OpenAI's shape)."""
    check_message_count(len(msg.messages))
    local, sent = [], []
    for i, m in enumerate(msg.messages):
        if m.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role", f"unknown role {m.role!r}; one of {', '.join(ROLES)}"
            )
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        endpoint: dict[str, Any] = dict(message)
        if m.tool_call_id:
            message["tool_call_id"] = endpoint["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequestError(
                    f"messages[{i}].tool_calls", "only an assistant message makes tool calls"
                )
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.arguments) if call.arguments else {}
                except (ValueError, RecursionError):
                    raise InvalidRequestError(
                        f"messages[{i}].tool_calls[{j}].arguments", "not valid JSON"
                    ) from None
                message["content"] += call_block(call.name, arguments)
                calls.append({"id": call.id or f"call_{i}_{j}", "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments or "{}"}})  # fmt: skip
            endpoint["tool_calls"] = calls
        local.append(message)
        sent.append(endpoint)
    return local, sent


def is_routed(msg: pb.GenerateRequest) -> bool:
    """Whether the router answers: a route, or a field only the router reads (refused without one).
    A json_schema with constrain is the engine's (a constraint), unless a route is given too."""
    schema_for_router = bool(msg.json_schema) and not msg.constrain
    return bool(msg.route or schema_for_router or msg.tools or msg.HasField("route_override"))


def constraint_from_proto(msg: pb.GenerateRequest) -> Constraint | None:
    """The request's constraint (at most one kind), or None."""
    if msg.constrain and not msg.json_schema:
        raise InvalidRequestError("constrain", "needs a json_schema to constrain the output to")
    given = [(name, c) for name, present, c in (
        ("json_schema", msg.constrain, Constraint(ConstraintKind.JSON_SCHEMA, msg.json_schema)),
        ("json_object", msg.json_object, Constraint(ConstraintKind.JSON_OBJECT)),
        ("regex", bool(msg.regex), Constraint(ConstraintKind.REGEX, msg.regex)),
        ("grammar", bool(msg.grammar), Constraint(ConstraintKind.GRAMMAR, msg.grammar)),
    ) if present]  # fmt: skip
    if len(given) > 1:
        raise InvalidRequestError(
            given[1][0], f"give at most one constraint (got {' and '.join(n for n, _ in given)})"
        )
    return given[0][1] if given else None


def routed_fields(msg: pb.GenerateRequest, schemas: SchemaCache) -> RoutedFields:
    """A routed request's own fields, checked: a route serves chats and chooses its tiers' modes
    itself; a schema, tools and an override need a route."""
    if not msg.route:
        given = next(name for name, present in (
            ("json_schema", bool(msg.json_schema)), ("tools", bool(msg.tools)),
            ("route_override", msg.HasField("route_override")),
        ) if present)  # fmt: skip
        raise InvalidRequestError(given, "needs a route: only the router reads it")
    if not msg.messages or msg.prompt or msg.prompt_token_ids:
        raise InvalidRequestError(
            "messages", "a routed request is a chat: give messages (not prompt or prompt_token_ids)"
        )
    if msg.mode != pb.MODE_UNSPECIFIED or msg.num_speculative_tokens:
        field = "mode" if msg.mode != pb.MODE_UNSPECIFIED else "num_speculative_tokens"
        raise InvalidRequestError(field, "a route chooses its tiers' modes; leave it unset")
    schema = None
    if msg.json_schema:
        try:
            schema = json.loads(msg.json_schema)
        except (ValueError, RecursionError) as e:
            raise InvalidRequestError("json_schema", f"not valid JSON ({e})") from None
    tools = parse_tools([(t.name, t.description, t.parameters) for t in msg.tools], schemas)
    override = Override()
    if msg.HasField("route_override"):
        o = msg.route_override
        override = Override(o.tier or None, o.confidence_below if o.HasField("confidence_below") else None)
    local, sent = conversation(msg)
    return RoutedFields(msg.route, local, schema, tools, override, sent, constraint_from_proto(msg))


_ENDPOINT_FINISH = {"stop": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH}


def routed_response(tokenizer: Any, routed: Any, msg: pb.GenerateRequest) -> pb.GenerateResponse:
    """A routed answer (router.RoutedResult) with its route record; logprobs only if asked."""
    record = routed.record
    out = pb.GenerateResponse(text=routed.text, token_ids=routed.token_ids, request_id=msg.request_id)
    out.tool_calls.extend(
        pb.ToolCall(name=c.name, arguments=c.arguments, valid=c.valid, error=c.error or "")
        for c in routed.tool_calls
    )
    result = routed.result
    if result is not None:  # a local tier's
        out.mode = _MODE_TO_PB[Mode(record.tier)]
        _set_totals(out, result)
        if msg.logprobs:
            out.logprobs.extend(_logprobs(tokenizer, result.logprobs))
    else:
        spent = answering_spend(record)
        out.finish_reason = _ENDPOINT_FINISH.get(routed.finish_reason, pb.FINISH_REASON_STOP)
        out.usage.CopyFrom(
            pb.Usage(prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens)
        )
    out.route.CopyFrom(
        pb.RouteRecord(
            route=record.route,
            tier=record.tier,
            escalated=record.escalated,
            reasons=list(record.reasons),
            fallback=record.fallback,
            overridden=record.overridden,
            spent=[
                pb.TierSpend(
                    tier=s.tier,
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    draft_tokens_reused=s.draft_tokens_reused,
                    error=s.error or "",
                )
                for s in record.spent
            ],
        )
    )
    for name in ("confidence", "calibrated_confidence", "schema_valid", "tool_calls_valid"):
        if getattr(record, name) is not None:
            setattr(out.route, name, getattr(record, name))
    if routed.constraint is not None:  # a local tier's is its result's; an endpoint's, the check's
        out.constraint.CopyFrom(_constraint(routed.constraint))
    return out


def _timing(timing: Timing) -> pb.Timing:
    return pb.Timing(
        queue_seconds=timing.queue_seconds,
        time_to_first_token_seconds=timing.time_to_first_token_seconds,
        total_seconds=timing.total_seconds,
    )


def _stats(stats: SpecStats | None) -> pb.SpecStats:
    stats = stats or SpecStats()
    return pb.SpecStats(
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        mean_accepted_length=stats.mean_accepted_length,
        verify_steps=stats.verify_steps,
        accepted_by_position=stats.accepted_by_position,
    )


def _logprobs(tokenizer: Any, items: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    out = []
    for lp in items:
        out.append(
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                token=tokenizer.convert_ids_to_tokens(lp.token_id) or "",
                top=[
                    pb.TopLogprob(token_id=i, logprob=v, token=tokenizer.convert_ids_to_tokens(i) or "")
                    for i, v in lp.top
                ],
            )
        )
    return out


def response_from_output(tokenizer: Any, out: RequestOutput) -> pb.GenerateResponse:
    """One streamed message: the new tokens and text; the last also carries the totals."""
    msg = pb.GenerateResponse(
        text=out.new_text,
        token_ids=out.new_token_ids,
        logprobs=_logprobs(tokenizer, out.new_logprobs),
        request_id=out.request_id,
        mode=_MODE_TO_PB.get(out.mode, pb.MODE_UNSPECIFIED),
    )
    if out.finished:
        _set_totals(msg, out)
    return msg


def merged_response(tokenizer: Any, outputs: list[RequestOutput]) -> pb.GenerateResponse:
    """The unary response: every output concatenated, totals from the last."""
    last = outputs[-1]
    msg = pb.GenerateResponse(
        text="".join(o.new_text for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        logprobs=_logprobs(tokenizer, [lp for o in outputs for lp in o.new_logprobs]),
        request_id=last.request_id,
        mode=_MODE_TO_PB.get(last.mode, pb.MODE_UNSPECIFIED),
    )
    _set_totals(msg, last)
    return msg


def _set_totals(msg: pb.GenerateResponse, out: RequestOutput | GenerationResult) -> None:
    """The last message's finish reason, usage, stats, timing and seed (a stream's last output, or
    a whole result)."""
    msg.finish_reason = _FINISH_TO_PB.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    msg.usage.CopyFrom(pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens))
    msg.stats.CopyFrom(_stats(out.stats))
    if out.timing is not None:
        msg.timing.CopyFrom(_timing(out.timing))
    if out.seed is not None:
        msg.seed = out.seed
    if out.constraint is not None:
        msg.constraint.CopyFrom(_constraint(out.constraint))


def _constraint(outcome: ConstraintOutcome) -> pb.ConstraintResult:
    return pb.ConstraintResult(complete=outcome.complete, unenforced=list(outcome.unenforced))


def model_info(engine: Engine) -> pb.GetModelInfoResponse:
    def info(lm: Any) -> pb.ModelInfo:
        cfg = lm.config
        return pb.ModelInfo(
            name=lm.name,  # the checkpoint's name; never the server's directory layout
            architecture=cfg.model_type,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            num_parameters=sum(p.numel() for p in lm.model.parameters()),
            dtype=str(lm.dtype).removeprefix("torch."),
            device=str(lm.device),
        )

    config = engine.config
    response = pb.GetModelInfoResponse(
        target=info(engine.target),
        tokenizer_vocab_size=engine.vocab_size,
        max_context=engine.max_context,
        max_batch_size=config.max_batch_size,
        max_queue=config.max_queue,
        max_gamma=config.max_gamma,
        modes=[pb.MODE_TARGET]
        + ([pb.MODE_SPECULATIVE] if engine.limits.has_draft else [])
        + ([pb.MODE_DRAFT] if engine.limits.draft_answers else []),
        version=__import__("specdec").__version__,
    )
    if engine.draft is not None:
        response.draft.CopyFrom(info(engine.draft))
    return response
