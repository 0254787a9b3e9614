"""One running request's state, shared by the scheduler and the speculative step."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.adaptive import AcceptanceEstimate
from specdec.grammar import RowGrammar
from specdec.request import FinishReason, Mode, Request, SpecStats, Timing, TokenLogprob
from specdec.stopping import OutputStopper


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    handle: int  # the engine's own key for this request (a client's request_id keys nothing)
    request_id: str  # the client's label, or one the engine made up: reported, never a key
    mode: Mode
    slot: int
    seed: int
    stopper: OutputStopper
    tokens: list[int]
    num_prompt: int
    timing: Timing
    target_len: int = 0  # tokens[:target_len] have K/V in the target cache
    draft_len: int = 0  # tokens[:draft_len] have K/V in the draft cache
    prefilled: int = 0  # prompt tokens written to the caches serving the row (chunked prefill)
    external_pending: list[int] = field(default_factory=list)  # external draft tokens not yet verified
    stats: SpecStats = field(default_factory=SpecStats)
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    steps_idle: int = 0  # consecutive steps this speculative row did not draft
    reported: int = 0  # output tokens already handed out
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    grammar: RowGrammar | None = None  # a constrained request's matcher (committed output only)

    @property
    def prefill_done(self) -> bool:
        """Every prompt token but the last is in the caches (the last is the first decode input)."""
        return self.prefilled >= self.num_prompt - 1

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still emit (max_new_tokens and the context limit)."""
        return min(
            self.request.params.max_new_tokens - len(self.output_ids),
            self.stopper.max_total_tokens - len(self.tokens),
        )
