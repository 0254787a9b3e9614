"""One batched speculative step: draft -> verify -> accept, then commit.

For every running row the step (1) lets the draft propose γ_b tokens, (2) has the target score the
row's pending token plus its drafts in one pass (γ_b + 1 distributions), (3) accepts a prefix of the
drafts in one kernel call for the whole batch, and (4) commits the emitted tokens and sets both
caches' lengths. Rows are ragged: each has its own γ_b (0 = a plain target step), its own number of
tokens the draft has not seen yet, and possibly drafts supplied from outside instead of by the
draft model. Draft-only rows ride along in the draft passes and keep every token they sample.

The host reads the device exactly once per step: the accepted counts, emitted tokens and per-row
non-finite flags, packed into one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.batching import Row, kv_extent, make_batch
from specdec.kernels import use_triton
from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton
from specdec.kernels.philox import STREAM_DRAFT
from specdec.kernels.rejection_sample import rejection_sample_reference, rejection_sample_triton
from specdec.kernels.sample import sample_reference, sample_triton
from specdec.logprobs import Logprobs, token_logprobs
from specdec.models.decoder import ForwardBatch
from specdec.models.kv_cache import KVCache
from specdec.models.loader import LoadedModel
from specdec.request import FinishReason, TokenLogprob
from specdec.sampling import SamplingTensors, probabilities
from specdec.sequence import Sequence
from specdec.timing import PassTimer, sync_point


@dataclass(slots=True)
class RowPlan:
    """What one target-verified row does this step."""

    seq: Sequence
    gamma: int  # drafts to verify (0: a plain target step)
    external: list[int] | None = None  # drafts supplied from outside; the draft model skips the row


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
    tokens: torch.Tensor  # [Bd, n] proposals (or a draft-only row's output)
    bad: torch.Tensor  # [Bd] bool: the draft produced non-finite numbers for the row
    probs: torch.Tensor | None  # [Bd, n, V] q of each proposal (None when every row is greedy)
    passes: int
    logprobs: Logprobs | None = None  # of each sampled token (only when a draft-only row asks)


class SpeculativeStep:
    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None,
        target_cache: KVCache,
        draft_cache: KVCache | None,
        vocab_size: int,
    ):
        self.target = target
        self.draft = draft
        self.target_cache = target_cache
        self.draft_cache = draft_cache
        self.vocab_size = vocab_size
        self.device = target.device
        self.capacity = target_cache.layout.capacity
        triton_ok = use_triton(self.device)
        self._sample = sample_triton if triton_ok else sample_reference
        self._greedy_accept = greedy_accept_triton if triton_ok else greedy_accept_reference
        self._rejection_sample = rejection_sample_triton if triton_ok else rejection_sample_reference
        self.timer = PassTimer(self.device)

    # ------------------------------------------------------------------------- the step

    def run(self, plans: list[RowPlan], draft_only: list[Sequence]) -> list[RowOutcome]:
        model_drafted = [p for p in plans if p.gamma > 0 and p.external is None]
        drafting = [p.seq for p in model_drafted] + draft_only
        passes = max((p.gamma for p in model_drafted), default=1 if draft_only else 0)
        drafts = self._draft(drafting, passes, draft_only_from=len(model_drafted)) if drafting else None
        verified, verify_logprobs = self._verify(plans, drafts) if plans else (None, None)

        # The step's one device-to-host copy.
        packed = []
        if verified is not None:
            packed.append(verified.flatten())
        if drafts is not None:
            packed.append(torch.cat([drafts.tokens, drafts.bad[:, None].long()], dim=1).flatten())
        with sync_point(self.device):
            host = torch.cat(packed).cpu().tolist() if packed else []
            # Log-probabilities, when asked for, come back right after: the device is idle by now.
            v_lp = verify_logprobs.host() if verify_logprobs is not None else None
            d_lp = drafts.logprobs.host() if drafts is not None and drafts.logprobs is not None else None
        n_verify = verified.numel() if verified is not None else 0
        verify_rows = _rows(host[:n_verify], verified.shape[1] if verified is not None else 1)
        draft_rows = _rows(host[n_verify:], passes + 1)

        outcomes: list[RowOutcome] = []
        draft_index = 0
        for b, (plan, (accepted, bad, *candidates)) in enumerate(zip(plans, verify_rows)):
            error, draft_fed = None, None
            if plan.gamma > 0 and plan.external is None:
                # Proposals 1..passes-1 went through the draft; the accepted ones among them are
                # valid draft cache (the last proposal and the correction/bonus are not in it).
                draft_fed = min(accepted, passes - 1)
                if draft_rows[draft_index][-1]:
                    error = "non-finite logits from the draft model"
                draft_index += 1
            if bad:
                error = "non-finite logits from the target model"
            emitted = candidates[: accepted + 1]
            logprobs = None
            params = plan.seq.request.params
            if params.logprobs and v_lp is not None:
                logprobs = token_logprobs(v_lp[0][b], v_lp[1][b], v_lp[2][b], emitted, params.top_logprobs)
            outcomes.append(RowOutcome(plan.seq, emitted, plan.gamma, accepted, draft_fed, error, logprobs))
        for i, (seq, row) in enumerate(zip(draft_only, draft_rows[draft_index:])):
            error = "non-finite logits from the draft model" if row[-1] else None
            logprobs = None
            params = seq.request.params
            if params.logprobs and d_lp is not None:
                r = draft_index + i
                logprobs = token_logprobs(
                    d_lp[0][r], d_lp[1][r], d_lp[2][r], row[:passes], params.top_logprobs
                )
            outcomes.append(RowOutcome(seq, row[:passes], 0, 0, passes - 1, error, logprobs))
        return outcomes

    # ------------------------------------------------------------------------- draft

    def _draft(self, seqs: list[Sequence], passes: int, draft_only_from: int) -> _Drafts:
        """`passes` draft passes over `seqs`; pass j samples the token at index len(tokens) + j.
        Rows from `draft_only_from` on are draft-only: their log-probabilities are the output's."""
        assert self.draft is not None and self.draft_cache is not None
        model, cache, device = self.draft.model, self.draft_cache, self.device
        # Catch-up: rows that ran plain target steps are several tokens behind; feed all but the
        # last in one eager pass of its own, so the drafting passes below stay narrow.
        behind = [s for s in seqs if len(s.tokens) - s.draft_len > 2]
        if behind:
            rows = [Row(s.slot, s.draft_len, s.tokens[s.draft_len : -1]) for s in behind]
            # Per column of the padded pass: it is as wide as its longest row.
            with self.timer.measure("catchup", len(rows), max(len(r.tokens) for r in rows)):
                model(make_batch(rows, device, self.capacity, logits_columns=[[] for _ in rows]), cache)
            for s in behind:
                s.draft_len = len(s.tokens) - 1
        # Pass 0 feeds each row's unseen tokens (1, or 2 after a fully accepted step).
        rows = [Row(s.slot, s.draft_len, s.tokens[s.draft_len :]) for s in seqs]
        batch = make_batch(rows, device, self.capacity, logits_columns=[[len(r.tokens) - 1] for r in rows])
        st = SamplingTensors.from_params([s.request.params for s in seqs], device)
        seeds = _device_ints([s.seed for s in seqs], device)
        lengths_host = [len(s.tokens) for s in seqs]
        lengths = _device_ints(lengths_host, device)
        tokens = torch.empty((len(seqs), passes), dtype=torch.int64, device=device)
        bad = torch.zeros(len(seqs), dtype=torch.bool, device=device)
        probs = None
        if st.any_sampled:
            probs = torch.empty((len(seqs), passes, self.vocab_size), dtype=torch.float32, device=device)
        want = [s.request.params for s in seqs[draft_only_from:] if s.request.params.logprobs]
        top_n = max((p.top_logprobs for p in want), default=0)
        pass_logprobs: list[Logprobs] = []
        for j in range(passes):
            with self.timer.measure("draft", len(seqs), 1):
                if j == 0:
                    logits = model(batch, cache)[:, 0]
                else:
                    # Feed the previous proposal; every row is one token wide at index len + j - 1.
                    step = ForwardBatch(
                        tokens=tokens[:, j - 1 : j],
                        slots=batch.slots,
                        start=lengths + (j - 1),
                        n_valid=torch.ones_like(lengths),
                        kv_len=kv_extent(max(lengths_host) + j, self.capacity),
                        first_slot=batch.first_slot,
                    )
                    logits = model(step, cache)[:, 0]
                q = None
                if probs is not None:
                    q = probs[:, j]
                    q.copy_(probabilities(logits[:, : self.vocab_size], st))
                tokens[:, j], row_bad = self._sample(
                    logits, q, st.greedy, seeds, lengths + j, STREAM_DRAFT, self.vocab_size
                )
                bad |= row_bad
                if want:
                    pass_logprobs.append(
                        Logprobs.of(logits[:, None], tokens[:, j : j + 1], top_n, self.vocab_size)
                    )
        logprobs = None
        if pass_logprobs:
            logprobs = Logprobs(
                torch.cat([lp.chosen for lp in pass_logprobs], 1),
                torch.cat([lp.top_values for lp in pass_logprobs], 1),
                torch.cat([lp.top_ids for lp in pass_logprobs], 1),
            )
        return _Drafts(tokens=tokens, bad=bad, probs=probs, passes=passes, logprobs=logprobs)

    # ------------------------------------------------------------------------- verify + accept

    def _verify(self, plans: list[RowPlan], drafts: _Drafts | None) -> tuple[torch.Tensor, Logprobs | None]:
        """Target pass over [pending tokens, drafts] per row and acceptance; returns
        [B, 2 + G + 1] int64 rows of (accepted, bad, emitted-token candidates...), and the
        candidates' log-probabilities when a row asked for them."""
        device = self.device
        rows, columns, placements = [], [], []
        q_row, point_mass = [], []  # where each row's q comes from
        di = 0
        for b, plan in enumerate(plans):
            seq = plan.seq
            pending = seq.tokens[seq.target_len :]
            q_row.append(-1)
            point_mass.append(plan.external is not None)
            if plan.external is not None:
                inputs = pending + plan.external
            else:
                inputs = pending + [0] * plan.gamma  # model drafts are placed on the device below
                if plan.gamma:
                    placements.append((b, len(pending), di, plan.gamma))
                    q_row[-1] = di
                    di += 1
            rows.append(Row(seq.slot, seq.target_len, inputs))
            columns.append([len(pending) - 1 + i for i in range(plan.gamma + 1)])
        batch = make_batch(rows, device, self.capacity, logits_columns=columns)
        if placements:
            assert drafts is not None
            r, c, d, j = [], [], [], []
            for b, start, draft_row, gamma in placements:
                r += [b] * gamma
                c += range(start, start + gamma)
                d += [draft_row] * gamma
                j += range(gamma)
            batch.tokens[_device_ints(r, device), _device_ints(c, device)] = drafts.tokens[
                _device_ints(d, device), _device_ints(j, device)
            ]
        g = max(p.gamma for p in plans)
        # The drafts sit in the verify input right after each row's pending tokens.
        first = _device_ints([len(r.tokens) - p.gamma for r, p in zip(rows, plans)], device)
        cols = (first[:, None] + torch.arange(g, device=device)[None, :]).clamp(max=batch.tokens.shape[1] - 1)
        draft_tokens = torch.gather(batch.tokens, 1, cols)  # [B, G]
        num_drafts = _device_ints([p.gamma for p in plans], device)
        q = drafts.probs if drafts is not None else None
        q_rows = _device_ints(q_row, device)
        point_masses = torch.tensor(point_mass).to(device, non_blocking=True)
        with self.timer.measure("verify", len(plans), g + 1):
            logits = self.target.model(batch, self.target_cache)  # [B, G+1, V_target]
            accepted, tokens, bad = self.accept(
                logits, draft_tokens, num_drafts, plans, q, q_rows, point_masses
            )
        logprobs = None
        want = [p.seq.request.params for p in plans if p.seq.request.params.logprobs]
        if want:
            logprobs = Logprobs.of(logits, tokens, max(p.top_logprobs for p in want), self.vocab_size)
        return torch.cat([accepted[:, None], bad[:, None].long(), tokens], dim=1), logprobs

    def measure_costs(
        self, batch_sizes: list[int], max_gamma: int, position: int = 0, repeats: int = 3
    ) -> list[tuple[str, int, int, float]]:
        """Warm-up: time draft passes, target passes of every width 1..γmax+1 and a catch-up pass at
        each batch size, on dummy rows (before any request holds a slot). Returns the fastest of
        `repeats` measurements of each: the machine's cost when nothing else disturbs it."""
        device, capacity = self.device, self.capacity
        # Every dummy row must fit below the cache's scratch position, however short the context.
        catchup = max(1, min(8, capacity - 1 - (max_gamma + 1)))
        position = max(0, min(position, capacity - 1 - max(catchup, max_gamma + 1)))
        best: dict[tuple[str, int, int], float] = {}
        self.timer.drain()
        for _ in range(repeats):
            for b in batch_sizes:
                for width in range(1, max_gamma + 2):
                    rows = [Row(slot, position, [1] * width) for slot in range(b)]
                    batch = make_batch(rows, device, capacity, logits_columns=[list(range(width))] * b)
                    drafts = torch.zeros((b, width - 1), dtype=torch.int64, device=device)
                    num = torch.full((b,), width - 1, dtype=torch.int64, device=device)
                    # Timed like a real verify: the pass and the acceptance over its logits.
                    with self.timer.measure("verify", b, width):
                        logits = self.target.model(batch, self.target_cache)
                        self._greedy_accept(logits, drafts, num, self.vocab_size)
                if self.draft is not None and self.draft_cache is not None:
                    rows = [Row(slot, position, [1]) for slot in range(b)]
                    batch = make_batch(rows, device, capacity, logits_columns=[[0]] * b)
                    with self.timer.measure("draft", b, 1):
                        self.draft.model(batch, self.draft_cache)
                    rows = [Row(slot, position, [1] * catchup) for slot in range(b)]
                    with self.timer.measure("catchup", b, catchup):
                        self.draft.model(
                            make_batch(rows, device, capacity, logits_columns=[[] for _ in rows]),
                            self.draft_cache,
                        )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for kind, b, size, seconds in self.timer.drain():
                key = (kind, b, size)
                best[key] = min(seconds, best.get(key, float("inf")))
        return [(kind, b, size, seconds) for (kind, b, size), seconds in best.items()]

    def accept(
        self,
        logits: torch.Tensor,
        draft_tokens: torch.Tensor,
        num_drafts: torch.Tensor,
        plans: list[RowPlan],
        q: torch.Tensor | None,
        q_row: torch.Tensor,
        point_mass: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """accepted [B], emitted-token candidates [B, G+1], bad [B] for a mixed batch: greedy rows
        through the greedy kernel (raw logits), sampled rows through rejection sampling (the
        transformed distributions of both models)."""
        st = SamplingTensors.from_params([p.seq.request.params for p in plans], self.device)
        all_greedy = not st.any_sampled
        accepted, tokens, bad = self._greedy_accept(
            logits, draft_tokens, num_drafts, self.vocab_size, None if all_greedy else st.greedy
        )
        if all_greedy:
            return accepted, tokens, bad
        b, g1, _ = logits.shape
        p = probabilities(logits[..., : self.vocab_size].reshape(b * g1, -1), st.repeat_rows(g1)).view(
            b, g1, -1
        )
        seeds = _device_ints([pl.seq.seed for pl in plans], self.device)
        positions = _device_ints([len(pl.seq.tokens) for pl in plans], self.device)
        s_acc, s_tok, s_bad = self._rejection_sample(
            p, q, q_row, point_mass, draft_tokens, num_drafts, ~st.greedy, seeds, positions, self.vocab_size
        )
        greedy = st.greedy
        return (
            torch.where(greedy, accepted, s_acc),
            torch.where(greedy[:, None], tokens, s_tok),
            torch.where(greedy, bad, s_bad),
        )


def commit(seq: Sequence, outcome: RowOutcome, external: list[int] | None) -> FinishReason | None:
    """Append the emitted tokens (cut by the stop conditions), set both caches' lengths, and
    advance the row's external draft. Returns the finish reason if a stop condition fired."""
    before = len(seq.tokens)
    kept, reason = seq.stopper.consume(outcome.tokens)
    seq.tokens.extend(outcome.tokens[:kept])
    if outcome.logprobs is not None:
        seq.pending_logprobs.extend(outcome.logprobs[:kept])
    seq.stats.record(outcome.gamma, outcome.accepted, outcome.accepted + 1)
    # The last committed token is not in the target cache: it is the next pass's first input.
    seq.target_len = len(seq.tokens) - 1
    if outcome.draft_fed is not None:
        seq.draft_len = before + min(outcome.draft_fed, kept)
    if external is not None:
        rest = seq.external_pending[len(external) :]
        fully_accepted = outcome.accepted == len(external)
        # After a full accept the target's bonus token stands where the next external token
        # would: the external draft goes on only if the two agree.
        if fully_accepted and rest and rest[0] == outcome.tokens[-1]:
            seq.external_pending = rest[1:]
        else:
            seq.external_pending = []
    return reason


def _rows(flat: list[int], width: int) -> list[list[int]]:
    return [flat[i : i + width] for i in range(0, len(flat), width)]


def _device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
