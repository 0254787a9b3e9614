"""The OpenAI HTTP API's JSON bodies <-> specdec's core types: the HTTP twin of `convert`.

`parse_completion` and `parse_chat` check everything only the wire format can get wrong - each
field's type, which fields exist, the standard fields specdec does not implement - and return a
`ParsedRequest`; the engine's own validation (`specdec.validation`: ranges, vocabulary, context)
runs after it on the Requests built from it, and its field names are translated back to the ones
this client sent (`wire_field`). The response builders write the standard objects of
https://platform.openai.com/docs/api-reference (completions, chat completions and their stream
chunks); specdec's own figures (mode, speculative stats, seed, timing) ride in one extra key,
`specdec`, which stock clients keep as an extra attribute and otherwise ignore.

Fields, in brief (docs/API.md has the whole table):
- implemented: model, prompt / messages, max_tokens / max_completion_tokens, temperature, top_p,
  seed, stop, n, logprobs / top_logprobs, stream / stream_options.include_usage, user, prediction
  (OpenAI's Predicted Outputs: the predicted text is verified as an external draft, which is what
  speculative decoding is for); vLLM's extras top_k, ignore_eos, stop_token_ids; specdec's own
  mode and num_speculative_tokens.
- tools (function tools; tool_choice auto or none): the model is asked for the call format of
  `specdec.router.tools`, and the calls in its answer come back as `message.tool_calls` (finish
  reason `tool_calls`), each checked against its parameters in `specdec.choices[i].tool_calls`.
  An assistant message's tool_calls (a conversation's history) are written back in that format.
- specdec's router (chat only; docs/ROUTING.md): route, json_schema (a JSON Schema object), and
  route_override {tier, confidence_below}; the route record rides in `specdec.choices[0].route`.
- response_format (chat and completions): json_object or json_schema constrain decoding to it
  (specdec.grammar; with a route, every tier under it); `specdec.choices[i].constraint` says {complete,
  unenforced}, streamed (on the finishing chunk) or not.
- accepted only at their no-op values (stock clients send them): frequency_penalty, presence_penalty
  0; logit_bias null or {}; best_of 1; echo false; suffix null; and
  the like (`_NO_OP`). Any other value is refused naming the field, never ignored.
- anything else: refused as an unknown field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from specdec.chat import check_message_count
from specdec.errors import InvalidRequestError
from specdec.grammar import Constraint, ConstraintKind
from specdec.request import FinishReason, Mode, RequestOutput, SpecStats, TokenLogprob
from specdec.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from specdec.tokenization import TokenPieces

MAX_CHOICES = 16  # prompts x n per HTTP request: each choice is a row of its own
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_USER_CHARS = 256
CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


class ModelNotFoundError(InvalidRequestError):
    """`model` names nothing this server serves (HTTP 404)."""


# ------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ServedModels:
    """What a client may name in `model`: the served name (the default mode: speculative with a
    draft, else the target alone) and `NAME:MODE` for each mode the engine can run."""

    name: str
    modes: tuple[Mode, ...]
    default: Mode

    @staticmethod
    def of(engine: Any, name: str | None = None) -> ServedModels:
        limits = engine.limits
        modes = (Mode.TARGET,) + ((Mode.SPECULATIVE,) if limits.has_draft else ())
        modes += (Mode.DRAFT,) if limits.draft_answers else ()
        return ServedModels(name or engine.target.name, modes, limits.default_mode)

    def ids(self) -> list[str]:
        return [self.name] + [f"{self.name}:{m.value}" for m in self.modes]

    def mode_of(self, model: str) -> Mode:
        if model == self.name:
            return self.default
        for mode in self.modes:
            if model == f"{self.name}:{mode.value}":
                return mode
        raise ModelNotFoundError(
            "model", f"the model {model!r} does not exist here; this server serves {', '.join(self.ids())}"
        )

    def listing(self, created: int) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "specdec"} for i in self.ids()
            ],
        }


# ------------------------------------------------------------------------------------ requests


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    mode: Mode
    prompts: list[str | list[int]]  # completions: one entry per prompt; chat: empty
    messages: list[dict[str, str]]  # chat: the conversation; completions: empty
    params: SamplingParams  # max_new_tokens is 0 when the client gave none (see `max_tokens_for`)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; else alternatives per token (0 = only the chosen one)
    num_speculative_tokens: int = 0
    prediction: str | None = None
    user: str = ""
    tools: list[tuple[str, str, str]] = field(default_factory=list)  # (name, description, parameters JSON)
    # The conversation as an endpoint tier is sent it: assistant tool_calls kept as OpenAI's
    # (`messages` has them written into the content, as a local model reads them).
    endpoint_messages: list[dict[str, Any]] = field(default_factory=list)
    route: str = ""  # the router answers (chat only)
    json_schema: Any = None  # with route: parsed (None: none given)
    constraint: Constraint | None = None  # response_format json_object / json_schema
    override: tuple[str | None, float | None] = (None, None)  # with route: (tier, confidence_below)
    # Core field name -> the name this client used (for errors raised by the core's validation).
    names: dict[str, str] = field(default_factory=dict)

    def max_tokens_for(self, prompt_tokens: int, max_context: int) -> int:
        """The client's max tokens, or the endpoint's default: 16 for completions (OpenAI's),
        whatever room the context leaves for chat (vLLM's); either capped by that room."""
        if self.params.max_new_tokens:
            return self.params.max_new_tokens
        room = max(1, max_context - prompt_tokens)
        return room if self.chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)

    def wire_field(self, error: InvalidRequestError) -> InvalidRequestError:
        """The core's error, naming the field as this client sent it."""
        base = error.field.split("[")[0].split(".")[0]
        name = self.names.get(base)
        if name is None or name == base:  # already the client's name (an index like prompt[1] stays)
            return error
        message = str(error).removeprefix(f"{error.field}: ")
        return InvalidRequestError(name, message.replace(error.field, name))


# Standard fields specdec does not implement, and the values at which they change nothing.
_NO_OP_COMMON: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    # vLLM's sampling extras, at their defaults (clients written for vLLM send them).
    "min_tokens": (None, 0),
    "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False),
    "priority": (None, 0),
}
_NO_OP_COMPLETIONS = {**_NO_OP_COMMON, "best_of": (None, 1), "echo": (None, False), "suffix": (None, "")}
_NO_OP_CHAT = {
    **_NO_OP_COMMON,
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    # vLLM's chat extras at their defaults.
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "echo": (None, False),
    "chat_template_kwargs": (None, {}),
}
# Why a refused no-op field is refused (what specdec would need to honour it).
_NOT_YET = {
    "functions": "function calling is not implemented yet",
    "function_call": "function calling is not implemented yet",
    "echo": "echoing the prompt is not implemented",
    "best_of": "best_of is not implemented; use n",
    "suffix": "insertion (suffix) is not implemented",
}
# Fields of chat completions that a completion cannot take, and why.
_CHAT_ONLY = {
    "route": "only on /v1/chat/completions: a route serves chats (docs/ROUTING.md)",
    "json_schema": "only on /v1/chat/completions, with a route",
    "route_override": "only on /v1/chat/completions, with a route",
    "tools": "only on /v1/chat/completions",
    "tool_choice": "only on /v1/chat/completions",
}
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
    "user", "logprobs", "top_k", "ignore_eos", "stop_token_ids", "mode", "num_speculative_tokens",
    "response_format",
}  # fmt: skip
_COMPLETIONS = _COMMON | {"prompt"}
_CHAT = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "prediction", "tools", "tool_choice",
    "route", "json_schema", "route_override",
}  # fmt: skip


