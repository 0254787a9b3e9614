"""The C attention core (specdec/kernels/layer_cpu.py) against SDPA at SmolLM2's attention shape
(9 query heads, 3 KV heads, head_dim 64), for 1 and 5 tokens a pass over contexts up to 4096.

The C call does more than SDPA here - the rotary embedding of q and k and the cache write too -
so the comparison favours SDPA. Also the scalar C loop (the one every other head_dim takes).
Interleaved medians of 41 calls (benches/medians.py), one row, float32, PyTorch's thread count.

    python benches/attention_cpu.py
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import medians  # benches/medians.py, beside this script
import torch
import torch.nn.functional as F

from specdec.kernels.layer_cpu import layer_kernels

HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 9, 3, 64, 4200


def main() -> None:
    kernels = layer_kernels()
    if kernels is None:
        raise SystemExit("the C kernels did not build here")
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(CAPACITY)[:, None] * (10000 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    k_cache = torch.randn(1, KV_HEADS, CAPACITY, HEAD_DIM, generator=g)
    v_cache = torch.randn(1, KV_HEADS, CAPACITY, HEAD_DIM, generator=g)
    print(
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; us per call, one row"
    )
    print("| tokens | context | C, vector loop | C, scalar loop | SDPA (attention only) |")
    print("|---|---|---|---|---|")
    for tokens in (1, 5):
        for context in (128, 512, 2048, 4096):
            ms = time_case(kernels, cos, sin, k_cache, v_cache, tokens, context, g)
            print(
                f"| {tokens} | {context} | {ms['vector'] * 1e3:.0f} | {ms['scalar'] * 1e3:.0f} | "
                f"{ms['sdpa'] * 1e3:.0f} |"
            )


def time_case(kernels, cos, sin, k_cache, v_cache, tokens: int, context: int, g) -> dict[str, float]:
    """Interleaved median ms of the vector loop, the scalar loop and SDPA for one row."""
    qkv = torch.randn(1, tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    start, n_valid, slots = torch.tensor([context - tokens]), torch.tensor([tokens]), torch.tensor([0])
    args = (qkv, HEADS, KV_HEADS, HEAD_DIM, cos, sin, start, n_valid, slots, k_cache, v_cache, context, None)
    scalar = kernels.scalar()
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g)
    k, v = k_cache[:, :, :context], v_cache[:, :, :context]
    mask = torch.ones(1, 1, tokens, context, dtype=torch.bool)
    return medians.interleaved_median_ms(
        {
            "vector": lambda: kernels.attention(*args, 0.125),
            "scalar": lambda: scalar.attention(*args, 0.125),
            "sdpa": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True
            ),
        },
        runs=41,
    )


if __name__ == "__main__":
    main()
