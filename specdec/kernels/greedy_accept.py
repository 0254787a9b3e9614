"""Batched greedy acceptance over a ragged batch.

For row b with γ_b = num_drafts[b] drafted tokens d_1..d_γ and the target's logits at γ_b + 1
positions: accept drafts while d_i == argmax(logits_i); the row then emits the target's argmax at
the first mismatch (the correction), or at position γ_b + 1 after a full accept (the bonus token).
Because accepted drafts equal the target's argmax, the emitted tokens of row b are exactly
``tokens[b, :accepted[b] + 1]`` where ``tokens`` is the per-position argmax.

Padded vocabulary lanes (>= vocab_size) never win an argmax, and a draft id outside the
vocabulary never matches one. -inf logits are impossible tokens, never bad numbers
(`specdec.kernels.status`): a position where every logit is -inf matches no draft, and if it is
the position that decides the row gets ROW_NO_TOKEN. A NaN or +inf in any of the row's valid
positions gives ROW_NONFINITE. Either way the row's accepted count is 0 and its tokens stay in
[0, vocab_size) (such a position yields id 0); positions past a row's γ_b + 1 hold 0.

Two phases, both Triton: an argmax per (row, position) over the vocabulary (parallel over the whole
[B, G+1] grid, one read of the logits), then a scan per row over at most G+1 positions.
"""

from __future__ import annotations

import torch

from specdec.kernels.philox import HAVE_TRITON
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE, ROW_OK, greedy_scan

if HAVE_TRITON:
    import triton
    import triton.language as tl


