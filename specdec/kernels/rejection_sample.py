"""Batched rejection sampling (Leviathan et al. 2023) over a ragged batch.

Row b drafted d_1..d_γ (γ = num_drafts[b]) from the draft's distributions q_1..q_γ; the target's
distributions are p_1..p_{γ+1}. Both are already transformed by `specdec.sampling` (temperature,
top-k, top-p); nothing here changes them. For i = 1..γ, d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)), tested as ``u * q_i(d_i) < p_i(d_i)`` (no division: q = 0 < p accepts,
p = q = 0 rejects). At the first rejection the replacement is drawn from norm(max(0, p_i - q_i)); if
every draft is accepted the bonus token is drawn from p_{γ+1}. A γ = 0 row is plain sampling from p_1.
The emitted tokens then follow p exactly.

Draws are exponential races, argmax_v w_v / E_v with E_v = -log(u_v): the residual is never
normalised or materialised, and p and q are each read once. All randomness is Philox keyed on the
row's seed and the absolute position of the token being decided: STREAM_ACCEPT for u,
STREAM_RESAMPLE for the race (see philox.py). If the residual has no mass (p == q up to rounding)
the race falls back to p, which is then the right distribution.

A draft may be a point mass (an external proposal, e.g. the router's answer or prompt lookup):
q_i(v) = [v == d_i], which makes the same rule exact for deterministic proposals.

A draft id outside [0, vocab_size) is never accepted (it is a proposal of no real token; an
external point mass there has no mass in the vocabulary, so the replacement is drawn from p).

Rows flagged greedy are skipped here (they go through the greedy kernel). A row whose p or q hold
a NaN or +inf gets ROW_NONFINITE; a row whose deciding position has no possible token (p has no
mass there: every target logit -inf) gets ROW_NO_TOKEN (`specdec.kernels.status`). Such rows
accept nothing and yield ids inside the vocabulary.

`acceptance_threshold` and `residual_weights` are the two ingredients of the rule; the reference
takes them as parameters only so that the statistical tests can show that wrong rules fail.
"""

from __future__ import annotations

import torch

from specdec.kernels.philox import HAVE_TRITON, STREAM_ACCEPT, STREAM_RESAMPLE, uniform
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE, ROW_OK

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from specdec.kernels.philox import philox_uniform


