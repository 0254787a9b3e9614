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

- int8 on the CPU: fbgemm's dynamic int8 linear (`quantized::linear_dynamic`), which quantizes
  the activations too. It picks one activation scale for the whole input tensor, so a row's
  numbers would depend on the other rows in the pass: a verify pass of 5 rows would round the
  target's activations differently from a 1-row decode, and speculative output would drift from
  the target alone. We make the scale per row: each row is divided by its own absolute maximum
  and two guard columns (+1, -1, against zero weights) are appended, so every pass's activations
  span exactly [-1, 1] and fbgemm's tensor-wide scale is one constant. Each row is then quantized
  alone, the integer products are exact, and the row's output is bitwise the same in any batch at
  any width. A row goes in as two 8-bit digits (the row on fbgemm's grid, and what that rounding
  lost), both in the one call, so the activations lose next to nothing. That per-row arithmetic
  runs in C (specdec/kernels/int8_rows.c, one call before the product and one after), bitwise
  equal to its tensor-op reference, which runs where no C compiler works.
- int8 on CUDA: weight-only (`aten._weight_int8pack_mm`; activations stay bf16).
- int4 on the CPU: `aten._weight_int4pack_mm_for_cpu`, weight-only. On the machines measured it
  is slower than fp32: int4 on the CPU is for memory, not speed.
- int4 on CUDA: `aten._weight_int4pack_mm` (tinygemm), its own packed layout, made at load.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from specdec.errors import SpecdecError
from specdec.kernels.int8_rows import row_kernels

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


@functools.cache
def fbgemm_full_range() -> bool:
    """Whether fbgemm's int8 kernels multiply full-range (0..255) activations without saturating.

    Without VNNI, x86 kernels add pairs of u8 × s8 products in int16, which 255 × 127 × 2
    overflows; PyTorch's `reduce_range` (7-bit activations) avoids that at a cost in precision. The
    CPU is asked directly: products that would saturate are checked against their exact sum."""
    k = 64
    codes = torch.full((16, k), 127, dtype=torch.int8)
    packed = _pack_fbgemm(codes, torch.ones(16))
    x = torch.ones(1, k + 2)
    x[0, k + 1] = -1  # the guard pair as in use; the weights there are zero
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    # Rounding 1.0 to 8 bits is off by under 1%; a saturated sum is off by half.
    return bool(torch.allclose(y, torch.full_like(y, 127.0 * k), rtol=0.02))


def _pack_fbgemm(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed weight for int8 codes [N, K] and scales [N], with two zero guard columns."""
    n = codes.shape[0]
    guarded = torch.cat([codes, codes.new_zeros(n, 2)], dim=1)
    with warnings.catch_warnings():
        # PyTorch marks its quantized tensor type deprecated; fbgemm's packing still takes one.
        warnings.simplefilter("ignore", UserWarning)
        engine = torch.backends.quantized.engine
        try:
            qweight = torch._make_per_channel_quantized_tensor(
                guarded, scale.double(), torch.zeros(n, dtype=torch.long), 0
            )
            # fbgemm itself rather than PyTorch's default "x86" engine, which may hand the product
            # to oneDNN and keeps a cached primitive per input shape: ~17 MB per layer and row
            # count, which grew a serving process by gigabytes as prompt lengths varied. The packed
            # weight carries its engine, so the global setting is only borrowed while packing.
            if "fbgemm" in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = "fbgemm"
            return torch.ops.quantized.linear_prepack(qweight, None)
        except RuntimeError as e:
            raise SpecdecError(
                f"int8 on the CPU needs PyTorch's quantized engine (fbgemm on x86; this one is "
                f"{torch.backends.quantized.engine!r}) to pack int8 weights per channel: {e}; "
                "use --quantize none or int4 here"
            ) from e
        finally:
            torch.backends.quantized.engine = engine


class Int8LinearCPU(nn.Module):
    """y = x Wᵀ + b with int8 weights and per-row dynamic int8 activations (fbgemm); see the
    module docstring for why each row is scaled alone."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.packed = _pack_fbgemm(codes, scale)
        self.reduce_range = not fbgemm_full_range()
        # fbgemm's grid over [-1, 1] is the multiples k / levels of 2 / 255 (2 / 127 with
        # reduce_range), k in [-top, top] on both sides of its zero point, whether that is 127 or 128.
        self.levels = 63.5 if self.reduce_range else 127.5
        self.top = 63 if self.reduce_range else 127
        self.bias = None if bias is None else bias.float().contiguous()
        self.rows = row_kernels()  # the per-row arithmetic: C if it builds here, else tensor ops
        # fbgemm's packed copy: a code per weight (guard columns too), and column offsets and scales.
        self.stored_bytes = codes.shape[0] * (codes.shape[1] + 2) + 12 * codes.shape[0] + _bytes(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k = x.shape, x.shape[-1]
        rows = x.reshape(-1, k).float().contiguous()  # [R, K]
        # Each row on its own scale, in units of fbgemm's step over its fixed [-1, 1] range, as
        # two 8-bit digits: the row rounded to that grid (which fbgemm then holds exactly), and
        # what the rounding lost (|.| <= 1/2 a step). One digit is not enough: an outlier channel
        # sets a row's scale and LLM activations have them (SmolLM2: KL 0.053 from float32 with
        # one digit, 0.005 with two, as weight-only int8; docs/QUANTIZATION.md). The guard columns
        # (+1, -1) end every row, so the pass's range is exactly [-1, 1].
        digits = torch.empty(2 * rows.shape[0], k + 2, dtype=torch.float32)  # [2R, K + 2]
        amax = self.rows.row_digits(rows, self.levels, self.top, digits)
        # Both digits in one call: the weights are read once, as for R rows.
        both = torch.ops.quantized.linear_dynamic(digits, self.packed, self.reduce_range)  # [2R, N]
        y = self.rows.combine(both, amax, self.bias, self.levels)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


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
    A tied head's table is this one: the head multiplies by it, the embedding reads rows of it."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.dtype = dtype
        self.stored_bytes = codes.numel() + scale.numel() * 4

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[ids].float() * self.scale[ids].unsqueeze(-1)).to(self.dtype)
