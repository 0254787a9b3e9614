"""The model runner: the models, both KV caches and their RoPE tables, and every pass over them.

It prefills admitted prompts, runs one speculative step (`speculative.SpeculativeStep`) and hands
back the step's outcomes with the timings of its passes, and measures the passes' costs at start-up
for the γ planner. It decides nothing about which rows run or with what γ: that is the scheduler's
and the planner's.
"""

from __future__ import annotations

import threading

import torch

from specdec.batching import Row, make_batch
from specdec.config import EngineConfig
from specdec.grammar import Grammars
from specdec.models.decoder import ForwardBatch
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.loader import LoadedModel
from specdec.request import Mode
from specdec.sequence import Sequence
from specdec.speculative import AcceptKernels, RowOutcome, RowPlan, SpeculativeStep
from specdec.timing import PassKind, PassTiming
from specdec.validation import RequestLimits

_TARGET_MODES = (Mode.SPECULATIVE, Mode.TARGET)
_DRAFT_MODES = (Mode.SPECULATIVE, Mode.DRAFT)


class ModelRunner:
    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None,
        config: EngineConfig,
        limits: RequestLimits,
        kernels: AcceptKernels | None = None,
    ):
        self.target = target
        self.draft = draft
        self.config = config
        self.device = target.device
        self.vocab_size = limits.vocab_size
        self.layout = CacheLayout(config.max_batch_size, limits.max_context, config.lookahead)
        self.target_cache = KVCache(
            target.config,
            self.layout,
            target.dtype,
            self.device,
            config.memory_fraction,
            features=draft is not None and draft.config.feature_input,
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
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self.step = SpeculativeStep(
            target,
            draft,
            self.target_cache,
            self.draft_cache,
            self.vocab_size,
            kernels,
            config.max_gamma,
            mask_drafts=mask_drafts_on(config.mask_constrained_drafts, target.device),
        )

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def grammars(self) -> Grammars:
        """The grammar compiler, built at the first constrained request: the target's token
        strings, its logits' width, the engine's end-of-sequence ids as stop tokens."""
        with self._grammars_lock:  # the server's request threads compile too (Engine.check_constraint)
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.target.config.vocab_size, self.eos_ids)
            return self._grammars

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> None:
        """Write the next `n` prompt tokens of each (row, n) into the caches that serve the row, in
        one ragged pass per model with no logits. A row's prompt but its last token is prefilled
        in chunks (`Sequence.prefilled`); the last token is the first input of its first decoding
        pass, which yields logits.

        A row with an external draft (a routed answer, a predicted output) leaves its prompt's
        last chunk out of the target's pass: its first verify pass reads that chunk and the draft
        together (`speculative._verify_groups` gives it a pass apart from decoding rows), so an
        answer the target agrees with costs ⌈(prompt + answer) / budget⌉ target passes, not a
        prefill pass more.

        A feature-reading draft prefills only what the target's pass just did, reading the
        features it wrote; a chunk the target deferred is the draft's to catch up on after the
        verify pass has written its features (`SpeculativeStep._draft`)."""
        feature_draft = self.draft is not None and self.draft.config.feature_input
        drafted: set[int] = set()
        for model, cache, modes in (
            (self.target, self.target_cache, _TARGET_MODES),
            (self.draft, self.draft_cache, _DRAFT_MODES),
        ):
            rows = [(s, n) for s, n in chunks if s.mode in modes and n > 0]
            if model is self.target or feature_draft:
                rows = [(s, n) for s, n in rows if not _defers_last_chunk(s, n)]
            if model is None or cache is None or not rows:
                continue
            batch = make_batch(
                [Row(s.slot, s.prefilled, s.tokens[s.prefilled : s.prefilled + n]) for s, n in rows],
                self.device,
                self.layout.capacity,
                logits_columns=[[] for _ in rows],
            )
            if model is self.draft:
                drafted.update(id(s) for s, _ in rows)
                if feature_draft:
                    batch.features = self.target_cache.features_before(
                        batch.slots, batch.start, batch.tokens.shape[1]
                    )
            model.model(batch, cache)
        for s, n in chunks:
            deferred = _defers_last_chunk(s, n)
            s.prefilled += n
            if s.mode in _TARGET_MODES and not deferred:
                s.target_len = s.prefilled
            if s.mode in _DRAFT_MODES and (id(s) in drafted or n == 0):
                s.draft_len = s.prefilled

    def decode(
        self, plans: list[RowPlan], draft_only: list[Sequence]
    ) -> tuple[list[RowOutcome], list[PassTiming]]:
        """One speculative step; the outcome of every row (plans first) and the passes' timings."""
        outcomes = self.step.run(plans, draft_only)
        return outcomes, self.step.timer.drain()

    # ------------------------------------------------------------------------- start-up

    def warm_up(self) -> list[PassTiming]:
        """The start-up cost measurement: every batch bucket up to the slot count, every verify
        width up to γmax + 1, at a mid-context position (so attention reads a typical amount of
        cache). Run before any request holds a slot; empty without a draft (nothing to plan)."""
        if self.draft is None:
            return []
        limit = self.config.max_batch_size
        sizes = sorted({min(2**i, limit) for i in range(12)} | {limit})
        position = min(self.layout.max_context // 2, 512)
        return self.measure_pass_costs(sizes, self.config.max_gamma, position)

    def measure_pass_costs(
        self, batch_sizes: list[int], max_gamma: int, position: int = 0, repeats: int = 3
    ) -> list[PassTiming]:
        """Time draft passes, target passes of every width 1..γmax+1 and a catch-up pass at each
        batch size, on dummy rows in slots no request holds yet. Returns the fastest of `repeats`
        measurements of each: the machine's cost when nothing else disturbs it."""
        device, capacity, step = self.device, self.layout.capacity, self.step
        # Every dummy row must fit below the cache's scratch position, however short the context.
        catchup = max(1, min(8, capacity - 1 - (max_gamma + 1)))
        position = max(0, min(position, capacity - 1 - max(catchup, max_gamma + 1)))
        best: dict[tuple[PassKind, int, int], float] = {}
        step.timer.drain()
        for _ in range(repeats):
            for b in batch_sizes:
                for width in range(1, max_gamma + 2):
                    rows = [Row(slot, position, [1] * width) for slot in range(b)]
                    batch = make_batch(rows, device, capacity, logits_columns=[list(range(width))] * b)
                    drafts = torch.zeros((b, width - 1), dtype=torch.int64, device=device)
                    num = torch.full((b,), width - 1, dtype=torch.int64, device=device)
                    # Timed like a real verify: the pass and the acceptance over its logits.
                    with step.timer.measure(PassKind.VERIFY, b, width):
                        logits = self.target.model(batch, self.target_cache)
                        step.kernels.greedy_accept(logits, drafts, num, self.vocab_size)
                if self.draft is not None and self.draft_cache is not None:
                    rows = [Row(slot, position, [1]) for slot in range(b)]
                    batch = self._dummy_features(make_batch(rows, device, capacity, logits_columns=[[0]] * b))
                    with step.timer.measure(PassKind.DRAFT, b, 1):
                        self.draft.model(batch, self.draft_cache)
                    rows = [Row(slot, position, [1] * catchup) for slot in range(b)]
                    batch = make_batch(rows, device, capacity, logits_columns=[[] for _ in rows])
                    with step.timer.measure(PassKind.CATCHUP, b, catchup):
                        self.draft.model(self._dummy_features(batch), self.draft_cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for t in step.timer.drain():
                key = (t.kind, t.batch, t.width)
                best[key] = min(t.seconds, best.get(key, float("inf")))
        return [PassTiming(kind, b, width, seconds) for (kind, b, width), seconds in best.items()]

    def _dummy_features(self, batch: ForwardBatch) -> ForwardBatch:
        """A timing pass's features, for a feature-reading draft: zeros (the cost is the same)."""
        if self.draft is not None and self.draft.config.feature_input:
            b, t = batch.tokens.shape
            batch.features = torch.zeros(
                (b, t, self.draft.config.hidden_size), dtype=self.draft.dtype, device=self.device
            )
        return batch


def _defers_last_chunk(seq: Sequence, n: int) -> bool:
    """Whether this chunk completes the prompt of a row whose target verifies an external draft
    next: then the verify pass, not the target's prefill pass, writes it (`ModelRunner.prefill`)."""
    return (
        bool(seq.external_pending) and seq.mode in _TARGET_MODES and seq.prefilled + n >= seq.num_prompt - 1
    )


def mask_drafts_on(configured: bool | None, device: torch.device) -> bool:
    """EngineConfig.mask_constrained_drafts as it applies on `device` (None: masked on the CPU only)."""
    return device.type == "cpu" if configured is None else configured