def acceptance_threshold(p_d: torch.Tensor, q_d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept d when u * q(d) < p(d), i.e. with probability min(1, p(d) / q(d))."""
    return u * q_d < p_d


def residual_weights(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised replacement distribution after a rejection: max(0, p - q)."""
    return (p - q).clamp_min(0.0)


def rejection_sample_reference(
    p: torch.Tensor,
    q: torch.Tensor | None,
    q_row: torch.Tensor,
    point_mass: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    active: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: int,
    accept_rule=acceptance_threshold,
    residual_rule=residual_weights,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """accepted [B], tokens [B, G+1], status [B] int8 for the active rows (inactive rows: zeros).

    p [B, G+1, V] target probabilities; q [Bq, G', V] draft probabilities with row q_row[b] for
    row b (-1 or point_mass[b]: not read), G' >= num_drafts[b] of every row that reads it (G' may be
    below G when a longer external draft shares the batch); draft_tokens [B, G]; num_drafts [B];
    active [B] bool (the sampled rows); seeds [B]; positions [B]: index of the token d_1 decides."""
    b_size, g1, _ = p.shape
    g = g1 - 1
    device = p.device
    p = p[..., :vocab_size].float()
    steps = torch.arange(g1, device=device)
    in_row = steps[None, :] <= num_drafts[:, None]  # positions that belong to the row
    is_draft = steps[None, :g] < num_drafts[:, None]
    rows = torch.arange(b_size, device=device)

    in_vocab = (draft_tokens >= 0) & (draft_tokens < vocab_size)  # [B, G]
    d = draft_tokens.clamp(0, vocab_size - 1)  # for reading p and q only; never emitted unless valid

    # q at every draft position, as a dense [B, G, V] (point masses made explicit).
    q_dense = torch.zeros((b_size, g, vocab_size), device=device)
    has_q = (q_row >= 0) & ~point_mass
    if q is not None and has_q.any():
        gq = min(g, q.shape[1])  # positions past a model-drafted row's γ are never read
        q_dense[has_q, :gq] = q[q_row[has_q].clamp_min(0), :gq, :vocab_size].float()
    if point_mass.any():
        q_dense[point_mass] = (
            torch.nn.functional.one_hot(d[point_mass], vocab_size).float() * in_vocab[point_mass][..., None]
        )

    p_ok = torch.isfinite(p).all(-1)  # [B, G+1]
    q_ok = torch.isfinite(q_dense).all(-1)  # [B, G]
    nonfinite = ((~p_ok & in_row).any(-1) | (~q_ok & is_draft).any(-1)) & active

    p_d = torch.gather(p[:, :g], 2, d[..., None])[..., 0]
    q_d = torch.gather(q_dense, 2, d[..., None])[..., 0]
    u = uniform(seeds.repeat_interleave(g), STREAM_ACCEPT, (positions[:, None] + steps[None, :g]).flatten())
    ok = accept_rule(p_d, q_d, u.view(b_size, g)) & is_draft & in_vocab
    accepted = ok.long().cumprod(-1).sum(-1)  # [B]

    # One race per row, at the position that decides: the first rejection, or the bonus.
    p_at = p[rows, accepted]  # [B, V]
    no_token = ~(torch.where(torch.isfinite(p_at), p_at, 0.0).sum(-1) > 0) & active
    status = torch.where(nonfinite, ROW_NONFINITE, torch.where(no_token, ROW_NO_TOKEN, ROW_OK)).to(torch.int8)
    bad = status != ROW_OK
    q_at = q_dense[rows, accepted.clamp(max=g - 1)] if g else torch.zeros_like(p_at)
    rejected = accepted < num_drafts
    weights = torch.where(rejected[:, None], residual_rule(p_at, q_at), p_at)
    weights = torch.where((weights.sum(-1) > 0)[:, None], weights, p_at)  # no residual mass: fall back to p
    weights = torch.where(torch.isfinite(weights), weights, 0.0)
    noise = -torch.log(uniform(seeds, STREAM_RESAMPLE, positions + accepted, vocab_size))
    choice = (weights / noise).argmax(-1)

    tokens = torch.zeros((b_size, g1), dtype=torch.int64, device=device)
    tokens[:, :g] = torch.where(steps[None, :g] < accepted[:, None], d, 0)
    tokens[rows, accepted] = choice
    tokens = torch.where(in_row, tokens, 0)
    accepted = torch.where(bad, 0, accepted)
    tokens = torch.where(bad[:, None], 0, tokens)
    inactive = ~active
    return (
        torch.where(inactive, 0, accepted),
        torch.where(inactive[:, None], 0, tokens),
        status,
    )


if HAVE_TRITON:

    @triton.jit
    def _position_kernel(
        p_ptr,
        p_stride_b,
        p_stride_g,
        q_ptr,
        q_stride_b,
        q_stride_g,
        q_row_ptr,
        point_mass_ptr,
        draft_ptr,
        num_drafts_ptr,
        active_ptr,
        seed_ptr,
        position_ptr,
        accept_ptr,
        choice_ptr,
        bad_ptr,
        vocab_size,
        G,
        BLOCK: tl.constexpr,
    ):
        """Program (b, i): the acceptance test of d_{i+1} and the race that position i would run
        if it were the one that decides (residual for a draft position, p for the bonus)."""
        b = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        n = tl.load(num_drafts_ptr + b)
        active = tl.load(active_ptr + b) != 0
        if active & (i <= n):
            seed = tl.load(seed_ptr + b)
            position = tl.load(position_ptr + b) + i
            is_draft = i < n
            point_mass = tl.load(point_mass_ptr + b).to(tl.int32)
            q_row = tl.load(q_row_ptr + b)
            read_q = is_draft & (point_mass == 0) & (q_row >= 0)
            d_raw = tl.load(draft_ptr + b * G + i, mask=is_draft, other=0)
            in_vocab_d = (d_raw >= 0) & (d_raw < vocab_size)
            d = tl.minimum(tl.maximum(d_raw, 0), vocab_size - 1)  # for reading p and q only
            p_base = p_ptr + b * p_stride_b + i * p_stride_g
            q_base = q_ptr + q_row * q_stride_b + i * q_stride_g
            # A block-wide copy of the scalar: Triton's interpreter rejects block & scalar masks.
            read_q_flag = read_q.to(tl.int32)
            best_r = float("-inf")
            best_r_index = 0
            best_p = float("-inf")
            best_p_index = 0
            p_mass = 0.0
            r_mass = 0.0
            n_bad = 0
            for start in range(0, vocab_size, BLOCK):
                lanes = start + tl.arange(0, BLOCK)
                in_vocab = lanes < vocab_size
                p = tl.load(p_base + lanes, mask=in_vocab, other=0.0).to(tl.float32)
                q_mask = in_vocab & ((lanes * 0 + read_q_flag) != 0)
                q = tl.load(q_base + lanes, mask=q_mask, other=0.0).to(tl.float32)
                q = tl.where(is_draft & (point_mass != 0) & in_vocab_d & (lanes == d), 1.0, q)
                p_fin = (p == p) & (tl.abs(p) < float("inf"))
                q_fin = (q == q) & (tl.abs(q) < float("inf"))
                n_bad += tl.sum(tl.where(in_vocab & (~p_fin | ~q_fin), 1, 0))
                p = tl.where(p_fin, p, 0.0)
                r = tl.where(is_draft, tl.maximum(tl.where(q_fin, p - q, 0.0), 0.0), p)
                p_mass += tl.sum(p)
                r_mass += tl.sum(r)
                e = -tl.log(philox_uniform(seed, 2, position, lanes))  # STREAM_RESAMPLE
                score_r = tl.where(in_vocab, r / e, float("-inf"))
                score_p = tl.where(in_vocab, p / e, float("-inf"))
                blk = tl.max(score_r, axis=0)
                better = blk > best_r
                best_r_index = tl.where(better, tl.argmax(score_r, axis=0) + start, best_r_index)
                best_r = tl.where(better, blk, best_r)
                blk = tl.max(score_p, axis=0)
                better = blk > best_p
                best_p_index = tl.where(better, tl.argmax(score_p, axis=0) + start, best_p_index)
                best_p = tl.where(better, blk, best_p)
            choice = tl.where(r_mass > 0.0, best_r_index, best_p_index)
            p_d = tl.load(p_base + d)
            q_d = tl.load(q_base + d, mask=read_q, other=0.0)
            q_d = tl.where(point_mass != 0, 1.0, q_d)
            u = philox_uniform(seed, 1, position, position * 0)  # STREAM_ACCEPT, lane 0
            accept = is_draft & in_vocab_d & (u * q_d < p_d)
            # Per position: 2 = a NaN or +inf (any position of the row fails it), 1 = no mass (fails
            # the row only where this position decides), as specdec.kernels.status.
            bad = tl.where(n_bad > 0, 2, tl.where(p_mass <= 0.0, 1, 0))
            tl.store(accept_ptr + b * (G + 1) + i, accept.to(tl.int8))
            tl.store(choice_ptr + b * (G + 1) + i, choice.to(tl.int64))
            tl.store(bad_ptr + b * (G + 1) + i, bad.to(tl.int8))
        else:
            tl.store(accept_ptr + b * (G + 1) + i, tl.zeros([], dtype=tl.int8))
            tl.store(choice_ptr + b * (G + 1) + i, tl.zeros([], dtype=tl.int64))
            tl.store(bad_ptr + b * (G + 1) + i, tl.zeros([], dtype=tl.int8))

    @triton.jit
    def _resolve_kernel(
        accept_ptr,
        choice_ptr,
        bad_ptr,
        draft_ptr,
        num_drafts_ptr,
        active_ptr,
        accepted_ptr,
        tokens_ptr,
        row_bad_ptr,
        vocab_size,
        G,
        G1_BLOCK: tl.constexpr,
    ):
        """Program b: the accepted count, then the row's tokens: drafts, then the decisive choice."""
        b = tl.program_id(0).to(tl.int64)
        n = tl.load(num_drafts_ptr + b)
        active = tl.load(active_ptr + b) != 0
        pos = tl.arange(0, G1_BLOCK)
        in_row = (pos <= n) & ((pos * 0 + active.to(tl.int32)) != 0)
        acc = tl.load(accept_ptr + b * (G + 1) + pos, mask=pos <= G, other=0)
        code = tl.load(bad_ptr + b * (G + 1) + pos, mask=in_row, other=0).to(tl.int32)
        first_reject = tl.min(tl.where((acc == 0) & (pos < n), pos, G1_BLOCK), axis=0)
        accepted = tl.minimum(first_reject, n)
        nonfinite = tl.sum(tl.where(code == 2, 1, 0), axis=0) > 0
        no_token = tl.sum(tl.where((pos == accepted) & (code == 1), 1, 0), axis=0) > 0
        status = tl.where(nonfinite, 2, tl.where(no_token, 1, 0))
        bad = status != 0
        choice = tl.sum(
            tl.where(pos == accepted, tl.load(choice_ptr + b * (G + 1) + pos, mask=pos <= G, other=0), 0),
            axis=0,
        )
        drafts = tl.load(draft_ptr + b * G + pos, mask=pos < n, other=0)
        drafts = tl.minimum(tl.maximum(drafts, 0), vocab_size - 1)
        tokens = tl.where(pos < accepted, drafts, tl.where(pos == accepted, choice, 0))
        tokens = tl.where(in_row & (bad == 0), tokens, 0)
        accepted = tl.where(active & (bad == 0), accepted, 0)
        tl.store(accepted_ptr + b, accepted.to(tl.int64))
        tl.store(tokens_ptr + b * (G + 1) + pos, tokens.to(tl.int64), mask=pos <= G)
        tl.store(row_bad_ptr + b, tl.where(active, status, 0).to(tl.int8))


def rejection_sample_triton(
    p: torch.Tensor,
    q: torch.Tensor | None,
    q_row: torch.Tensor,
    point_mass: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    active: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: int,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of `rejection_sample_reference` (same arguments, same results up to exact
    floating-point ties in the race)."""
    b, g1, _ = p.shape
    g = g1 - 1
    device = p.device
    assert p.stride(-1) == 1 and (q is None or q.stride(-1) == 1)
    if q is None:
        q = p  # never read: no row has model-drafted q
    accept = torch.empty((b, g1), dtype=torch.int8, device=device)
    choice = torch.empty((b, g1), dtype=torch.int64, device=device)
    pos_bad = torch.empty((b, g1), dtype=torch.int8, device=device)
    drafts = (
        draft_tokens.to(torch.int64).contiguous()
        if g
        else torch.zeros((b, 1), dtype=torch.int64, device=device)
    )
    num = num_drafts.to(torch.int64).contiguous()
    act = active.to(torch.int8).contiguous()
    _position_kernel[(b, g1)](
        p, p.stride(0), p.stride(1), q, q.stride(0), q.stride(1),
        q_row.to(torch.int64).contiguous(), point_mass.to(torch.int8).contiguous(), drafts, num, act,
        seeds.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous(),
        accept, choice, pos_bad, vocab_size, g, BLOCK=block,
    )  # fmt: skip
    accepted = torch.empty(b, dtype=torch.int64, device=device)
    tokens = torch.empty((b, g1), dtype=torch.int64, device=device)
    bad = torch.empty(b, dtype=torch.int8, device=device)
    _resolve_kernel[(b,)](
        accept, choice, pos_bad, drafts, num, act, accepted, tokens, bad, vocab_size, g,
        G1_BLOCK=triton.next_power_of_2(g1),
    )  # fmt: skip
    return accepted, tokens, bad
