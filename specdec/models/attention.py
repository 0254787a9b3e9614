"""Attention behind one small interface.

Every backend computes, for q [B, H, T, D] against the row's gathered cache k/v [B, KVH, L, D]
under a boolean mask [B, 1, T, L] (True = attend), softmax(q k^T * scale [soft-capped]) v.

- ``sdpa``: torch's scaled_dot_product_attention, the fast path on CPU and GPU.
- ``math``: explicit matmul-softmax-matmul; the only one that can soft-cap scores (Gemma 2), and
  the readable reference for the others.

flash-attn's ``flash_attn_with_kvcache`` would slot in here for users who have it installed; it is
never required (no wheel exists for the machines this project is tested on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# torch >= 2.5 broadcasts grouped KV heads inside SDPA.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, "float | None"], torch.Tensor
]


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    batch, heads, t, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # Group the query heads over their shared KV head instead of copying k/v `group` times.
    qg = q.reshape(batch, kv_heads, group, t, d)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, KVH, G, T, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v.unsqueeze(2))  # [B, KVH, G, T, D]
    return out.reshape(batch, heads, t, d)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    if softcap is not None:
        raise ValueError("SDPA cannot soft-cap attention scores; use the 'math' backend")
    if k.shape[1] != q.shape[1]:
        if _SDPA_GQA:
            # SDPA broadcasts the KV heads itself: no copy of k and v per query head.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "math": math_attention}


def select_backend(name: str, needs_softcap: bool) -> AttentionFn:
    """The backend called `name` ("auto" picks sdpa unless scores must be soft-capped)."""
    if name == "auto":
        name = "math" if needs_softcap else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    if needs_softcap and name == "sdpa":
        raise ValueError("this model soft-caps attention scores, which SDPA cannot; use 'math' or 'auto'")
    return BACKENDS[name]
