"""What goes into the engine and what comes out: requests, per-step outputs, statistics.

These are the core's own types; the gRPC server and the CLI translate to and from them at the edge.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from specdec.grammar import Constraint
from specdec.sampling import SamplingParams


class Mode(enum.Enum):
    SPECULATIVE = "speculative"  # draft proposes, target verifies: the target's output, faster
    TARGET = "target"  # the target alone: the baseline speculative must equal
    DRAFT = "draft"  # the draft alone: the cheap tier


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    CONTEXT = "context"  # the context limit reached before max_new_tokens
    EOS = "eos"  # an end-of-sequence token
    STOP = "stop"  # a stop string or a stop token id
    CANCELLED = "cancelled"  # the client went away or cancelled
    ERROR = "error"  # this request's computation failed (e.g. non-finite logits)


@dataclass(slots=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: Mode | None = None  # None: speculative when the engine has a draft, else target
    num_speculative_tokens: int = 0  # 0 = the engine decides (adaptive); > 0 forces γ
    request_id: str = ""
    # Tokens proposed from outside the draft model (the router's small answer, prompt lookup): the
    # target verifies them as drafts instead of the draft model's proposals.
    external_draft: list[int] | None = None
    # The external draft was sampled by this engine's draft model from this same prompt under these
    # same sampling settings (the router's small answer): a sampled speculative row then verifies
    # it against the draft's own q - recomputed for the whole chunk in one wide draft pass - instead
    # of as point masses. Both are exact - q as far as the recomputed q is the one sampled from,
    # which is why the router asks for it only with a float32 draft and no top-k / top-p
    # (`router.draft_request`); q accepts more (min(1, p/q) instead of p).
    external_draft_from_draft: bool = False
    # Constrained output (a JSON Schema, JSON, a regex or a grammar): every emitted token is one the
    # grammar allows, for the draft and the target alike (specdec/grammar.py).
    constraint: Constraint | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Who sent it (an API key's name, a peer host; "" in-process): waiting requests are admitted
    # fairly across clients, and the server caps what one client has in flight.
    client: str = ""
    # The end user the client says this is for (OpenAI's `user`): a label for the request log only;
    # limits and fairness go by `client`, which the caller cannot choose.
    user: str = ""


@dataclass(slots=True)
class SpecStats:
    """Counters in the style of vLLM's spec-decode metrics; rates are derived, never stored."""

    verify_steps: int = 0  # target passes that verified at least one draft
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    emitted_by_verify: int = 0  # tokens emitted by those passes (accepted + replacement/bonus)
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: drafts accepted at position i
    drafted_by_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify pass (accepted drafts + 1): what one target pass buys."""
        return self.emitted_by_verify / self.verify_steps if self.verify_steps else 0.0

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        if drafted == 0:
            return
        self.verify_steps += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.emitted_by_verify += emitted
        while len(self.drafted_by_position) < drafted:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(drafted):
            self.drafted_by_position[i] += 1
        for i in range(accepted):
            self.accepted_by_position[i] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "verify_steps": self.verify_steps,
            "accepted_by_position": list(self.accepted_by_position),
        }


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass(slots=True)
class Timing:
    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.admitted or self.arrival) - self.arrival

    @property
    def time_to_first_token_seconds(self) -> float:
        return (self.first_token or self.arrival) - self.arrival

    @property
    def total_seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.arrival

    def as_dict(self) -> dict[str, float]:
        return {
            "queue_seconds": round(self.queue_seconds, 6),
            "time_to_first_token_seconds": round(self.time_to_first_token_seconds, 6),
            "total_seconds": round(self.total_seconds, 6),
        }


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text since the previous output;
    `finished` is set on the last one, which also carries the totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    handle: int = -1  # Scheduler.add_request's key for the request (-1: never reached the scheduler)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpecStats | None = None
    timing: Timing | None = None
    seed: int | None = None
    mode: Mode = Mode.SPECULATIVE
    constraint: ConstraintOutcome | None = None  # on the final output of a constrained request


@dataclass(frozen=True, slots=True)
class ConstraintOutcome:
    """How a constrained request's output stands against its constraint."""

    complete: bool  # the output is a whole match; False when it was cut (length, stop string, ...)
    unenforced: tuple[str, ...] = ()  # JSON Schema keywords the grammar could not enforce

    def as_dict(self) -> dict[str, object]:
        return {"complete": self.complete, "unenforced": list(self.unenforced)}


@dataclass(slots=True)
class GenerationResult:
    """A whole request's result (the engine's non-streaming API)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: SpecStats
    timing: Timing
    seed: int | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None
    constraint: ConstraintOutcome | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def as_dict(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason.value,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "stats": self.stats.as_dict(),
            "timing": self.timing.as_dict(),
            "seed": self.seed,
            **({"error": self.error} if self.error else {}),
            **({"constraint": self.constraint.as_dict()} if self.constraint else {}),
        }
