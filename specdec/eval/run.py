"""Running an eval set through every tier of a route, each tier alone, on the code path users hit:
the router with the tier forced (`Override(tier=...)`), in this process or on a running server over
gRPC (whose API key must be granted route:force). Each answer is scored and recorded with what the
route's rules read - its confidence by every method, schema verdict, tool calls - and what it cost.

Records go to a JSON Lines file as they come (`Recorder`), so a run that stops resumes where it was:
an (example, tier, variant) already recorded is not run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from specdec.errors import SpecdecError
from specdec.eval.data import Example
from specdec.eval.scorers import resolve, score
from specdec.router.confidence import DEFAULT_Q, METHODS, ConfidenceMethod
from specdec.router.router import Override, Router, answering_spend, facts_of
from specdec.router.routes import LOCAL_MODES, Route
from specdec.router.tools import Tool, ToolCall, parse_tools
from specdec.router.validators import SchemaCache
from specdec.sampling import SamplingParams


@dataclass(frozen=True)
class TierAnswer:
    """One tier's answer to one example, scored (a line of the records file)."""

    example: str  # the example's id
    tier: str
    variant: str  # the prompt variant's name ("" for the example's own prompt)
    text: str
    score: float
    confidence: dict[str, float] | None  # raw, by every method (None: an endpoint's answer)
    schema_valid: bool | None
    schema_error: str | None
    tool_calls: list[dict[str, Any]] | None  # [{name, valid, error}] (None: the example offers no tools)
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    asked: str = ""  # a digest of what was asked (messages, schema, tools): a changed example is rerun

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.example, self.tier, self.variant)


@dataclass(frozen=True)
class Variant:
    """A prompt template for the small tier: `{input}` is the example's last user message."""

    name: str
    template: str

    @staticmethod
    def load(path: str | Path) -> Variant:
        path = Path(path)
        template = path.read_text(encoding="utf-8")
        if "{input}" not in template:
            raise ValueError(
                f"{path}: a prompt variant must contain {{input}} (the example's last user message)"
            )
        return Variant(path.stem, template)

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise SpecdecError(
                f"prompt variant {self.name!r}: the example has no user message to put in {{input}}"
            )
        last = users[-1]
        out = [dict(m) for m in messages]
        out[last]["content"] = self.template.replace("{input}", messages[last]["content"])
        return out


def confidences(token_probs: torch.Tensor, q: float | None) -> dict[str, float]:
    """The answer's raw confidence by every method the router knows (quantile with the route's q)."""
    return {
        m: ConfidenceMethod.make(m, (q if q is not None else DEFAULT_Q) if m == "quantile" else None)(
            token_probs
        )
        for m in METHODS
    }


@dataclass
class Recorder:
    """The records file: read back on start (resume), appended as answers come. `settings` (what
    makes an answer: the route's tiers, the sampling settings, the variants) is kept beside it, and
    a directory that holds answers made otherwise is refused rather than mixed in."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    done: dict[tuple[str, str, str], TierAnswer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stamp = self.path.with_name("settings.json")
        if self.path.exists():
            recorded = json.loads(stamp.read_text()) if stamp.exists() else {"settings": "unrecorded"}
            if recorded != self.settings:
                changed = sorted(
                    k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k)
                )
                raise SpecdecError(
                    f"{self.path.parent}: holds answers made with other settings ({', '.join(changed)}); "
                    "give another --out, or remove it to start over"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        if self.path.exists():
            text = self.path.read_text()
            lines = text.splitlines()
            if lines and not text.endswith("\n"):
                lines.pop()  # a run stopped while writing its last answer: that one is run again
                self.path.write_text("".join(line + "\n" for line in lines))
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    answer = TierAnswer(**json.loads(line))
                except (ValueError, TypeError) as e:
                    raise SpecdecError(f"{self.path}: line {number}: not a recorded answer ({e})") from None
                self.done[answer.key] = answer

    def add(self, answer: TierAnswer) -> None:
        self.done[answer.key] = answer
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(answer)) + "\n")


@dataclass(frozen=True)
class TierReply:
    """What a backend returns of one tier's answer."""

    text: str
    token_probs: torch.Tensor | None  # raw probability of each emitted token (None: an endpoint's)
    tool_calls: tuple[ToolCall, ...]  # checked
    prompt_tokens: int
    completion_tokens: int


class LocalTiers:
    """Tiers answered in this process, by the router with each tier forced."""

    def __init__(self, router: Router):
        self.router = router

    def describe(self) -> str:
        """Which models answer (recorded answers of other models are not mixed in)."""
        engine = self.router.engine
        return f"in-process: {engine.target.name}" + (
            f" + {engine.draft.name}" if engine.draft is not None else ""
        )

    def answer(
        self, route: str, tier: str, messages: list[dict[str, str]], params: SamplingParams,
        json_schema: Any, tools: tuple[Tool, ...],
    ) -> TierReply:  # fmt: skip
        routed = self.router.generate(route, messages, params, json_schema, tools, Override(tier=tier))
        probs = None
        if routed.result is not None:
            probs = torch.tensor([lp.logprob for lp in routed.result.logprobs], dtype=torch.float64).exp()
        spent = answering_spend(routed.record)
        return TierReply(routed.text, probs, routed.tool_calls, spent.prompt_tokens, spent.completion_tokens)


