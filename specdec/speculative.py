"""One batched speculative step: draft -> verify -> accept, and its one readback.

For every running row the step (1) lets the draft propose γ_b tokens, (2) has the target score the
row's pending token plus its drafts in one pass (γ_b + 1 distributions), and (3) accepts a prefix of
the drafts in one kernel call for the whole batch. Rows are ragged: each has its own γ_b (0 = a
plain target step), its own number of tokens the draft has not seen yet, and possibly drafts
supplied from outside instead of by the draft model. Draft-only rows ride along in the draft passes
and keep every token they sample. Committing the results (stop conditions, cache lengths) is the
scheduler's.

The step's inputs reach the device in one copy (`staging.HostStaging`): every row's tokens, slot,
positions, sampling parameters, seed and draft placements are built on the host before the first
pass. The host reads the device exactly once per step (`readback.HostCopy`): accepted counts,
emitted tokens, per-row non-finite flags and any log-probabilities asked for, in one copy.
Constrained rows (`specdec.grammar`) add one small read per draft pass - their proposals, to
advance their matchers and mask the next pass and the verify positions
(docs/STRUCTURED_OUTPUT.md) - and their bitmasks' uploads; free rows never do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from specdec.batching import HostBatch, Row, kv_extent
from specdec.grammar import apply_bitmask, new_bitmask
from specdec.kernels import use_triton
from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton
from specdec.kernels.philox import STREAM_DRAFT
from specdec.kernels.rejection_sample import rejection_sample_reference, rejection_sample_triton
from specdec.kernels.sample import sample_reference, sample_triton
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE, ROW_OK
from specdec.logprobs import Logprobs
from specdec.models.decoder import ForwardBatch
from specdec.models.kv_cache import KVCache
from specdec.models.loader import LoadedModel
from specdec.readback import DraftReadback, HostCopy, HostLogprobs, StepReadback, VerifyReadback
from specdec.request import TokenLogprob
from specdec.sampling import SamplingTensors, StagedSampling, probabilities
from specdec.sequence import Sequence
from specdec.staging import HostStaging
from specdec.timing import PassKind, PassTimer


@dataclass(frozen=True, slots=True)
class AcceptKernels:
    """The step's sampling and acceptance kernels: Triton on CUDA, the PyTorch references elsewhere
    (`specdec.kernels.use_triton`). A test may pass a deliberately wrong rule to show that the
    statistical tests catch it."""

    sample: Callable
    greedy_accept: Callable
    rejection_sample: Callable

    @staticmethod
    def for_device(device: torch.device) -> AcceptKernels:
        if use_triton(device):
            return AcceptKernels(sample_triton, greedy_accept_triton, rejection_sample_triton)
        return AcceptKernels(sample_reference, greedy_accept_reference, rejection_sample_reference)


@dataclass(slots=True)
class RowPlan:
    """What one target-verified row does this step."""

    seq: Sequence
    gamma: int  # drafts to verify (0: a plain target step)
    external: list[int] | None = None  # drafts supplied from outside; the draft model skips the row
    # The external drafts are the draft model's own samples (Request.external_draft_from_draft):
    # verified against its q, scored for the whole chunk in one wide draft pass, not as point masses.
    external_q: bool = False


@dataclass(slots=True)
class RowOutcome:
    seq: Sequence
    tokens: list[int]  # emitted this step, before stop conditions
    gamma: int  # drafts verified (0 for plain target and draft-only rows)
    accepted: int
    draft_fed: int | None  # new tokens whose K/V the draft cache now holds; None: draft not run
    error: str | None = None  # set when the row's numbers went bad
    logprobs: list[TokenLogprob] | None = None  # per emitted token, when the request asked


@dataclass(slots=True)
class _Drafts:
    """The draft passes' results, still on the device."""

    tokens: torch.Tensor  # [Bd, passes] proposals (or a draft-only row's output)
    status: torch.Tensor  # [Bd] int8 (specdec.kernels.status), the worst of the row's passes
    probs: torch.Tensor | None  # [Bd, passes, V] q of each proposal (None when every row is greedy)
    logprobs: Logprobs | None = None  # of each sampled token (only when a draft-only row asks)
    # Constrained rows (by row): the grammar's mask at each pass and one past the last, on the
    # host [passes + 1, words] - the target's masks at the row's positions - and the passes the
    # grammar let the row draft (fewer than asked when it ends, or allows no token of the draft's).
    grammar_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    grammar_passes: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Verified:
    """The verify pass's acceptance, still on the device."""

    accepted: torch.Tensor  # [B]
    status: torch.Tensor  # [B] int8 (specdec.kernels.status)
    tokens: torch.Tensor  # [B, G+1] emitted-token candidates
    logprobs: Logprobs | None  # of the candidates, when a row asked