def parse_completion(body: Any, models: ServedModels) -> ParsedRequest:
    """A /v1/completions body, checked (InvalidRequestError naming the field)."""
    body = _object(body)
    _check_fields(body, _COMPLETIONS, _NO_OP_COMPLETIONS)
    prompts = _prompts(body.get("prompt"))
    parsed = _common(body, models, chat=False, prompts=prompts, messages=[])
    logprobs = body.get("logprobs")
    if logprobs is not None:
        parsed.logprobs = _int(logprobs, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return _finish(parsed, body, max_tokens_name="max_tokens")


def parse_chat(body: Any, models: ServedModels) -> ParsedRequest:
    """A /v1/chat/completions body, checked (InvalidRequestError naming the field)."""
    body = _object(body)
    _check_fields(body, _CHAT, _NO_OP_CHAT)
    messages, endpoint_messages = _messages(body.get("messages"))
    parsed = _common(body, models, chat=True, prompts=[], messages=messages)
    parsed.endpoint_messages = endpoint_messages
    want = body.get("logprobs")
    top = body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise InvalidRequestError("logprobs", f"must be a boolean on chat completions, got {want!r}")
    if top is not None:
        top = _int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not want:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    if want:
        parsed.logprobs = top or 0
    prediction = body.get("prediction")
    if prediction is not None:
        parsed.prediction = _prediction(prediction)
    both = body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None
    if both and body["max_tokens"] != body["max_completion_tokens"]:
        raise InvalidRequestError(
            "max_completion_tokens", "give max_completion_tokens or max_tokens (its old name), not both"
        )
    parsed.tools = _tools(body.get("tools"), body.get("tool_choice"))
    if parsed.tools and parsed.stream and not body.get("route"):
        raise InvalidRequestError("stream", "tool calls are not streamed yet; use stream: false with tools")
    _route_fields(parsed, body, models)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _finish(parsed, body, max_tokens_name=name)


def _tools(value: Any, choice: Any) -> list[tuple[str, str, str]]:
    """OpenAI's function tools as (name, description, parameters as JSON text); their contents
    are checked by `router.tools.parse_tools`. tool_choice: auto (the default with tools) or none
    (the tools are not offered)."""
    if choice not in (None, "auto", "none"):
        raise InvalidRequestError(
            "tool_choice",
            "auto or none; forcing a call (required, or a named function) needs constrained decoding, "
            "not implemented yet",
        )
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError("tools", "a list of function tools")
    out = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise InvalidRequestError(
                where, '{"type": "function", "function": {"name": ..., "parameters": ...}}'
            )
        function = tool["function"]
        unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise InvalidRequestError(f"{where}.function.{unknown[0]}", "unknown function field")
        name, description = function.get("name"), function.get("description", "")
        if not isinstance(name, str):
            raise InvalidRequestError(f"{where}.function.name", "required, a string")
        if not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters")
        out.append((name, description, "" if parameters is None else json.dumps(parameters)))
    return [] if choice == "none" else out


def _route_fields(parsed: ParsedRequest, body: dict[str, Any], models: ServedModels) -> None:
    """specdec's router fields: a route, and the fields only a route reads."""
    route = body.get("route")
    rest = [k for k in ("json_schema", "route_override") if body.get(k) is not None]
    if route is None:
        if rest:
            raise InvalidRequestError(rest[0], "needs a route: only the router reads it")
        return
    if not isinstance(route, str) or not route:
        raise InvalidRequestError("route", "a route name of the server's --routes file")
    if body.get("mode") is not None or parsed.model != models.name:
        field = "mode" if body.get("mode") is not None else "model"
        raise InvalidRequestError(
            field, f"a route chooses its tiers' modes: use model {models.name!r} and leave mode unset"
        )
    for name, given in (
        ("num_speculative_tokens", bool(parsed.num_speculative_tokens)),
        ("n", parsed.n != 1),
        ("prediction", parsed.prediction is not None),
    ):
        if given:
            raise InvalidRequestError(name, "a route chooses its tiers and answers once; leave it unset")
    parsed.route = route
    if body.get("json_schema") is not None:
        parsed.json_schema = body["json_schema"]
    override = body.get("route_override")
    if override is not None:
        if not isinstance(override, dict) or set(override) - {"tier", "confidence_below"}:
            raise InvalidRequestError("route_override", "an object with tier and/or confidence_below")
        tier, threshold = override.get("tier"), override.get("confidence_below")
        if tier is not None and (not isinstance(tier, str) or not tier):
            raise InvalidRequestError("route_override.tier", "a tier of the route's cascade")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise InvalidRequestError("route_override.confidence_below", "a number in [0, 1]")
        parsed.override = (tier, None if threshold is None else float(threshold))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    return body


def _check_fields(body: dict[str, Any], known: set[str], no_op: dict[str, tuple[Any, ...]]) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name in _CHAT_ONLY:
            raise InvalidRequestError(name, _CHAT_ONLY[name])
        if name in no_op:
            if any(_same_value(value, allowed) for allowed in no_op[name]):
                continue
            why = _NOT_YET.get(name, "specdec does not implement it")
            raise InvalidRequestError(
                name, f"{why}: accepted only as {_no_op_values(no_op[name])}, got {json.dumps(value)[:200]}"
            )
        raise InvalidRequestError(name, "unknown field (specdec refuses fields it would otherwise ignore)")


def _same_value(value: Any, allowed: Any) -> bool:
    """value == allowed with JSON's types: true is not 1, 0 is 0.0."""
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return type(value) is type(allowed) and value == allowed
    numeric = (int, float)
    if isinstance(value, numeric) or isinstance(allowed, numeric):
        return isinstance(value, numeric) and isinstance(allowed, numeric) and value == allowed
    return type(value) is type(allowed) and value == allowed


def _no_op_values(values: tuple[Any, ...]) -> str:
    """The accepted values as a client writes them: `0 (or null)`, `"none" or "auto" (or null)`."""
    shown: list[str] = []
    for v in values:
        text = json.dumps(int(v) if isinstance(v, float) and v.is_integer() else v)
        if v is not None and text not in shown:
            shown.append(text)
    if not shown:
        return "null"
    return " or ".join(shown) + (" (or null)" if None in values else "")


def _common(
    body: dict[str, Any], models: ServedModels, chat: bool, prompts: list, messages: list
) -> ParsedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", f"required: one of {', '.join(models.ids())}")
    mode = models.mode_of(model)
    explicit = body.get("mode")
    if explicit is not None:
        try:
            asked = Mode(explicit)
        except ValueError:
            raise InvalidRequestError(
                "mode", f"unknown mode {explicit!r}; one of {', '.join(m.value for m in Mode)}"
            ) from None
        if model != models.name and asked is not mode:
            raise InvalidRequestError("mode", f"{asked.value} contradicts the model {model!r}")
        mode = asked
    stream = _bool(body.get("stream"), "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise InvalidRequestError("stream_options", "only with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise InvalidRequestError("stream_options", "an object with include_usage (a boolean)")
        include_usage = _bool(options.get("include_usage"), "stream_options.include_usage")
        if options.get("continuous_usage_stats"):
            raise InvalidRequestError("stream_options.continuous_usage_stats", "not implemented; only false")
    n = _int(body["n"], "n", 1, MAX_CHOICES) if body.get("n") is not None else 1
    choices = n * max(1, len(prompts))
    if choices > MAX_CHOICES:
        raise InvalidRequestError(
            "n", f"prompts x n must be at most {MAX_CHOICES} per request, got {len(prompts)} x {n}"
        )
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise InvalidRequestError("user", f"a string of at most {MAX_USER_CHARS} characters")
    seed = body.get("seed")
    if seed is not None:
        seed = _int(seed, "seed", 0, MAX_SEED)
    params = SamplingParams(
        max_new_tokens=0,
        temperature=_number(body, "temperature", 1.0),  # OpenAI's default: sampling
        top_p=_number(body, "top_p", 1.0),
        top_k=_top_k(body.get("top_k")),
        seed=seed,
        stop=_stops(body.get("stop")),
        stop_token_ids=tuple(_int_list(body.get("stop_token_ids"), "stop_token_ids")),
        ignore_eos=_bool(body.get("ignore_eos"), "ignore_eos"),
    )
    gamma = body.get("num_speculative_tokens")
    return ParsedRequest(
        chat=chat,
        model=model,
        mode=mode,
        prompts=prompts,
        messages=messages,
        params=params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        num_speculative_tokens=_int(gamma, "num_speculative_tokens", 0, None) if gamma is not None else 0,
        user=user or "",
        constraint=_response_format(body.get("response_format")),
    )


def _response_format(value: Any) -> Constraint | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with
    {name, description?, schema?, strict?} - constrained decoding either way (strict or not: the
    grammar is the schema's, and every output matches it)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError(
            "response_format",
            '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}',
        )
    kind = value["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(value) - allowed)
    if extra:
        raise InvalidRequestError(f"response_format.{extra[0]}", f"unknown field for type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError("response_format.json_schema", "an object with name and schema")
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:
        raise InvalidRequestError(f"response_format.json_schema.{unknown[0]}", "unknown field")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidRequestError("response_format.json_schema.name", "required, a non-empty string")
    schema = spec.get("schema", {})  # OpenAI: without a schema, any JSON value
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError("response_format.json_schema.schema", "a JSON Schema (an object)")
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


def _finish(parsed: ParsedRequest, body: dict[str, Any], max_tokens_name: str) -> ParsedRequest:
    value = body.get(max_tokens_name)
    max_tokens = _int(value, max_tokens_name, 1, None) if value is not None else 0
    logprobs = parsed.logprobs
    parsed.params = dataclasses.replace(
        parsed.params, max_new_tokens=max_tokens, logprobs=logprobs is not None, top_logprobs=logprobs or 0
    )
    parsed.names = {
        "max_new_tokens": max_tokens_name,
        "prompt_token_ids": "messages" if parsed.chat else "prompt",
        "prompt": "messages" if parsed.chat else "prompt",
        "top_logprobs": "top_logprobs" if parsed.chat else "logprobs",
        "external_draft": "prediction",
    }
    if parsed.constraint is not None:  # a constraint that cannot compile: the client's field
        parsed.names.update(json_schema="response_format.json_schema.schema", json_object="response_format")
    return parsed


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequestError(name, f"must be a finite number, got {json.dumps(value)[:100]}")
    return number


def _int(value: Any, name: str, lo: int, hi: int | None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer, got {json.dumps(value)[:100]}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidRequestError(name, f"must be {bounds}, got {value}")
    return value


def _top_k(value: Any) -> int:
    """vLLM's top_k: -1 (its "off", which clients written for it send) or None is 0, specdec's off."""
    if value is None or value == -1:
        return 0
    return _int(value, "top_k", 0, None)


def _bool(value: Any, name: str) -> bool:
    """A boolean field; null (which some SDKs send for every unset field) is false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"must be true or false, got {json.dumps(value)[:100]}")
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError(name, "must be a list of integers")
    return [_int(v, f"{name}[{i}]", 0, None) for i, v in enumerate(value)]


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequestError("stop", "must be a string or a list of strings")
    return tuple(value)


def _prompts(value: Any) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, list) for v in value):
            return [_int_list(v, f"prompt[{i}]") for i, v in enumerate(value)]
    raise InvalidRequestError(
        "prompt", "required: a string, a list of strings, a list of token ids or a list of token-id lists"
    )


def _messages(value: Any) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The conversation as a local model reads it, and as an OpenAI endpoint is sent it."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages", "required: a non-empty list of {role, content} objects")
    check_message_count(len(value))
    out, endpoint = [], []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(where, "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"{where}.role", f"unknown role {role!r}; one of {', '.join(CHAT_ROLES)}"
            )
        message = {"role": CHAT_ROLES[role], "content": _content(m.get("content"), f"{where}.content")}
        sent: dict[str, Any] = dict(message)
        for key, v in m.items():
            if key in ("role", "content") or (key in _EMPTY_MESSAGE_FIELDS and not v):
                continue
            if key == "tool_calls" and role == "assistant":
                message["content"] += _written_calls(v, f"{where}.tool_calls")
                sent["tool_calls"] = v
                continue
            if key in _PASSED_MESSAGE_FIELDS and isinstance(v, str):
                message[key] = sent[key] = (
                    v  # for templates that use them (the rest ignore them, as vLLM's do)
                )
                continue
            raise InvalidRequestError(
                f"{where}.{key}", _MESSAGE_FIELD_PROBLEMS.get(key, "unknown message field")
            )
        out.append(message)
        endpoint.append(sent)
    return out, endpoint


# Message fields handed to the chat template as they are, fields accepted only when empty, and why
# the others are refused.
_PASSED_MESSAGE_FIELDS = ("name", "tool_call_id")
_EMPTY_MESSAGE_FIELDS = ("tool_calls", "function_call", "refusal", "audio")
_MESSAGE_FIELD_PROBLEMS = {
    "tool_calls": "only an assistant message makes tool calls",
    "function_call": "function calling is not implemented yet",
    "name": "must be a string",
    "tool_call_id": "must be a string",
}


def _written_calls(value: Any, where: str) -> str:
    """An assistant message's earlier tool calls, written back as the model was asked to write them
    (`router.tools`), so the conversation reads as it went."""
    from specdec.router.tools import call_block

    if not isinstance(value, list):
        raise InvalidRequestError(where, "a list of tool calls")
    blocks = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"{where}[{j}]", '{"type": "function", "function": {"name": ..., "arguments": ...}}'
            )
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except (ValueError, RecursionError):
            raise InvalidRequestError(f"{where}[{j}].function.arguments", "not valid JSON") from None
        blocks.append(call_block(function["name"], arguments))
    return "".join(blocks)


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of text parts (joined); other part types are refused."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(f"{where}[{j}]", f"only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(where, "must be a string or a list of text parts")


def _prediction(value: Any) -> str:
    if not isinstance(value, dict) or value.get("type") != "content":
        raise InvalidRequestError("prediction", 'must be {"type": "content", "content": ...}')
    return _content(value.get("content"), "prediction.content")


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index` of a seeded request samples with seed + index: n choices differ, and each
    is reproducible on its own."""
    return None if seed is None else (seed + index) % (MAX_SEED + 1)


# ------------------------------------------------------------------------------------ responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def finish_reason(reason: FinishReason | None) -> str | None:
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return "stop"
    if reason in (FinishReason.LENGTH, FinishReason.CONTEXT):
        return "length"
    return None


@dataclass
class Choice:
    """One choice's accumulated output (the unary response, or the totals at the end of a stream)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        if out.finished:
            self.last = out


def tool_field(error: InvalidRequestError) -> InvalidRequestError:
    """`router.tools`' error for a tool, naming the field as this wire format nests it
    (tools[0].name -> tools[0].function.name)."""
    head, dot, rest = error.field.partition("].")
    if not error.field.startswith("tools[") or not dot:
        return error
    name = f"{head}].function.{rest}"
    return InvalidRequestError(name, str(error).removeprefix(f"{error.field}: "))


def tool_message(text: str, calls: tuple[Any, ...]) -> tuple[dict[str, Any], str | None]:
    """The chat message of an answer that may call tools (its calls checked: router.tools), and
    the finish reason the calls set (None: they set none)."""
    from specdec.router.tools import without_calls

    # A block not in the asked form names no function: its verdict is in `specdec`, not a call.
    calls = tuple(c for c in calls if c.name)
    # A block not in the asked form names no function: its verdict is in `specdec`, not a call.
    calls = tuple(c for c in calls if c.name)
    if not calls:
        return {"role": "assistant", "content": text}, None
    tool_calls = [
        {"index": i, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]  # fmt: skip
    return {
        "role": "assistant",
        "content": without_calls(text) or None,
        "tool_calls": tool_calls,
    }, "tool_calls"


def checked_calls(calls: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Each call's verdict, for the `specdec` key (OpenAI's objects have no place for it)."""
    return [{"name": c.name, "valid": c.valid, "error": c.error} for c in calls]


def specdec_extra(index: int, out: RequestOutput) -> dict[str, Any]:
    """specdec's figures for one finished choice (the `specdec` key's entries)."""
    stats = out.stats or SpecStats()
    timing = out.timing
    return {
        "index": index,
        "mode": (out.mode or Mode.SPECULATIVE).value,
        "seed": out.seed,
        "stats": stats.as_dict(),
        "timing": None if timing is None else timing.as_dict(),
        "route": None,
        # A constrained choice: whether the output is a whole match, and the schema keywords the
        # grammar could not enforce (docs/STRUCTURED_OUTPUT.md); streamed or not.
        **({"constraint": out.constraint.as_dict()} if out.constraint is not None else {}),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    pieces: TokenPieces,
    logprobs: bool,
    calls: dict[int, tuple[Any, ...]] | None = None,
) -> dict[str, Any]:
    """A unary response: `chat.completion`, or the legacy `text_completion`. `calls`: each chat
    choice's tool calls, checked (the request offered tools)."""

    def one(c: Choice) -> dict[str, Any]:
        reason = finish_reason(c.last.finish_reason if c.last else None)
        if chat:
            lp = {"content": chat_logprobs(pieces, c.logprobs)} if logprobs else None
            message, by_calls = tool_message(c.text, (calls or {}).get(c.index, ()))
            return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": by_calls or reason}
        lp = completion_logprobs(pieces, c.logprobs, 0) if logprobs else None
        return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": reason}

    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [one(c) for c in choices],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
        "specdec": {"choices": [
            {**specdec_extra(c.index, c.last), **({"tool_calls": checked_calls(calls.get(c.index, ()))} if calls else {})}
            for c in choices if c.last
        ]},
    }  # fmt: skip


_ENDPOINT_REASONS = ("stop", "length", "tool_calls", "content_filter")


def routed_body(
    rid: str, created: int, model: str, routed: Any, response_id: str, pieces: TokenPieces, logprobs: bool
) -> dict[str, Any]:
    """A routed answer (router.RoutedResult) as a `chat.completion`: usage and figures are the
    answering tier's (every tier's spend is in the record), the route record - with the
    response id `Feedback` names - in `specdec.choices[0].route`."""
    result = routed.result  # the answering local tier's (None: an endpoint answered)
    record = {**dataclasses.asdict(routed.record), "response_id": response_id}
    if result is not None:
        reason = finish_reason(result.finish_reason)
        tokens = (result.prompt_tokens, result.completion_tokens)
        extra = {"index": 0, "mode": routed.record.tier, "seed": result.seed,
                 "stats": result.stats.as_dict(), "timing": result.timing.as_dict()}  # fmt: skip
        lp = {"content": chat_logprobs(pieces, result.logprobs)} if logprobs else None
    else:
        reason = routed.finish_reason if routed.finish_reason in _ENDPOINT_REASONS else "stop"
        from specdec.router.router import answering_spend

        spent = answering_spend(routed.record)
        tokens = (spent.prompt_tokens, spent.completion_tokens)
        extra = {"index": 0, "mode": None, "seed": None, "stats": None, "timing": None}
        lp = None
    message, by_calls = tool_message(routed.text, routed.tool_calls)
    extra["route"] = record
    if routed.constraint is not None:
        extra["constraint"] = routed.constraint.as_dict()
    if routed.record.tool_calls_valid is not None:
        extra["tool_calls"] = checked_calls(routed.tool_calls)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": by_calls or reason}],
        "usage": usage(*tokens),
        "specdec": {"choices": [extra]},
    }


def stream_chunk(
    chat: bool, rid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }


def now() -> int:
    return int(time.time())


# ------------------------------------------------------------------------------------ logprobs


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token the model rules out is reported as -9999.0 (vLLM's convention)."""
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(pieces: TokenPieces, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions object; `offset`: the characters of this choice's text before these
    tokens (text_offset counts from the start of the completion)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for lp in items:
        text = pieces.text(lp.token_id)
        tokens.append(text)
        logprobs.append(_finite(lp.logprob))
        top: dict[str, float] = {}
        for token_id, value in lp.top:
            top.setdefault(pieces.text(token_id), _finite(value))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(pieces: TokenPieces, items: list[TokenLogprob]) -> list[dict[str, Any]]:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        raw = pieces.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(value), "bytes": list(raw)}

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in items
    ]
