"""Quantized weights: the quantizers, their dequantizing references, and the modules that multiply.

Two formats, each with a pure-PyTorch reference (`dequantize_int8`, `dequantize_int4`) that the
tests hold the fast paths to:

- **int8**: one code per weight, one float scale per output channel (row): w = code × scale.
- **int4**: codes 0..15 in groups of `INT4_GROUP` (32) along the input dimension, a scale and a
  zero per group: w = (code - 8) × scale + zero. That is PyTorch's int4 layout (the zero is the
  value at code 8), and GGUF's Q4_1 (w = m + q·d: zero = m + 8d) and Q4_0 (w = (q - 8)·d: zero 0)
  blocks of 32 are exactly this. The quantizer tries both a Q4_1-like (min/max) and a Q4_0-like
  (signed absmax / -8) grid per group and keeps the closer, so weights dequantized from either
  kind of block come back to the same codes (`tests/models/test_quantized.py`).

How each format multiplies, by device (docs/QUANTIZATION.md has the measurements behind this):

- int8 on the CPU: our own product (specdec/kernels/int8_linear.c), which quantizes the
  activations too, each row on its own scale - divided by its absolute maximum and put on a grid
  of 127 steps - as two int8 digits: the row rounded to that grid, and what the rounding lost on a
  grid 254 times finer. One digit is not enough: an outlier channel sets a row's scale and LLM
  activations have them (SmolLM2: KL 0.053 from float32 with one digit, 0.005 with two, as
  weight-only int8; docs/QUANTIZATION.md). The integer products are exact and a row is never
  scaled with another, so a row's output is bitwise the same in any batch at any width: a verify
  pass of 5 rows rounds the target exactly as its 1-row decode does, and speculative output stays
  the quantized target's. One C call does the digits, both products (the weights read once for
  every row) and the rescaling; its tensor-op reference runs where no C compiler works.
  (PyTorch's fbgemm path, `quantized::linear_dynamic`, has one activation scale per tensor - not
  batch-invariant - and made each product three calls; docs/QUANTIZATION.md has the timings.)
- int8 on CUDA: weight-only (`aten._weight_int8pack_mm`; activations stay bf16).
- int4 on the CPU: `aten._weight_int4pack_mm_for_cpu`, weight-only. On the machines measured it
  is slower than fp32: int4 on the CPU is for memory, not speed.
- int4 on CUDA: `aten._weight_int4pack_mm` (tinygemm), its own packed layout, made at load.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from specdec.kernels.int8_linear import int8_kernel, pack_weights, unpack_weights

INT4_GROUP = 32  # GGUF's Q4_0 / Q4_1 block; divides every hidden size in the seed table
_TINY = 1e-30  # floor of a scale: an all-zero row or group stays zero instead of dividing by 0

# ----------------------------------------------------------------------------- quantizers


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scale float32 [N]): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=_TINY)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """(codes uint8 [N, K] in 0..15, scale float32 [N, K/group], zero float32 [N, K/group]), with
    w ≈ (code - 8) × scale + zero; per group the closer of a min/max and a signed-absmax grid."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 needs in_features divisible by {group}, got {k}")
    w = weight.detach().float().reshape(n, k // group, group)
    # Q4_1-like: the group's min at code 0, its max at code 15.
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale_a = ((hi - lo) / 15).clamp(min=_TINY)
    codes_a = torch.round((w - lo) / scale_a).clamp(0, 15)
    zero_a = lo + 8 * scale_a
    # Q4_0-like: the value of largest magnitude at code 0 (= -8 × scale), zero 0.
    peak = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
    scale_s = peak / -8
    scale_s = torch.where(scale_s.abs() < _TINY, torch.full_like(scale_s, _TINY), scale_s)
    codes_s = torch.round(w / scale_s + 8).clamp(0, 15)
    zero_s = torch.zeros_like(scale_s)
    err_a = ((codes_a - 8) * scale_a + zero_a - w).pow(2).sum(-1, keepdim=True)
    err_s = ((codes_s - 8) * scale_s - w).pow(2).sum(-1, keepdim=True)
    pick_s = err_s < err_a
    codes = torch.where(pick_s, codes_s, codes_a).to(torch.uint8).reshape(n, k)
    scale = torch.where(pick_s, scale_s, scale_a).squeeze(-1)
    zero = torch.where(pick_s, zero_s, zero_a).squeeze(-1)
    return codes, scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    groups = scale.shape[1]
    q = codes.reshape(n, groups, k // groups).float()
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


# ----------------------------------------------------------------------------- int8 on the CPU


class Int8LinearCPU(nn.Module):
    """y = x Wᵀ + b with int8 weights and per-row int8 activations in two digits (the C kernel of
    specdec/kernels/int8_linear.py); see the module docstring for why each row is scaled alone."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.packed = pack_weights(codes)  # [Np, Kp]: channels padded to 4, columns to 64
        padded = self.packed.shape[0]
        # The VNNI path multiplies the digits shifted by 128 and takes 128 × Σw back off.
        self.wsum = unpack_weights(self.packed).sum(dim=1, dtype=torch.int32)
        self.wscale = torch.zeros(padded, dtype=torch.float32)
        self.wscale[: self.out_features] = scale.float()
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(padded, dtype=torch.float32)
            self.bias[: self.out_features] = bias.float()
        self.kernel = int8_kernel()  # C if it builds here, else the tensor-op reference
        self.stored_bytes = _bytes(self.packed) + _bytes(self.wsum) + _bytes(self.wscale) + _bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            return self.forward(x.float().contiguous()).to(x.dtype)
        # The common case in as few ops as it takes: each costs a few microseconds of dispatch
        # here, and a SmolLM2 pass makes 120 of these calls.
        y = self.kernel.linear(x, self.packed, self.wsum, self.wscale, self.bias)
        if y.shape[-1] != self.out_features:  # channels padded to 4: cut, kept contiguous
            y = y[..., : self.out_features].contiguous()
        return y


# ----------------------------------------------------------------------------- weight-only paths


class Int8LinearWeightOnly(nn.Module):
    """int8 weights, activations in the compute dtype (CUDA): `aten._weight_int8pack_mm`."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = bias
        self.stored_bytes = codes.numel() + _bytes(self.scale) + _bytes(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if _has_int8pack_mm(self.codes.device.type, self.scale.dtype):
            y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        else:  # a PyTorch build without the kernel for this device: the reference, weights widened
            y = torch.mm(flat, self.codes.t().to(flat.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@functools.cache
def _has_int8pack_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this PyTorch has `_weight_int8pack_mm` for the device and activation dtype."""
    try:
        codes = torch.ones(8, 32, dtype=torch.int8, device=device_type)
        x = torch.ones(1, 32, dtype=dtype, device=device_type)
        torch.ops.aten._weight_int8pack_mm(x, codes, torch.ones(8, dtype=dtype, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int4Linear(nn.Module):
    """int4 weights in groups, activations in the compute dtype: PyTorch's packed int4 matmul
    (`_weight_int4pack_mm_for_cpu` on the CPU, tinygemm's `_weight_int4pack_mm` on CUDA)."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        n, k = codes.shape
        self.in_features, self.out_features = k, n
        # The packed ops want N a multiple of 16: pad with zero rows, cut from the output.
        self.padded = -n % 16
        if self.padded:
            codes = torch.cat([codes, codes.new_full((self.padded, k), 8)])
            scale = torch.cat([scale, scale.new_zeros(self.padded, scale.shape[1])])
            zero = torch.cat([zero, zero.new_zeros(self.padded, zero.shape[1])])
        self.group = k // scale.shape[1]
        self.cuda = codes.device.type == "cuda"
        if self.cuda:
            tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8), tiles
            )
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        self.register_buffer("packed", packed)
        # [K/group, N, 2]: scale and zero of each group, in the activations' dtype.
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        )
        self.bias = bias
        self.stored_bytes = _bytes(packed) + _bytes(self.scales_and_zeros) + _bytes(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.cuda:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed, self.group, self.scales_and_zeros
            )
        if self.padded:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------- embeddings


class Int8Embedding(nn.Module):
    """Rows of an int8 table (codes [V, K], a scale per row), dequantized as they are gathered.
    A tied head's table is this one: the head multiplies by it, the embedding reads rows of it -
    on the CPU straight from the head's packed layout (`reading`), so the codes are stored once."""

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, width: int | None = None
    ):
        super().__init__()
        self.register_buffer("codes", codes)  # [V, K], or CPU int8's packed [Vp, Kp] when `width`
        self.register_buffer("scale", scale)
        self.dtype = dtype
        self.width = width  # K of a packed table; None for plain codes
        self.stored_bytes = 0 if width is not None else codes.numel() + scale.numel() * 4

    @classmethod
    def reading(cls, head: Int8LinearCPU, dtype: torch.dtype) -> Int8Embedding:
        """The embedding over a CPU int8 head's own table (nothing stored twice: 28 MB less for
        SmolLM2's 49152 × 576 table than a plain copy)."""
        return cls(head.packed, head.wscale, dtype, width=head.in_features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            rows = self.codes[ids]
        else:  # row v is block v // 4, lane v % 4, of each 64-column chunk (pack_weights)
            np_, kp = self.codes.shape
            blocks = self.codes.view(np_ // 4, kp // 64, 4, 64)
            rows = blocks[ids // 4, :, ids % 4].reshape(*ids.shape, kp)[..., : self.width]
        return (rows.float() * self.scale[ids].unsqueeze(-1)).to(self.dtype)