@dataclass(slots=True)
class _RowSet:
    """Some rows of the step's row table (`_RowTable`), and how to take their per-row tensors: a
    slice when they are consecutive (no kernel), else a gather by an index staged with the step."""

    rows: list[int]
    span: slice | None = None
    handle: int | None = None
    index: torch.Tensor | None = None  # after the upload, when the rows are not consecutive

    @staticmethod
    def stage(rows: list[int], staging: HostStaging) -> _RowSet:
        first = rows[0] if rows else 0
        if rows == list(range(first, first + len(rows))):
            return _RowSet(rows, span=slice(first, first + len(rows)))
        return _RowSet(rows, handle=staging.add(np.asarray(rows, dtype=np.int64)))

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        if self.handle is not None:
            self.index = uploaded[self.handle]

    def take(self, values: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            return values[self.span]
        assert self.index is not None
        return values.index_select(0, self.index)


@dataclass(slots=True)
class _RowTable:
    """Per-row values of every row of the step, staged once: the sampling parameters (one
    SamplingTensors per step, which each phase takes its rows of), the seeds, and the lengths -
    the position of the next token each row samples."""

    sampling: StagedSampling
    ints: int  # handle of [2, N] int64: seeds, lengths
    sampling_t: SamplingTensors | None = None
    seeds: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    @staticmethod
    def stage(seqs: list[Sequence], staging: HostStaging) -> _RowTable:
        ints = np.array([[s.seed for s in seqs], [len(s.tokens) for s in seqs]], dtype=np.int64)
        return _RowTable(
            SamplingTensors.stage([s.request.params for s in seqs], staging), staging.add(ints.reshape(2, -1))
        )

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        self.sampling_t = self.sampling.on_device(uploaded)
        self.seeds, self.lengths = uploaded[self.ints]

    def take(self, rows: _RowSet) -> tuple[SamplingTensors, torch.Tensor, torch.Tensor]:
        """The sampling parameters, seeds and lengths of `rows`."""
        assert self.sampling_t is not None and self.seeds is not None and self.lengths is not None
        return self.sampling_t.take(rows.rows, rows.take), rows.take(self.seeds), rows.take(self.lengths)


@dataclass(slots=True)
class _DraftInputs:
    """The draft passes' host-side inputs, staged (`SpeculativeStep._stage_draft`)."""

    seqs: list[Sequence]  # model-drafted rows, then draft-only rows
    passes: int
    draft_only_from: int
    rows: _RowSet  # the seqs' rows in the step's table
    behind: list[Sequence]  # rows the catch-up pass feeds
    catchup: HostBatch | None
    pass0: HostBatch
    needed: int  # handle of [Bd] int64: the passes each row uses
    grammar: _DraftGrammar
    longest: int  # the longest row's length (the attention extent of later passes)
    catchup_batch: ForwardBatch | None = None
    batch: ForwardBatch | None = None
    needed_t: torch.Tensor | None = None

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        self.rows.resolve(uploaded)
        self.catchup_batch = None if self.catchup is None else self.catchup.on_device(uploaded)
        self.batch = self.pass0.on_device(uploaded)
        self.needed_t = uploaded[self.needed]
        self.grammar.resolve(uploaded)


@dataclass(slots=True)
class _ScoreInputs:
    """The scored external chunks' wide draft pass, staged (`SpeculativeStep._stage_scoring`)."""

    rows: _RowSet
    batch: HostBatch
    forward: ForwardBatch | None = None

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        self.rows.resolve(uploaded)
        self.forward = self.batch.on_device(uploaded)


@dataclass(slots=True)
class _VerifyInputs:
    """One verify pass's host-side inputs, staged (`SpeculativeStep._stage_verify`)."""

    group: list[int]  # the rows' indices in the step's plans (and rows of its table)
    plans: list[RowPlan]
    draft_rows: list[int]  # each row's row of the draft passes (-1: none)
    rows: _RowSet
    batch: HostBatch
    per_row: int  # handle of [3, B] int64: first draft column, drafts, row of the stacked q (-1: none)
    point_mass: int  # handle of [B] bool: the drafts are point masses (an unscored external draft)
    placements: int | None  # handle of [4, P] int64: (row, column) <- (draft row, pass), model drafts
    gamma: int  # the widest row's drafts
    width: int  # as the cost model prices the pass
    forward: ForwardBatch | None = None
    per_row_t: torch.Tensor | None = None
    point_mass_t: torch.Tensor | None = None
    placements_t: torch.Tensor | None = None

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        self.rows.resolve(uploaded)
        self.forward = self.batch.on_device(uploaded)
        self.per_row_t = uploaded[self.per_row]
        self.point_mass_t = uploaded[self.point_mass]
        self.placements_t = None if self.placements is None else uploaded[self.placements]


class SpeculativeStep:
    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None,
        target_cache: KVCache,
        draft_cache: KVCache | None,
        vocab_size: int,
        kernels: AcceptKernels | None = None,
        max_gamma: int = 8,
        mask_drafts: bool = True,
    ):
        self.mask_drafts = mask_drafts  # EngineConfig.mask_constrained_drafts
        self.max_gamma = max_gamma  # a verify pass wider than γmax + 2 is run apart (_verify_groups)
        self.target = target
        self.draft = draft
        self.target_cache = target_cache
        self.draft_cache = draft_cache
        self.vocab_size = vocab_size
        self.device = target.device
        self.capacity = target_cache.layout.capacity
        self.kernels = kernels or AcceptKernels.for_device(self.device)
        self.timer = PassTimer(self.device)
        # A feature-reading draft (EAGLE, ModelConfig.feature_input) reads the target's features,
        # which the target's cache keeps (KVCache.features).
        self.feature_draft = draft is not None and draft.config.feature_input

    # ------------------------------------------------------------------------- the step

    def run(self, plans: list[RowPlan], draft_only: list[Sequence]) -> list[RowOutcome]:
        """One step for `plans` (target-verified rows) and `draft_only` rows; one outcome per row,
        plans first. Every per-row input of the step is built on the host before the first pass
        and reaches the device in one copy (`specdec.staging`); the passes' timings wait in
        `self.timer`."""
        if self.feature_draft:
            # Its q of an external chunk would need the target's features of tokens the target has
            # not read yet: such chunks are verified as point masses (exact for any proposal).
            for plan in plans:
                plan.external_q = False
        model_drafted = [b for b, p in enumerate(plans) if p.gamma > 0 and p.external is None]
        drafting = [plans[b].seq for b in model_drafted] + draft_only
        passes = max((plans[b].gamma for b in model_drafted), default=1 if draft_only else 0)
        # Each row's own passes: a row's status counts only the proposals it uses.
        needed = [plans[b].gamma for b in model_drafted] + [passes] * len(draft_only)
        scored = [b for b, p in enumerate(plans) if _scored(p)]
        # Where each plan's proposals and q are: its row of the draft passes (model drafts), or of
        # the q stacked after theirs (scored external chunks); -1: none. The draft passes keep q
        # only when a drafting row samples.
        draft_row = {b: i for i, b in enumerate(model_drafted)}
        has_model_q = any(not s.request.params.greedy for s in drafting)
        q_offset = len(drafting) if has_model_q else 0
        q_row = {b: q_offset + i for i, b in enumerate(scored)} | (draft_row if has_model_q else {})

        # The step's row table holds the plans' rows, then the draft-only rows: a plan's row in
        # it is its index in `plans`.
        staging = HostStaging()
        table = _RowTable.stage([p.seq for p in plans] + draft_only, staging)
        draft_in = score_in = None
        if drafting:
            table_rows = model_drafted + list(range(len(plans), len(plans) + len(draft_only)))
            draft_in = self._stage_draft(
                drafting, passes, needed, len(model_drafted), _RowSet.stage(table_rows, staging), staging
            )
        if scored:
            score_in = self._stage_scoring(
                [plans[b] for b in scored], _RowSet.stage(scored, staging), staging
            )
        verify_in = self._stage_verify(plans, draft_row, q_row, staging)
        uploaded = staging.upload(self.device)
        for part in (table, draft_in, score_in, *verify_in):
            if part is not None:
                part.resolve(uploaded)

        drafts = self._draft(draft_in, table) if draft_in is not None else None
        if drafts is not None and drafts.grammar_passes:  # the grammar may have cut drafts short
            cut = False
            for i, b in enumerate(model_drafted):
                gamma = min(plans[b].gamma, drafts.grammar_passes.get(i, plans[b].gamma))
                cut, plans[b].gamma = cut or gamma < plans[b].gamma, gamma
            if cut:  # a row's γ shapes its verify inputs: a constrained step stages them again
                staging = HostStaging()
                verify_in = self._stage_verify(plans, draft_row, q_row, staging)
                uploaded = staging.upload(self.device)
                for part in verify_in:
                    part.resolve(uploaded)
        external_q = self._score_externals(score_in, table) if score_in is not None else None
        order: list[int] = []  # the plans' indices in the order of the verified rows
        verified = None
        if plans:
            top_n = max(
                (p.seq.request.params.top_logprobs for p in plans if p.seq.request.params.logprobs),
                default=-1,
            )
            q = _stack_q(drafts.probs if drafts else None, external_q)
            parts = []
            for v in verify_in:
                parts.append(self._verify(v, drafts, q, table, top_n))
                order += v.group
            verified = _stack_verified(parts)
        readback = _read_back(self.device, verified, drafts)

        outcomes: list[RowOutcome] = []
        verify, draft = readback.verify, readback.draft
        for r, b in enumerate(order):
            plan = plans[b]
            assert verify is not None
            accepted = verify.accepted[r]
            error, draft_fed = None, None
            if plan.gamma > 0 and plan.external is None:
                assert draft is not None
                # Proposals 1..passes-1 went through the draft; the accepted ones among them are
                # valid draft cache (the last proposal and the correction/bonus are not in it).
                # A feature-reading draft read its own features there, not the target's: its next
                # pass 0 reads the accepted tokens again, with the features the verify pass wrote.
                draft_fed = 0 if self.feature_draft else min(accepted, passes - 1)
                error = _row_error(draft.status[draft_row[b]], "draft")
            elif _scored(plan):
                # The wide pass fed every unseen token and the chunk but its last token.
                draft_fed = min(accepted, len(plan.external) - 1)
            error = _row_error(verify.status[r], "target") or error
            emitted = verify.tokens[r][: accepted + 1]
            logprobs = _logprobs_of(plan.seq, verify.logprobs, r, emitted)
            outcomes.append(RowOutcome(plan.seq, emitted, plan.gamma, accepted, draft_fed, error, logprobs))
        for r, seq in enumerate(draft_only, start=len(model_drafted)):
            assert draft is not None
            error = _row_error(draft.status[r], "draft")
            tokens = draft.tokens[r][: drafts.grammar_passes.get(r, passes)] if drafts else []
            if not tokens and error is None:
                error = "no token the grammar allows is in the draft model's vocabulary"
            logprobs = _logprobs_of(seq, draft.logprobs, r, tokens)
            # The draft cache holds every emitted token but the last (the next pass's input); a
            # row the grammar cut short emitted fewer than the passes fed.
            fed = min(passes - 1, max(len(tokens) - 1, 0))
            outcomes.append(RowOutcome(seq, tokens, 0, 0, fed, error, logprobs))
        # Every matcher back to the committed output: the scheduler commits what was emitted.
        for seq in [p.seq for p in plans] + draft_only:
            if seq.grammar is not None:
                seq.grammar.undo()
        return outcomes

    # ------------------------------------------------------------------------- draft

    def _stage_draft(
        self,
        seqs: list[Sequence],
        passes: int,
        needed: list[int],
        draft_only_from: int,
        rows: _RowSet,
        staging: HostStaging,
    ) -> _DraftInputs:
        """The draft passes' inputs (`_draft`), staged. Catch-up: rows that ran plain target steps
        are several tokens behind; all but their last token go in one eager pass of its own, so
        the drafting passes stay narrow. A feature-reading draft's pass 0 reads every token
        accepted last step (up to γmax + 1)."""
        widest = self.max_gamma + 1 if self.feature_draft else 2
        behind = [s for s in seqs if len(s.tokens) - s.draft_len > widest]
        catchup = None
        if behind:
            catchup_rows = [Row(s.slot, s.draft_len, s.tokens[s.draft_len : -1]) for s in behind]
            catchup = HostBatch.pack(catchup_rows, self.capacity, [[] for _ in behind]).stage(staging)
        # Pass 0 feeds each row's unseen tokens (1, or 2 after a fully accepted step), from where
        # the catch-up leaves it.
        behind_ids = {id(s) for s in behind}
        starts = [len(s.tokens) - 1 if id(s) in behind_ids else s.draft_len for s in seqs]
        pass0_rows = [Row(s.slot, start, s.tokens[start:]) for s, start in zip(seqs, starts)]
        pass0 = HostBatch.pack(pass0_rows, self.capacity, [[len(r.tokens) - 1] for r in pass0_rows])
        width = self.target.config.vocab_size
        grammar = _DraftGrammar(seqs, passes, needed, width, staging, self.mask_drafts, draft_only_from)
        return _DraftInputs(
            seqs,
            passes,
            draft_only_from,
            rows,
            behind,
            catchup,
            pass0.stage(staging),
            staging.add(np.asarray(needed, dtype=np.int64)),
            grammar,
            max(len(s.tokens) for s in seqs),
        )

    def _draft(self, d: _DraftInputs, table: _RowTable) -> _Drafts:
        """`d.passes` draft passes over `d.seqs`; pass j samples the token at index len(tokens) + j.
        Rows from `d.draft_only_from` on are draft-only: their log-probabilities are the output's.
        d.needed[b]: the passes row b uses (a ragged batch runs every row to the longest)."""
        assert self.draft is not None and self.draft_cache is not None
        model, cache, device = self.draft.model, self.draft_cache, self.device
        seqs, passes = d.seqs, d.passes
        if d.catchup is not None:
            assert d.catchup_batch is not None
            # Per column of the padded pass: it is as wide as its longest row.
            with self.timer.measure(PassKind.CATCHUP, len(d.behind), d.catchup.tokens.shape[1]):
                model(self._with_features(d.catchup_batch), cache)
            for s in d.behind:
                s.draft_len = len(s.tokens) - 1
        assert d.batch is not None and d.needed_t is not None
        batch = self._with_features(d.batch)
        features = None  # a feature-reading draft's own, from the pass before
        st, seeds, lengths = table.take(d.rows)
        needed_t = d.needed_t
        tokens = torch.empty((len(seqs), passes), dtype=torch.int64, device=device)
        status = torch.zeros(len(seqs), dtype=torch.int8, device=device)
        probs = None
        if st.any_sampled:
            probs = torch.empty((len(seqs), passes, self.vocab_size), dtype=torch.float32, device=device)
        want = [s.request.params for s in seqs[d.draft_only_from :] if s.request.params.logprobs]
        top_n = max((p.top_logprobs for p in want), default=0)
        pass_logprobs: list[Logprobs] = []
        grammar = d.grammar
        for j in range(passes):
            with self.timer.measure(PassKind.DRAFT, len(seqs), 1):
                if j == 0:
                    logits, features = model.forward_features(batch, cache)
                else:
                    # Feed the previous proposal; every row is one token wide at index len + j - 1.
                    step = ForwardBatch(
                        tokens=tokens[:, j - 1 : j],
                        slots=batch.slots,
                        start=lengths + (j - 1),
                        n_valid=torch.ones_like(lengths),
                        kv_len=kv_extent(d.longest + j, self.capacity),
                        first_slot=batch.first_slot,
                        features=features if self.feature_draft else None,
                    )
                    logits, features = model.forward_features(step, cache)
                logits = logits[:, 0]
                if grammar.masked:
                    logits = apply_bitmask(logits, grammar.masks_at(j), self.vocab_size, grammar.masked)
                q = None
                if probs is not None:
                    q = probs[:, j]
                    q.copy_(probabilities(logits[:, : self.vocab_size], st))
                tokens[:, j], row_status = self.kernels.sample(
                    logits, q, st.greedy, seeds, lengths + j, STREAM_DRAFT, self.vocab_size
                )
                if grammar.masked:  # the masked rows' proposals to the host: their next masks
                    grammar.advance(j, tokens[:, j], row_status, needed_t)
                # A pass past the row's own γ decides nothing for it, so cannot fail it.
                torch.maximum(status, torch.where(needed_t > j, row_status, 0).to(status.dtype), out=status)
                if want:
                    pass_logprobs.append(
                        Logprobs.of(logits[:, None], tokens[:, j : j + 1], top_n, self.vocab_size)
                    )
        return _Drafts(
            tokens=tokens,
            status=status,
            probs=probs,
            logprobs=Logprobs.concat(pass_logprobs),
            grammar_masks=grammar.final_masks(tokens),
            grammar_passes=dict(grammar.usable),
        )

    def _with_features(self, batch: ForwardBatch) -> ForwardBatch:
        """`batch` with a feature-reading draft's features: the target's, of each position before
        a token (all written by the target's passes: a draft reads only what the target has)."""
        if self.feature_draft:
            batch.features = self.target_cache.features_before(
                batch.slots, batch.start, batch.tokens.shape[1]
            )
        return batch

    def _stage_scoring(self, plans: list[RowPlan], rows: _RowSet, staging: HostStaging) -> _ScoreInputs:
        """The wide draft pass of `_score_externals`, staged: each row's unseen tokens and its
        external chunk but the chunk's last token (whose successor is the target's to choose)."""
        batch_rows, columns = [], []
        for plan in plans:
            seq, chunk = plan.seq, plan.external
            assert chunk
            unseen = seq.tokens[seq.draft_len :]
            batch_rows.append(Row(seq.slot, seq.draft_len, unseen + chunk[:-1]))
            columns.append([len(unseen) - 1 + i for i in range(len(chunk))])
        return _ScoreInputs(rows, HostBatch.pack(batch_rows, self.capacity, columns).stage(staging))

    def _score_externals(self, s: _ScoreInputs, table: _RowTable) -> torch.Tensor:
        """q [Bx, n, V] of each row's external chunk (the draft model's own earlier samples), in
        one wide draft pass, under the row's own sampling transform - the distributions the tokens
        were sampled from. The pass also catches the draft cache up."""
        assert self.draft is not None and self.draft_cache is not None and s.forward is not None
        width = s.batch.tokens.shape[1]
        with self.timer.measure(PassKind.CATCHUP, len(s.rows.rows), width):
            logits = self.draft.model(s.forward, self.draft_cache)  # [Bx, n, V]
        b, n, _ = logits.shape
        st, _, _ = table.take(s.rows)
        flat = logits[..., : self.vocab_size].reshape(b * n, -1)
        return probabilities(flat, st.repeat_rows(n)).view(b, n, -1)

    # ------------------------------------------------------------------------- verify + accept

    def _stage_verify(
        self, plans: list[RowPlan], draft_row: dict[int, int], q_row: dict[int, int], staging: HostStaging
    ) -> list[_VerifyInputs]:
        """Each verify pass's inputs (`_verify_groups`), staged: per row its pending tokens and
        drafts (model drafts are placed on the device, from the draft passes' output), the
        columns whose logits acceptance reads, and where its proposals' q is."""
        passes = []
        for group in _verify_groups(plans, self.max_gamma):
            chosen = [plans[b] for b in group]
            draft_rows = [draft_row.get(b, -1) for b in group]
            rows, columns, placements = [], [], []
            for b, plan in enumerate(chosen):
                seq = plan.seq
                pending = seq.tokens[seq.target_len :]
                if plan.external is not None:
                    inputs = pending + plan.external
                else:
                    inputs = pending + [0] * plan.gamma  # the model's drafts go here on the device
                    placements += [(b, len(pending) + i, draft_rows[b], i) for i in range(plan.gamma)]
                rows.append(Row(seq.slot, seq.target_len, inputs))
                columns.append([len(pending) - 1 + i for i in range(plan.gamma + 1)])
            batch = HostBatch.pack(rows, self.capacity, columns)
            gamma = max(p.gamma for p in chosen)
            per_row = np.array(
                [
                    [len(r.tokens) - p.gamma for r, p in zip(rows, chosen)],  # the first draft's column
                    [p.gamma for p in chosen],
                    [q_row.get(b, -1) for b in group],
                ],
                dtype=np.int64,
            )
            point_mass = np.array([p.external is not None and not _scored(p) for p in chosen], dtype=np.bool_)
            width = batch.tokens.shape[1]
            passes.append(
                _VerifyInputs(
                    group=group,
                    plans=chosen,
                    draft_rows=draft_rows,
                    rows=_RowSet.stage(group, staging),
                    batch=batch.stage(staging),
                    per_row=staging.add(per_row),
                    point_mass=staging.add(point_mass),
                    placements=staging.add(np.array(placements, dtype=np.int64).T) if placements else None,
                    gamma=gamma,
                    # The cost model prices a verify pass by γ + 1; a pass that also reads a
                    # prompt's last chunk (`_verify_groups`) is priced by what it reads.
                    width=width if width > gamma + 2 else gamma + 1,
                )
            )
        return passes

    def _verify(
        self, v: _VerifyInputs, drafts: _Drafts | None, q: torch.Tensor | None, table: _RowTable, top_n: int
    ) -> _Verified:
        """One target pass over [pending tokens, drafts] per row of `v`, and acceptance. `q`: the
        model drafts' and scored external chunks' q, stacked (`_stack_q`). top_n: the step's most
        top logprobs asked (-1: no row asks), so that the groups' logprobs stack."""
        assert v.forward is not None and v.per_row_t is not None and v.point_mass_t is not None
        batch = v.forward
        if v.placements_t is not None:
            assert drafts is not None
            row, column, draft_row, draft_pass = v.placements_t
            batch.tokens[row, column] = drafts.tokens[draft_row, draft_pass]
        first, num_drafts, q_rows = v.per_row_t
        # The drafts sit in the verify input right after each row's pending tokens.
        offsets = torch.arange(v.gamma, device=self.device)[None, :]
        cols = (first[:, None] + offsets).clamp(max=batch.tokens.shape[1] - 1)
        draft_tokens = torch.gather(batch.tokens, 1, cols)  # [B, G]
        st, seeds, positions = table.take(v.rows)
        with self.timer.measure(PassKind.VERIFY, len(v.plans), v.width):
            logits = self.target.model(batch, self.target_cache)  # [B, G+1, V_target]
            if any(p.seq.grammar is not None for p in v.plans):
                logits = self._mask_target(logits, v.plans, drafts, v.draft_rows)
            accepted, tokens, status = self.accept(
                logits, draft_tokens, num_drafts, st, seeds, positions, q, q_rows, v.point_mass_t
            )
        logprobs = None
        if top_n >= 0:
            logprobs = Logprobs.of(logits, tokens, top_n, self.vocab_size)
        return _Verified(accepted, status, tokens, logprobs)

    def _mask_target(
        self, logits: torch.Tensor, plans: list[RowPlan], drafts: _Drafts | None, draft_rows: list[int]
    ) -> torch.Tensor:
        """Constrained rows' logits [B, G+1, V] with -inf wherever the grammar, in the state
        each position would have, forbids a token. Model drafts bring their masks from the draft
        passes; an external draft's are made here, advancing the matcher over it (positions after
        a token the grammar forbids stay free: the draft is rejected before them)."""
        b, g1, width = logits.shape
        bitmask = new_bitmask(b * g1, self.target.config.vocab_size)
        indices: list[int] = []
        for r, plan in enumerate(plans):
            grammar = plan.seq.grammar
            if grammar is None:
                continue
            first = r * g1
            if plan.gamma and plan.external is None:
                assert drafts is not None
                bitmask[first : first + plan.gamma + 1] = drafts.grammar_masks[draft_rows[r]][
                    : plan.gamma + 1
                ]
            else:
                grammar.fill_along(bitmask, first, (plan.external or [])[: plan.gamma])
            indices += range(first, first + plan.gamma + 1)
        return apply_bitmask(logits.reshape(b * g1, width), bitmask, self.vocab_size, indices).view(
            b, g1, width
        )

    def accept(
        self,
        logits: torch.Tensor,
        draft_tokens: torch.Tensor,
        num_drafts: torch.Tensor,
        st: SamplingTensors,
        seeds: torch.Tensor,
        positions: torch.Tensor,
        q: torch.Tensor | None,
        q_row: torch.Tensor,
        point_mass: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """accepted [B], emitted-token candidates [B, G+1], status [B] for a mixed batch: greedy rows
        through the greedy kernel (raw logits), sampled rows through rejection sampling (the
        transformed distributions of both models). st, seeds, positions: the rows' sampling
        parameters, seeds and lengths (the position of the first token they emit)."""
        all_greedy = not st.any_sampled
        accepted, tokens, status = self.kernels.greedy_accept(
            logits, draft_tokens, num_drafts, self.vocab_size, None if all_greedy else st.greedy
        )
        if all_greedy:
            return accepted, tokens, status
        b, g1, _ = logits.shape
        p = probabilities(logits[..., : self.vocab_size].reshape(b * g1, -1), st.repeat_rows(g1)).view(
            b, g1, -1
        )
        s_acc, s_tok, s_status = self.kernels.rejection_sample(
            p, q, q_row, point_mass, draft_tokens, num_drafts, ~st.greedy, seeds, positions, self.vocab_size
        )
        greedy = st.greedy
        return (
            torch.where(greedy, accepted, s_acc),
            torch.where(greedy[:, None], tokens, s_tok),
            torch.where(greedy, status, s_status),
        )


def _verify_groups(plans: list[RowPlan], max_gamma: int) -> list[list[int]]:
    """The plans' indices, grouped into target passes: rows wider than any decoding row can be -
    a long external draft, or a prompt's last chunk that a row with an external draft defers to
    this pass so that prompt + draft cost one pass (`runner.prefill`) - pass apart from the rest,
    which a pass padded to their width would slow. A decoding row reads 1 or 2 pending tokens and
    at most γmax drafts."""
    wide = {b for b, p in enumerate(plans) if len(p.seq.tokens) - p.seq.target_len + p.gamma > max_gamma + 2}
    narrow = [b for b in range(len(plans)) if b not in wide]
    return [group for group in (narrow, sorted(wide)) if group]


def _stack_verified(parts: list[_Verified]) -> _Verified:
    """The groups' acceptance as one (rows in group order; tokens and logprobs padded to the
    widest), so the step still reads the device once."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.tokens.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    logprobs = None
    if parts[0].logprobs is not None:
        padded = [
            Logprobs(
                pad(p.logprobs.chosen),
                torch.nn.functional.pad(p.logprobs.top_values, (0, 0, 0, width - p.tokens.shape[1])),
                torch.nn.functional.pad(p.logprobs.top_ids, (0, 0, 0, width - p.tokens.shape[1])),
            )
            for p in parts
            if p.logprobs is not None
        ]
        logprobs = Logprobs(
            *(torch.cat([getattr(lp, f) for lp in padded]) for f in ("chosen", "top_values", "top_ids"))
        )
    return _Verified(
        torch.cat([p.accepted for p in parts]),
        torch.cat([p.status for p in parts]),
        torch.cat([pad(p.tokens) for p in parts]),
        logprobs,
    )


def _stack_q(model: torch.Tensor | None, external: torch.Tensor | None) -> torch.Tensor | None:
    """The model drafts' q [Bd, passes, V] and the scored external chunks' [Bx, n, V] as one
    [Bd + Bx, max(passes, n), V] (zero-padded: a row reads only its own drafts' positions). Only
    steps verifying a scored chunk pay the copy."""
    if model is None or external is None:
        return model if external is None else external
    width = max(model.shape[1], external.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(model), pad(external)])


def _read_back(device: torch.device, verified: _Verified | None, drafts: _Drafts | None) -> StepReadback:
    """The step's one device-to-host copy, unpacked."""
    copy = HostCopy()
    if verified is not None:
        v = [copy.add(verified.accepted), copy.add(verified.status), copy.add(verified.tokens)]
        v_lp = copy.add_logprobs(verified.logprobs)
    if drafts is not None:
        d = [copy.add(drafts.tokens), copy.add(drafts.status)]
        d_lp = copy.add_logprobs(drafts.logprobs)
    host = copy.fetch(device)
    verify = draft = None
    if verified is not None:
        accepted, status, tokens = (host[i].tolist() for i in v)
        verify = VerifyReadback(accepted, status, tokens, HostLogprobs.of(host, v_lp))
    if drafts is not None:
        tokens, status = (host[i].tolist() for i in d)
        draft = DraftReadback(tokens, status, HostLogprobs.of(host, d_lp))
    return StepReadback(verify, draft)


def _row_error(status: int, model: str) -> str | None:
    """The failure a row's status means, naming the model whose numbers it is about."""
    if status == ROW_NONFINITE:
        return f"non-finite logits (NaN or +inf) from the {model} model"
    if status == ROW_NO_TOKEN:
        return (
            f"no token is possible: every logit of the {model} model is -inf at the position that "
            "decides, so the request's constraints (allowed tokens, logit bias or grammar) exclude every token"
        )
    assert status == ROW_OK, status
    return None


def _logprobs_of(
    seq: Sequence, logprobs: HostLogprobs | None, row: int, tokens: list[int]
) -> list[TokenLogprob] | None:
    params = seq.request.params
    if not params.logprobs or logprobs is None:
        return None
    return logprobs.row(row, tokens, params.top_logprobs)


def _scored(plan: RowPlan) -> bool:
    """Whether the row's external draft is verified against the draft model's recomputed q. Not
    for a constrained row: its q would have to be the masked one it was sampled from, so its
    external draft is verified as point masses (exact for any proposal)."""
    return plan.external is not None and plan.external_q and plan.seq.grammar is None


class _DraftGrammar:
    """The constrained rows of one step's draft passes: each pass's masks from their matchers, and
    the matchers advanced over what each pass proposed - one host read per pass, of those rows
    only. A row drafts only as far as its grammar lets it: not past the grammar's end, and not past
    a position where no token of the draft's vocabulary is allowed (a subset head). With masking
    off (EngineConfig.mask_constrained_drafts) speculative rows draft freely and their proposals
    are read once, after the passes, to make the target's masks (`final_masks`)."""

    def __init__(
        self,
        seqs: list[Sequence],
        passes: int,
        needed: list[int],
        width: int,
        staging: HostStaging,
        mask_drafts: bool = True,
        draft_only_from: int | None = None,
    ):
        self.rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        # Rows masked pass by pass: all of them, or (mask_drafts off) only the draft-only ones,
        # whose proposals are the output; the others draft freely and are masked at verify only.
        first_draft_only = len(seqs) if draft_only_from is None else draft_only_from
        self.masked = [i for i in self.rows if mask_drafts or i >= first_draft_only]
        self.unmasked = [i for i in self.rows if i not in self.masked]
        self.grammars = {i: seqs[i].grammar for i in self.rows}
        self.needed = {i: needed[i] for i in self.rows}
        self.usable = dict(self.needed)  # passes each row may use; cut where the grammar says
        self.masks = {i: new_bitmask(passes + 1, width) for i in self.rows}
        self.batch, self.width = len(seqs), width
        self._told: set[int] = set()  # rows whose cut needed_t already knows
        # The rows' indices travel with the step's other inputs (`resolve`).
        self._handles = [
            staging.add(np.asarray(r, dtype=np.int64)) if r else None for r in (self.masked, self.unmasked)
        ]
        self.index: torch.Tensor | None = None
        self.unmasked_index: torch.Tensor | None = None

    def resolve(self, uploaded: list[torch.Tensor]) -> None:
        masked, unmasked = self._handles
        self.index = None if masked is None else uploaded[masked]
        self.unmasked_index = None if unmasked is None else uploaded[unmasked]

    def masks_at(self, j: int) -> torch.Tensor:
        """The [B, words] bitmask of pass j (every row but the constrained ones: all allowed)."""
        full = new_bitmask(self.batch, self.width)
        for i in self.masked:
            if self.usable[i] > j:
                if not self.grammars[i].fill(self.masks[i], j):
                    self.usable[i] = j  # the grammar has ended: nothing more to draft
                full[i] = self.masks[i][j]
        return full

    def advance(
        self, j: int, proposals: torch.Tensor, row_status: torch.Tensor, needed_t: torch.Tensor
    ) -> None:
        """Advance the matchers over pass j's proposals; a row whose pass found no allowed token
        stops drafting there (needed_t learns it, so that the empty pass does not fail the row).
        A row whose numbers went bad stops too, and fails on its status as any row would."""
        assert self.index is not None
        tokens, status = torch.stack([proposals[self.index], row_status[self.index].to(torch.int64)]).tolist()
        for k, i in enumerate(self.masked):
            if self.usable[i] <= j:
                continue
            if status[k] == ROW_NONFINITE:  # bad numbers: the row fails on its status, as unconstrained
                self.usable[i] = j
                self._told.add(i)  # needed_t keeps the pass, so its status counts
            elif status[k] == ROW_NO_TOKEN or not self.grammars[i].speculate(tokens[k]):
                self.usable[i] = j
        for i in self.masked:
            if self.usable[i] < self.needed[i] and i not in self._told:
                needed_t[i] = self.usable[i]
                self._told.add(i)

    def final_masks(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each row's masks at its positions 0..usable. A masked row's last one, after its final
        draft, is filled here (rows cut short had theirs filled at the pass that cut them). An
        unmasked row's are all made here, from its proposals read in one go: the matcher advanced
        over them up to the first the grammar forbids (the target rejects it there; the positions
        after it stay free)."""
        for i in self.masked:
            if self.usable[i] == self.needed[i]:
                self.grammars[i].fill(self.masks[i], self.usable[i])
        if self.unmasked_index is not None:
            drafted = tokens[self.unmasked_index].tolist()
            for i, proposals in zip(self.unmasked, drafted):
                self.grammars[i].fill_along(self.masks[i], 0, proposals[: self.needed[i]])
        return {i: self.masks[i][: self.usable[i] + 1] for i in self.rows}