def greedy_accept_reference(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    vocab_size: int,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """accepted [B] int64, tokens [B, G+1] int64, status [B] int8 (`specdec.kernels.status`).

    logits [B, G+1, >=V] (raw target logits), draft_tokens [B, G] int64, num_drafts [B] int64 <= G;
    active [B] bool: the greedy rows of a mixed batch (None: all); inactive rows yield zeros."""
    x = logits[..., :vocab_size].float()
    g1 = x.shape[1]
    # [B, G+1] each; masked: no possible token (never also nonfinite: a NaN or +inf is a maximum)
    tokens, nonfinite, masked = greedy_scan(x)
    positions = torch.arange(g1, device=x.device)
    in_row = positions[None, :] <= num_drafts[:, None]
    tokens = torch.where(in_row & ~masked & ~nonfinite, tokens, 0)
    match = (tokens[:, :-1] == draft_tokens) & (positions[None, :-1] < num_drafts[:, None]) & ~masked[:, :-1]
    accepted = match.long().cumprod(dim=-1).sum(dim=-1)
    no_token = masked.gather(1, accepted[:, None])[:, 0]
    status = torch.where(
        (nonfinite & in_row).any(dim=-1), ROW_NONFINITE, torch.where(no_token, ROW_NO_TOKEN, ROW_OK)
    ).to(torch.int8)
    accepted = torch.where(status != ROW_OK, 0, accepted)
    if active is not None:
        accepted = torch.where(active, accepted, 0)
        tokens = torch.where(active[:, None], tokens, 0)
        status = torch.where(active, status, ROW_OK).to(torch.int8)
    return accepted, tokens, status


if HAVE_TRITON:

    @triton.jit
    def _argmax_kernel(
        logits_ptr,
        stride_b,
        stride_p,
        num_drafts_ptr,
        active_ptr,
        argmax_ptr,
        code_ptr,
        vocab_size,
        G1,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        pos = tl.program_id(1)
        n = tl.load(num_drafts_ptr + row)
        if (pos <= n) & (tl.load(active_ptr + row) != 0):
            base = logits_ptr + row * stride_b + pos * stride_p
            best = float("-inf")
            best_index = 0
            n_bad = 0  # NaN or +inf
            n_live = 0  # lanes above -inf: possible tokens
            for start in range(0, vocab_size, BLOCK):
                lanes = start + tl.arange(0, BLOCK)
                in_vocab = lanes < vocab_size
                x = tl.load(base + lanes, mask=in_vocab, other=float("-inf")).to(tl.float32)
                bad = (x != x) | (x == float("inf"))
                n_bad += tl.sum(tl.where(in_vocab & bad, 1, 0))
                n_live += tl.sum(tl.where(in_vocab & ~bad & (x > float("-inf")), 1, 0))
                x = tl.where(bad, float("-inf"), x)
                block_best = tl.max(x, axis=0)
                block_index = tl.argmax(x, axis=0) + start
                better = block_best > best
                best_index = tl.where(better, block_index, best_index)
                best = tl.where(better, block_best, best)
            code = tl.where(n_bad > 0, 2, tl.where(n_live == 0, 1, 0))  # ROW_NONFINITE, ROW_NO_TOKEN
            best_index = tl.where(code != 0, 0, best_index)  # as the reference: such a position yields id 0
            tl.store(argmax_ptr + row * G1 + pos, best_index.to(tl.int64))
            tl.store(code_ptr + row * G1 + pos, code.to(tl.int8))
        else:
            tl.store(argmax_ptr + row * G1 + pos, tl.zeros([], dtype=tl.int64))
            tl.store(code_ptr + row * G1 + pos, tl.zeros([], dtype=tl.int8))

    @triton.jit
    def _scan_kernel(
        argmax_ptr,
        code_ptr,
        draft_ptr,
        num_drafts_ptr,
        active_ptr,
        accepted_ptr,
        status_ptr,
        G,
        G1_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        n = tl.load(num_drafts_ptr + row)
        active = tl.load(active_ptr + row) != 0
        pos = tl.arange(0, G1_BLOCK)
        target = tl.load(argmax_ptr + row * (G + 1) + pos, mask=pos <= G, other=-1)
        code = tl.load(code_ptr + row * (G + 1) + pos, mask=pos <= n, other=0).to(tl.int32)
        drafts = tl.load(draft_ptr + row * G + pos, mask=pos < n, other=-2)
        mismatch = (target != drafts) | (pos >= n) | (code == 1)  # nothing possible matches no draft
        first_mismatch = tl.min(tl.where(mismatch, pos, G1_BLOCK), axis=0)
        accepted = tl.minimum(first_mismatch, n)
        nonfinite = tl.sum(tl.where(code == 2, 1, 0), axis=0) > 0
        no_token = tl.sum(tl.where((pos == accepted) & (code == 1), 1, 0), axis=0) > 0
        status = tl.where(nonfinite, 2, tl.where(no_token, 1, 0))
        status = tl.where(active, status, 0)
        tl.store(accepted_ptr + row, tl.where((status != 0) | ~active, 0, accepted).to(tl.int64))
        tl.store(status_ptr + row, status.to(tl.int8))


def greedy_accept_triton(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    vocab_size: int,
    active: torch.Tensor | None = None,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton twin of `greedy_accept_reference` (same arguments, same results)."""
    b, g1, _ = logits.shape
    if active is None:
        active = torch.ones(b, dtype=torch.bool, device=logits.device)
    act = active.to(torch.int8).contiguous()
    assert logits.stride(-1) == 1, "the vocabulary dimension must be contiguous"
    device = logits.device
    tokens = torch.empty((b, g1), dtype=torch.int64, device=device)
    codes = torch.empty((b, g1), dtype=torch.int8, device=device)  # per position
    accepted = torch.empty(b, dtype=torch.int64, device=device)
    status = torch.empty(b, dtype=torch.int8, device=device)
    num_drafts = num_drafts.to(torch.int64).contiguous()
    _argmax_kernel[(b, g1)](
        logits,
        logits.stride(0),
        logits.stride(1),
        num_drafts,
        act,
        tokens,
        codes,
        vocab_size,
        g1,
        BLOCK=block,
    )
    drafts = draft_tokens.to(torch.int64).contiguous()
    if drafts.shape[1] == 0:  # γ = 0 everywhere: give the scan a valid (never read) pointer
        drafts = torch.zeros((b, 1), dtype=torch.int64, device=device)
    _scan_kernel[(b,)](
        tokens, codes, drafts, num_drafts, act, accepted, status, g1 - 1, G1_BLOCK=triton.next_power_of_2(g1)
    )
    return accepted, tokens, status
