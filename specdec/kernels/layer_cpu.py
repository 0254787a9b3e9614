"""A decoder layer's float32 work between its products, in C on the CPU (`layer_cpu.c`).

- `attention`: what `Attention.forward` (specdec/models/decoder.py) does between its two
  products - the rotary embedding of q and k, the cache write, and softmax(q kᵀ × scale) v against
  each row's own slot - in one call instead of a dozen tensor ops. At a decode's width those ops
  are mostly dispatch (about 0.1 ms a layer of SmolLM2 here, docs/QUANTIZATION.md). Each query
  token is computed alone, in a fixed order, so a row's output is bitwise the same at any batch
  size and pass width; for head_dim 64 and 128 a vector loop (AVX-512, AVX2 or SSE, chosen at
  load) reads each cached row once for all the queries of a KV head, with bitwise the scalar
  loop's numbers (`scalar()`). Used for passes of at most `MAX_TOKENS` tokens a row (decodes,
  verifies, catch-ups); prefills keep SDPA, whose blocked kernels are faster over long prompts.
  Measured against SDPA on SmolLM2's shapes here: faster for one token at every context up to
  4096, about even for 5 tokens past 2048 positions (docs/QUANTIZATION.md).
- `rms_norm`: RMSNorm, one call (torch's F.rms_norm is about 25 us for one 576-wide row here,
  RMSNorm's call of this about 10).
- `silu_mul`: silu(gate) × up from the fused gate/up output (chunk, silu and a product in torch).

The decoder's tensor ops are their reference (tests/models/test_layer_cpu.py). Compiled at first
use (specdec/kernels/native.py); where no compiler works, or with SPECDEC_KERNELS=reference, the
tensor ops run.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from specdec.kernels.native import BUILD_ERRORS, built_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("layer_cpu.c")
MAX_TOKENS = 16  # a row's tokens in a pass this kernel takes (a verify of γ + 1 <= 16)
MAX_HEAD_DIM = 512  # the C's bound on head_dim


class LayerKernels:
    """`layer_cpu.c`'s functions on contiguous float32 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, portable: bool = False):
        i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
        self.lib, self.portable = lib, portable
        self._attention = lib.specdec_attention
        self._attention.argtypes = [ptr, *[i64] * 6, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, *[i64] * 3]
        self._attention.argtypes += [f32, ptr, i32, i32]
        self._attention.restype = i32
        self._rms_norm = lib.specdec_rms_norm
        self._rms_norm.argtypes = [ptr, ptr, i64, i64, f32, ptr]
        self._rms_norm.restype = None
        self._silu_mul = lib.specdec_silu_mul
        self._silu_mul.argtypes = [ptr, i64, i64, ptr, i32]
        self._silu_mul.restype = None

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) × up for gate_up [..., 2 I] (the fused projection's output; float32)."""
        gate_up = gate_up.contiguous()
        n = gate_up.shape[-1] // 2
        out = torch.empty((*gate_up.shape[:-1], n), dtype=torch.float32)
        rows = gate_up.numel() // (2 * n) if n else 0
        self._silu_mul(gate_up.data_ptr(), rows, n, out.data_ptr(), torch.get_num_threads())
        return out

    def scalar(self) -> LayerKernels:
        """The same library with attention's scalar loop for every head_dim (the vector one,
        for head_dim 64 and 128, must give its numbers bitwise: the tests compare them)."""
        return LayerKernels(self.lib, portable=True)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over x's last dimension (x and weight float32; the weight contiguous)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        n = weight.shape[0]
        self._rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps, out.data_ptr())
        return out

    def attention(
        self,
        qkv: torch.Tensor,
        heads: int,
        kv_heads: int,
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: torch.Tensor,
        n_valid: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_len: int,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """qkv [B, T, (H + 2 KVH) × D] (the fused projection's output; or viewed by head); cos,
        sin [positions, rotary_dim] (the whole tables); start, n_valid, slots [B] int64; one
        layer's cache k, v [slots, KVH, capacity, D], written in place. Returns [B, T, H × D]."""
        b, t, d = qkv.shape[0], qkv.shape[1], head_dim
        assert qkv.numel() == b * t * (heads + 2 * kv_heads) * d and qkv.is_contiguous()
        assert qkv.dtype == k_cache.dtype == torch.float32 and k_cache.is_contiguous()
        assert start.dtype == n_valid.dtype == slots.dtype == torch.int64  # and contiguous (_context)
        out = torch.empty((b, t, heads * d), dtype=torch.float32)
        status = self._attention(
            qkv.data_ptr(),
            b,
            t,
            heads,
            kv_heads,
            d,
            cos.shape[1],
            cos.data_ptr(),
            sin.data_ptr(),
            cos.shape[0],
            start.data_ptr(),
            n_valid.data_ptr(),
            slots.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.shape[2],
            kv_len,
            window or 0,
            scale,
            out.data_ptr(),
            torch.get_num_threads(),
            self.portable,
        )
        if status != 0:
            raise MemoryError(f"CPU attention over {kv_len} positions: scratch allocation failed")
        return out


@functools.cache
def layer_kernels() -> LayerKernels | None:
    """The C kernels if they build and load here, else None (logged once, with why)."""
    if os.environ.get("SPECDEC_KERNELS") == "reference":
        return None
    try:
        return LayerKernels(ctypes.CDLL(str(built_library(SOURCE))))
    except BUILD_ERRORS as e:
        log.warning("CPU float32 layers: the C kernels did not build (%s); using tensor ops (slower)", e)
        return None