class ServerTiers:
    """Tiers answered by a running specdec over gRPC: the same route, the tier forced through
    `route_override` - so the API key (`--api-key` / $SPECDEC_API_KEY) must be granted route:force."""

    def __init__(self, client: Any):
        self.client = client

    def describe(self) -> str:
        info = self.client.model_info()
        return f"server: {info.target.name}" + (f" + {info.draft.name}" if info.HasField("draft") else "")

    def answer(
        self, route: str, tier: str, messages: list[dict[str, str]], params: SamplingParams,
        json_schema: Any, tools: tuple[Tool, ...],
    ) -> TierReply:  # fmt: skip
        from specdec.v1 import specdec_pb2 as pb

        fields: dict[str, Any] = {
            "route": route, "route_override": pb.RouteOverride(tier=tier), "logprobs": True,
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
            "stop": list(params.stop), "ignore_eos": params.ignore_eos,
        }  # fmt: skip
        if json_schema is not None:
            fields["json_schema"] = json.dumps(json_schema)
        if tools:
            fields["tools"] = [
                pb.Tool(name=t.name, description=t.description,
                        parameters="" if t.parameters is True else json.dumps(t.parameters))
                for t in tools
            ]  # fmt: skip
        reply = self.client.generate(messages, **fields)
        probs = None
        if reply.route.tier in LOCAL_MODES:
            probs = torch.tensor([lp.logprob for lp in reply.logprobs], dtype=torch.float64).exp()
        calls = tuple(ToolCall(c.name, c.arguments, c.valid, c.error or None) for c in reply.tool_calls)
        return TierReply(reply.text, probs, calls, reply.usage.prompt_tokens, reply.usage.completion_tokens)


def _tool_triple(tool: Any) -> tuple[str, str, str]:
    function = tool["function"]
    return function["name"], function.get("description", ""), json.dumps(function.get("parameters", {}))


def _digest(example: Example) -> str:
    asked = json.dumps([example.messages, example.json_schema, example.tools], sort_keys=True)
    return hashlib.sha256(asked.encode()).hexdigest()[:16]


def run_eval(
    examples: list[Example],
    tiers: Iterable[str],
    backend: LocalTiers | ServerTiers,
    route: str,
    route_config: Route,
    params: SamplingParams,
    recorder: Recorder,
    default_scorer: str | None,
    variants: tuple[Variant, ...] = (),
    small_tier: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[TierAnswer]:
    """Every example through every tier (and the small tier under every variant), skipping what
    the recorder holds already. Returns every answer of this run's examples."""
    schemas = SchemaCache()
    rules_route = route_config
    jobs = [(t, "") for t in tiers] + [(small_tier, v.name) for v in variants if small_tier]
    by_name = {v.name: v for v in variants}
    for name in {default_scorer, *(e.scorer for e in examples)} - {None}:
        resolve(name)  # an unknown scorer stops the run before any model runs
    answers = []
    for example in examples:
        where = f"example {example.id!r} (line {example.line})"
        try:
            tools = parse_tools([_tool_triple(t) for t in example.tools], schemas)
            validator = None if example.json_schema is None else schemas.validator(example.json_schema)
        except (SpecdecError, KeyError, TypeError) as e:
            raise SpecdecError(f"{where}: {e}") from None
        asked = _digest(example)
        for tier, variant in jobs:
            key = (example.id, tier, variant)
            done = recorder.done.get(key)
            if done is None or done.asked != asked:
                started = time.perf_counter()
                try:
                    messages = by_name[variant].apply(example.messages) if variant else example.messages
                    reply = backend.answer(route, tier, messages, params, example.json_schema, tools)
                except SpecdecError as e:
                    raise SpecdecError(f"{where}, tier {tier}: {e}") from None
                seconds = time.perf_counter() - started
                # What the live rules would read of it, by the router's own function.
                facts = facts_of(
                    rules_route, reply.text, None, validator, reply.tool_calls if tools else None
                )
                calls = None
                if facts.tool_calls is not None:
                    calls = [{"name": c.name, "valid": c.valid, "error": c.error} for c in facts.tool_calls]
                recorder.add(
                    TierAnswer(
                        example=example.id, tier=tier, variant=variant, text=reply.text,
                        score=score(reply.text, example, default_scorer),
                        confidence=confidences(reply.token_probs, route_config.confidence.q)
                        if reply.token_probs is not None else None,
                        schema_valid=facts.schema_valid, schema_error=facts.schema_error, tool_calls=calls,
                        prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                        seconds=seconds, asked=asked,
                    )
                )  # fmt: skip
            # Scored again on every run: a changed `expected` or scorer needs no model.
            recorded = recorder.done[key]
            answers.append(replace(recorded, score=score(recorded.text, example, default_scorer)))
            if progress is not None:
                progress(1)
    return answers
