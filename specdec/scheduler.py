"""The synchronous scheduler: it owns the models' caches and the slots.

Each `step()` reaps cancelled requests, admits waiting ones into free slots (prefilling their
prompts), runs one decoding step for every running row, and commits the tokens it produced. It
knows nothing of threads or gRPC: the engine calls it in a loop, the server runs that loop in a
thread of its own.

Invariant between steps, for every running sequence: `tokens` holds prompt + committed output; the
target cache holds K/V for tokens[:target_len] (target_len = len(tokens) - 1: the last committed
token is the first input of the next pass); the draft cache holds tokens[:draft_len].
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable

from specdec.adaptive import AcceptanceEstimate, CostModel, Decision, RowView, choose_gammas
from specdec.batching import Row, make_batch
from specdec.config import EngineConfig
from specdec.errors import IncompatiblePairError, InvalidRequestError, QueueFullError
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.loader import LoadedModel
from specdec.request import FinishReason, Mode, Request, RequestOutput, Timing
from specdec.sequence import Sequence
from specdec.speculative import RowPlan, SpeculativeStep, commit
from specdec.stopping import OutputStopper
from specdec.tokenization import emittable_vocab_size

DEFAULT_MAX_CONTEXT = 4096


class Scheduler:
    def __init__(self, target: LoadedModel, draft: LoadedModel | None, config: EngineConfig):
        self.target = target
        self.draft = draft
        self.config = config
        self.device = target.device
        self.vocab_size = emittable_vocab_size(target, draft)
        if draft is not None:
            check_pair(target, draft)
        limits = [target.config.max_position_embeddings] + (
            [draft.config.max_position_embeddings] if draft else []
        )
        self.max_context = config.max_context or min(*limits, DEFAULT_MAX_CONTEXT)
        if self.max_context > min(limits):
            raise InvalidRequestError(
                "max_context", f"{self.max_context} exceeds the models' max_position_embeddings {min(limits)}"
            )
        self.layout = CacheLayout(config.max_batch_size, self.max_context, config.lookahead)
        self.target_cache = KVCache(
            target.config, self.layout, target.dtype, self.device, config.memory_fraction
        )
        target.model.init_rope(self.layout.capacity)
        self.draft_cache: KVCache | None = None
        if draft is not None:
            self.draft_cache = KVCache(
                draft.config, self.layout, draft.dtype, self.device, config.memory_fraction
            )
            draft.model.init_rope(self.layout.capacity)
        self.eos_ids = tuple(
            sorted(set(target.config.eos_token_ids) | ({target.tokenizer.eos_token_id} - {None}))
        )
        self.step_runner = SpeculativeStep(
            target, draft, self.target_cache, self.draft_cache, self.vocab_size
        )
        self.costs = CostModel()
        self.global_acceptance = AcceptanceEstimate()
        self.last_decision: Decision | None = None
        # Tests (and experiments) may fix γ per row; None lets the policy decide.
        self.gamma_override: Callable[[Sequence], int] | None = None
        # Tests inject a synthetic CostModel and turn this off so real timings do not overwrite it.
        self.observe_costs = True
        # A min-heap: the lowest free slot first, so the running rows tend to hold one contiguous
        # range of slots, which the forward pass reads as a view instead of a gather.
        self.free_slots: list[int] = list(range(config.max_batch_size))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._seeds = random.SystemRandom()

    # ----------------------------------------------------------------------------- requests

    @property
    def default_mode(self) -> Mode:
        return Mode.SPECULATIVE if self.draft is not None else Mode.TARGET

    def add_request(self, request: Request, check_queue: bool = True) -> str:
        """Validate and queue a request; return its id. Raises InvalidRequestError / QueueFullError
        (the server does its own admission control and passes check_queue=False)."""
        mode = self.validate(request)
        if check_queue and len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
        request_id = request.request_id or f"req-{next(self._ids)}"
        if request_id in self._by_id:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        params = request.params
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**63)
        stopper = OutputStopper(
            self.target.tokenizer,
            request.prompt_ids,
            () if params.ignore_eos else self.eos_ids,
            params.stop_token_ids,
            params.stop,
            params.max_new_tokens,
            self.max_context,
        )
        seq = Sequence(
            request=request,
            request_id=request_id,
            mode=mode,
            slot=-1,
            seed=seed,
            stopper=stopper,
            tokens=list(request.prompt_ids),
            num_prompt=len(request.prompt_ids),
            timing=Timing(arrival=request.arrival_time),
            external_pending=list(request.external_draft or []),
        )
        self.waiting.append(seq)
        self._by_id[request_id] = seq
        return request_id

    def validate(self, request: Request) -> Mode:
        """Check a request against the engine's limits (reads only immutable settings, so any
        thread may call it); return the mode it will run in."""
        mode = request.mode or self.default_mode
        if mode in (Mode.SPECULATIVE, Mode.DRAFT) and self.draft is None:
            raise InvalidRequestError(
                "mode", f"mode {mode.value} needs a draft model; this engine has only a target"
            )
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(ids) >= self.max_context:
            raise InvalidRequestError(
                "prompt",
                f"{len(ids)} prompt tokens leave no room in the context of {self.max_context} tokens",
            )
        request.params.validate(self.vocab_size)
        room = self.max_context - len(ids)
        if request.params.max_new_tokens > room:
            raise InvalidRequestError(
                "max_new_tokens",
                f"{request.params.max_new_tokens} exceeds the room left in the context: {len(ids)} prompt tokens "
                f"+ max_new_tokens must be <= {self.max_context}, so at most {room}",
            )
        if request.external_draft:
            if mode is Mode.DRAFT:
                raise InvalidRequestError(
                    "external_draft", "external drafts are verified by the target; not in draft mode"
                )
            outside = [t for t in request.external_draft if not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidRequestError(
                    "external_draft",
                    f"token id {outside[0]} is outside the vocabulary [0, {self.vocab_size})",
                )
        if not 0 <= request.num_speculative_tokens <= self.config.max_gamma:
            raise InvalidRequestError(
                "num_speculative_tokens",
                f"must be in [0, {self.config.max_gamma}] (0 = adaptive), got {request.num_speculative_tokens}",
            )
        return mode

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; its slot is freed at the start of the next step."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        return True

    def is_active(self, request_id: str) -> bool:
        """Whether the request is still waiting or running."""
        return request_id in self._by_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----------------------------------------------------------------------------- the loop

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self.last_decision = None  # set again by this step's decode, if it runs one
        self._reap_cancelled(outputs)
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode(outputs)
        return outputs

    def _reap_cancelled(self, outputs: list[RequestOutput]) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.finish_reason = FinishReason.CANCELLED
            outputs.append(self._finish(seq))
        for seq in [s for s in self.running if s.cancelled]:
            seq.finish_reason = FinishReason.CANCELLED
            outputs.append(self._finish(seq))

    def _admit(self) -> list[Sequence]:
        admitted = []
        now = time.monotonic()
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            seq.timing.admitted = now
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Write every prompt but its last token into the caches that will serve it (the last
        token is the first input of the row's first decoding pass, which yields logits)."""
        for model, cache, modes, attr in (
            (self.target, self.target_cache, (Mode.SPECULATIVE, Mode.TARGET), "target_len"),
            (self.draft, self.draft_cache, (Mode.SPECULATIVE, Mode.DRAFT), "draft_len"),
        ):
            rows = [s for s in seqs if s.mode in modes and s.num_prompt > 1]
            if model is None or cache is None or not rows:
                continue
            batch = make_batch(
                [Row(s.slot, 0, s.tokens[: s.num_prompt - 1]) for s in rows],
                self.device,
                self.layout.capacity,
                logits_columns=[[] for _ in rows],
            )
            model.model(batch, cache)
            for s in rows:
                setattr(s, attr, s.num_prompt - 1)

    def _decode(self, outputs: list[RequestOutput]) -> None:
        """One speculative step for every running row (plain target and draft-only rows included)."""
        started = time.perf_counter()
        plans, draft_only = self._plan_step()
        outcomes = self.step_runner.run(plans, draft_only)
        passes = 0.0
        for kind, batch, size, seconds in self.step_runner.timer.drain():
            passes += seconds
            if self.observe_costs:
                self._observe_cost(kind, batch, size, seconds)
        externals = {id(p.seq): p.external for p in plans}
        for outcome in outcomes:
            seq = outcome.seq
            if outcome.error is not None:
                self._fail(seq, outcome.error)
                outputs.append(self._finish(seq))
                continue
            self._observe_acceptance(seq, outcome.gamma, outcome.accepted, externals.get(id(seq)) is not None)
            reason = commit(seq, outcome, externals.get(id(seq)))
            if seq.timing.first_token is None and outcome.tokens:
                seq.timing.first_token = time.monotonic()
            if reason is not None:
                seq.finish_reason = reason
                outputs.append(self._finish(seq))
            else:
                outputs.append(self._delta(seq, final=False))
        if self.observe_costs:
            elapsed = time.perf_counter() - started
            # What the passes do not cover (batching, the sync, commit, detokenising) is part of
            # every option's price, and favours amortising it over longer drafts.
            self.costs.observe_overhead(
                len(plans) + len(draft_only),
                elapsed - passes,
                speculative=bool(draft_only) or any(p.gamma > 0 for p in plans),
            )

    # ----------------------------------------------------------------------------- γ

    def _plan_step(self) -> tuple[list[RowPlan], list[Sequence]]:
        """Every running row's γ for this step: fixed by the request, an external draft or the row's
        mode where they say so; chosen by the adaptive policy (or the default) otherwise."""
        draft_only = [s for s in self.running if s.mode is Mode.DRAFT]
        # In slot order: consecutive slots make the batch's cache reads views (batching.make_batch).
        rows = sorted((s for s in self.running if s.mode is not Mode.DRAFT), key=lambda s: s.slot)
        views, chunks = [], []
        for seq in rows:
            room = seq.remaining - 1  # a step emits up to γ + 1 tokens
            chunk = seq.external_pending[: min(self.config.max_external_draft, room)] if room > 0 else []
            chunks.append(chunk)
            if room <= 0 or (seq.mode is Mode.TARGET and not chunk):
                views.append(RowView(0.0, fixed=0, model_drafts=False))
            elif chunk:
                views.append(RowView(0.0, fixed=len(chunk), model_drafts=False))
            else:
                fixed = seq.request.num_speculative_tokens or None
                if fixed is None and self.gamma_override is not None:
                    fixed = self.gamma_override(seq)
                if fixed is None and not self._adaptive:
                    fixed = self.config.default_gamma
                views.append(
                    RowView(
                        alpha=self._alpha(seq),
                        fixed=None if fixed is None else min(fixed, room),
                        behind=len(seq.tokens) - seq.draft_len,
                        explore=seq.steps_idle >= self.config.explore_every,
                    )
                )
        if any(v.fixed is None for v in views):
            self.last_decision = choose_gammas(
                views,
                self.costs,
                self.config.max_gamma,
                len(draft_only),
                self.config.speculation_margin,
                self.config.per_row_gamma,
            )
            gammas = self.last_decision.gammas
        else:
            gammas = tuple(v.fixed or 0 for v in views)
        plans = []
        for seq, gamma, chunk in zip(rows, gammas, chunks):
            room = max(seq.remaining - 1, 0)
            plans.append(RowPlan(seq, len(chunk), chunk) if chunk else RowPlan(seq, min(gamma, room)))
        return plans, draft_only

    @property
    def _adaptive(self) -> bool:
        return self.config.adaptive and self.draft is not None and self.costs.ready

    def _alpha(self, seq: Sequence) -> float:
        prior = self.global_acceptance.value(self.config.acceptance_prior, prior_weight=4.0)
        return seq.acceptance.value(prior, prior_weight=4.0)

    def _observe_acceptance(self, seq: Sequence, gamma: int, accepted: int, external: bool) -> None:
        if seq.mode is not Mode.SPECULATIVE:
            return
        if gamma > 0 and not external:
            seq.acceptance.observe(gamma, accepted, self.config.acceptance_decay)
            self.global_acceptance.observe(gamma, accepted, 0.99)
            seq.steps_idle = 0
        else:
            seq.steps_idle += 1

    def _observe_cost(self, kind: str, batch: int, size: int, seconds: float) -> None:
        if kind == "verify":
            self.costs.observe_verify(batch, size, seconds)
        elif kind == "draft":
            self.costs.observe_draft(batch, seconds)
        elif kind == "catchup":
            self.costs.observe_catchup(batch, size, seconds)

    def warm_up(self) -> None:
        """Measure the passes' costs at start-up (dummy rows, before any request holds a slot)."""
        if self.draft is None or self.running:
            return
        limit = self.config.max_batch_size
        sizes = sorted({min(2**i, limit) for i in range(12)} | {limit})
        # Mid-context positions, so attention reads a typical amount of cache.
        position = min(self.max_context // 2, 512)
        verify: dict[int, dict[int, float]] = {}
        for kind, batch, size, seconds in self.step_runner.measure_costs(
            sizes, self.config.max_gamma, position
        ):
            if kind == "verify":
                verify.setdefault(batch, {})[size] = seconds
            else:
                self.costs.set_baseline(kind, batch, size, seconds)
        for batch, by_width in verify.items():
            self.costs.set_verify_baseline(batch, by_width)

    # ----------------------------------------------------------------------------- commit

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason = FinishReason.ERROR
        seq.error = (
            f"request {seq.request_id}: {message}; the request was stopped (other requests are unaffected)"
        )

    def _delta(self, seq: Sequence, final: bool) -> RequestOutput:
        new_ids = seq.output_ids[seq.reported :]
        seq.reported += len(new_ids)
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=seq.stopper.take_text(final),
            new_logprobs=logprobs,
            finished=final,
            finish_reason=seq.finish_reason if final else None,
            error=seq.error if final else None,
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.output_ids),
            stats=seq.stats,
            timing=seq.timing,
            seed=seq.seed,
            mode=seq.mode,
        )

    def _finish(self, seq: Sequence) -> RequestOutput:
        seq.timing.finished = time.monotonic()
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
        self._by_id.pop(seq.request_id, None)
        return self._delta(seq, final=True)


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose tokenizer maps tokens to ids differently from the target's.

    Logits widths may differ (checkpoints pad the vocabulary differently); the token <-> id mapping
    may not."""
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab == d_vocab:
        return
    only_t = sorted(set(t_vocab) - set(d_vocab))
    only_d = sorted(set(d_vocab) - set(t_vocab))
    moved = sorted(k for k in set(t_vocab) & set(d_vocab) if t_vocab[k] != d_vocab[k])
    details = []
    if len(t_vocab) != len(d_vocab):
        details.append(f"target tokenizer has {len(t_vocab)} entries, draft {len(d_vocab)}")
    if only_t:
        details.append(f"{len(only_t)} tokens only in the target's (e.g. {only_t[:3]})")
    if only_d:
        details.append(f"{len(only_d)} tokens only in the draft's (e.g. {only_d[:3]})")
    if moved:
        k = moved[0]
        details.append(
            f"{len(moved)} tokens with different ids (e.g. {k!r}: target {t_vocab[k]}, draft {d_vocab[k]})"
        )
    raise IncompatiblePairError(
        f"draft {draft.path} and target {target.path} do not share a tokenizer: " + "; ".join(details)
    )
