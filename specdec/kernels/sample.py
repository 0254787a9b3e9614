"""Draw one token per row: greedy argmax of the raw logits, or a sample from the transformed
probabilities. Used for the draft's proposals and for draft-only decoding.

Sampling is an exponential race: token = argmax_v p_v / E_v with E_v = -log(u_v) ~ Exp(1), which picks
v with probability p_v / sum(p) - no normalisation and no cumulative sum, one read of p. The u_v
are Philox uniforms keyed on (seed, stream, position, v) (see philox.py).

Both paths mask lanes >= vocab_size (padded vocabulary). -inf logits are impossible tokens, never
bad numbers: a row with a NaN or +inf gets ROW_NONFINITE, a row with no possible token (every
logit -inf, or probabilities that sum to zero) ROW_NO_TOKEN (`specdec.kernels.status`); such a row
yields id 0.
"""

from __future__ import annotations

import torch

from specdec.kernels.philox import HAVE_TRITON, uniform
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE, ROW_OK, greedy_scan

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from specdec.kernels.philox import philox_uniform


def sample_reference(
    logits: torch.Tensor,
    probs: torch.Tensor | None,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    stream: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N] int64 and status [N] int8.

    logits [N, >=V] raw (greedy rows), probs [N, V] transformed (sampled rows; None if all greedy),
    greedy [N] bool, seeds/positions [N] int64 keys of the draw."""
    tokens, nonfinite, no_token = greedy_scan(logits[:, :vocab_size].float())
    if probs is not None:
        sampled = ~greedy
        rows = sampled.nonzero().squeeze(1)
        if rows.numel():
            p = probs[rows, :vocab_size].float()
            p_nonfinite = ~torch.isfinite(p).all(dim=-1)
            u = uniform(seeds[rows], stream, positions[rows], vocab_size)
            scores = torch.where(torch.isfinite(p), p, 0.0) / -torch.log(u)
            tokens[rows] = scores.argmax(dim=-1)
            nonfinite[rows] = p_nonfinite
            no_token[rows] = ~(torch.where(torch.isfinite(p), p, 0.0).sum(dim=-1) > 0)
    status = torch.where(nonfinite, ROW_NONFINITE, torch.where(no_token, ROW_NO_TOKEN, ROW_OK)).to(torch.int8)
    return torch.where(status != ROW_OK, 0, tokens), status


if HAVE_TRITON:

    @triton.jit
    def _sample_kernel(
        logits_ptr,
        logits_stride,
        probs_ptr,
        probs_stride,
        greedy_ptr,
        seed_ptr,
        position_ptr,
        tokens_ptr,
        status_ptr,
        stream,
        vocab_size,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        greedy = tl.load(greedy_ptr + row) != 0
        seed = tl.load(seed_ptr + row)
        position = tl.load(position_ptr + row)
        best = float("-inf")
        best_index = 0
        n_bad = 0  # NaN or +inf
        n_live = 0  # greedy: lanes above -inf
        total = 0.0  # sampled: probability mass
        for start in range(0, vocab_size, BLOCK):
            lanes = start + tl.arange(0, BLOCK)
            in_vocab = lanes < vocab_size
            if greedy:
                x = tl.load(logits_ptr + row * logits_stride + lanes, mask=in_vocab, other=float("-inf")).to(
                    tl.float32
                )
                bad = (x != x) | (x == float("inf"))
                n_bad += tl.sum(tl.where(in_vocab & bad, 1, 0))
                n_live += tl.sum(tl.where(in_vocab & ~bad & (x > float("-inf")), 1, 0))
                score = tl.where(bad, float("-inf"), x)
            else:
                p = tl.load(probs_ptr + row * probs_stride + lanes, mask=in_vocab, other=0.0).to(tl.float32)
                ok = (p == p) & (tl.abs(p) < float("inf"))
                n_bad += tl.sum(tl.where(in_vocab & ~ok, 1, 0))
                p = tl.where(ok, p, 0.0)
                total += tl.sum(p)
                u = philox_uniform(seed, stream, position, lanes)
                score = tl.where(in_vocab, p / -tl.log(u), float("-inf"))
            block_best = tl.max(score, axis=0)
            block_index = tl.argmax(score, axis=0) + start
            better = block_best > best
            best_index = tl.where(better, block_index, best_index)
            best = tl.where(better, block_best, best)
        empty = tl.where(greedy, n_live == 0, total <= 0.0)
        status = tl.where(n_bad > 0, 2, tl.where(empty, 1, 0))  # ROW_NONFINITE, ROW_NO_TOKEN
        best_index = tl.where(status != 0, 0, best_index)
        tl.store(tokens_ptr + row, tl.minimum(tl.maximum(best_index, 0), vocab_size - 1).to(tl.int64))
        tl.store(status_ptr + row, status.to(tl.int8))


def sample_triton(
    logits: torch.Tensor,
    probs: torch.Tensor | None,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    stream: int,
    vocab_size: int,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of `sample_reference` (same arguments, same results up to exact float ties)."""
    n = logits.shape[0]
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    status = torch.empty(n, dtype=torch.int8, device=logits.device)
    if probs is None:
        probs = logits  # never read: every row is greedy
    assert logits.stride(-1) == 1 and probs.stride(-1) == 1
    _sample_kernel[(n,)](
        logits,
        logits.stride(0),
        probs,
        probs.stride(0),
        greedy.to(torch.int8),
        seeds.to(torch.int64),
        positions.to(torch.int64),
        tokens,
        status,
        stream,
        vocab_size,
        BLOCK=block,
    )
    return tokens, status
