"""Draw one token per row: greedy argmax of the raw logits, or a sample from the transformed
probabilities. Used for the draft's proposals and for draft-only decoding.

Sampling is an exponential race: token = argmax_v p_v / E_v with E_v = -log(u_v) ~ Exp(1), which picks
v with probability p_v / sum(p) - no normalisation and no cumulative sum, one read of p. The u_v
are Philox uniforms keyed on (seed, stream, position, v) (see philox.py).

Both paths mask lanes >= vocab_size (padded vocabulary) and flag rows whose numbers are not finite
or whose probabilities sum to zero; a flagged row still yields an id inside [0, vocab_size).
"""

from __future__ import annotations

import torch

from specdec.kernels.philox import HAVE_TRITON, uniform_reference

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
    """tokens [N] int64 and bad [N] bool.

    logits [N, >=V] raw (greedy rows), probs [N, V] transformed (sampled rows; None if all greedy),
    greedy [N] bool, seeds/positions [N] int64 keys of the draw."""
    raw = logits[:, :vocab_size].float()
    raw_ok = torch.isfinite(raw).all(dim=-1)
    tokens = torch.where(raw_ok[:, None], raw, float("-inf")).argmax(dim=-1)
    bad = ~raw_ok
    if probs is not None:
        sampled = ~greedy
        rows = sampled.nonzero().squeeze(1)
        if rows.numel():
            p = probs[rows, :vocab_size].float()
            p_ok = torch.isfinite(p).all(dim=-1) & (p.sum(dim=-1) > 0)
            u = uniform_reference(seeds[rows], stream, positions[rows], vocab_size)
            scores = torch.where(p_ok[:, None], p, 0.0) / -torch.log(u)
            tokens[rows] = scores.argmax(dim=-1)
            bad[rows] = ~p_ok
    return tokens.clamp_(0, vocab_size - 1), bad


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
        bad_ptr,
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
        n_bad = 0
        total = 0.0
        for start in range(0, vocab_size, BLOCK):
            lanes = start + tl.arange(0, BLOCK)
            in_vocab = lanes < vocab_size
            if greedy:
                x = tl.load(logits_ptr + row * logits_stride + lanes, mask=in_vocab, other=float("-inf")).to(
                    tl.float32
                )
                ok = (x == x) & (tl.abs(x) < float("inf"))
                n_bad += tl.sum(tl.where(in_vocab & ~ok, 1, 0))
                score = tl.where(ok, x, float("-inf"))
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
        bad = (n_bad > 0) | ((greedy == 0) & (total <= 0.0))
        best_index = tl.where(bad, 0, best_index)
        tl.store(tokens_ptr + row, tl.minimum(tl.maximum(best_index, 0), vocab_size - 1).to(tl.int64))
        tl.store(bad_ptr + row, bad.to(tl.int8))


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
    bad = torch.empty(n, dtype=torch.int8, device=logits.device)
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
        bad,
        stream,
        vocab_size,
        BLOCK=block,
    )
    return tokens, bad.bool()
