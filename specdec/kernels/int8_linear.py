"""CPU int8's product (Int8LinearCPU) in C, beside its tensor-op reference.

Int8LinearCPU keeps int8 weights with a scale per output channel and quantizes each activation
row on its own scale into two int8 digits (specdec/models/quant_linear.py says why). `int8_linear.c`
does all of it in one call - the digits, both digits' integer products against weights laid out
for it (`pack_weights`), the rescaling - on the fastest integer instructions the CPU has
(AVX-512 VNNI, AVX2, or portable C), split over PyTorch's thread count. It is compiled at first
use (specdec/kernels/native.py) and loaded through ctypes; where no compiler works, or with
SPECDEC_KERNELS=reference, `int8_linear_reference` runs instead. Every path gives bitwise the same
numbers (the integer products are exact; tests/models/test_int8_linear.py holds each to the
reference), so which one ran never changes an output.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import logging
import os
from pathlib import Path

import torch

from specdec.kernels.native import BUILD_ERRORS, built_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_linear.c")
TINY = 1e-30  # floor of a row's maximum: an all-zero row stays zero instead of dividing by 0
CHANNEL_BLOCK, COLUMN_BLOCK = 4, 64  # the packed layout's blocks (int8_linear.c)
_EXACT_COLUMNS = 1024  # float32 sums integer products exactly up to 2^24: 1024 × 127 × 127 < 2^24


class Isa(enum.IntEnum):
    """The C paths, slowest first (`specdec_int8_best_isa` picks the fastest this CPU has)."""

    PORTABLE = 0
    AVX2 = 1
    VNNI = 2


# ----------------------------------------------------------------------------- the layout


def pack_weights(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> the kernel's layout [Np, Kp]: N padded to a multiple of 4 and K to one
    of 64 with zeros, each block of 4 channels interleaved per 64 columns."""
    n, k = codes.shape
    np_, kp = -(-n // CHANNEL_BLOCK) * CHANNEL_BLOCK, -(-k // COLUMN_BLOCK) * COLUMN_BLOCK
    padded = codes.new_zeros(np_, kp)
    padded[:n, :k] = codes
    blocks = padded.reshape(np_ // CHANNEL_BLOCK, CHANNEL_BLOCK, kp // COLUMN_BLOCK, COLUMN_BLOCK)
    return blocks.transpose(1, 2).contiguous().reshape(np_, kp)


def unpack_weights(packed: torch.Tensor) -> torch.Tensor:
    """`pack_weights`' inverse, padding kept: [Np, Kp]."""
    np_, kp = packed.shape
    blocks = packed.reshape(np_ // CHANNEL_BLOCK, kp // COLUMN_BLOCK, CHANNEL_BLOCK, COLUMN_BLOCK)
    return blocks.transpose(1, 2).reshape(np_, kp)


# ----------------------------------------------------------------------------- the reference


def row_digits_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows [R, K] float32 -> (coarse, fine, amax [R, 1]): each row's maximum a (NaN if the row is
    not finite), steps = x × ((1 / a) × 127), coarse = round(steps), fine = round((steps -
    coarse) × 254), both clamped to ±127 - as floats holding integers (a NaN row's are NaN)."""
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True).clamp_(min=TINY)
    amax = torch.where(amax.isfinite(), amax, float("nan"))
    steps = rows * amax.reciprocal().mul_(127.0)
    coarse = torch.round(steps).clamp_(-127.0, 127.0)
    fine = torch.round((steps - coarse).mul_(254.0)).clamp_(-127.0, 127.0)
    return coarse, fine, amax


def _exact_dots(digits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """digits [R, K] × weights [N, K]ᵀ of integer-valued floats, exact: float32 products summed in
    column chunks small enough that every partial sum is an exact float32 integer, the chunks
    added in float64, then rounded once to float32 - as the C converts its exact int32 sums."""
    total = torch.zeros(digits.shape[0], weights.shape[0], dtype=torch.float64)
    for c in range(0, digits.shape[1], _EXACT_COLUMNS):
        total += (digits[:, c : c + _EXACT_COLUMNS] @ weights[:, c : c + _EXACT_COLUMNS].t()).double()
    return total.float().add_(0.0)  # + 0.0: an all-zero sum is +0, as the C's integer is


def int8_linear_reference(
    rows: torch.Tensor, packed: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `specdec_int8_linear` computes, as tensor ops: rows [R, K] float32 against the packed
    weights [Np, Kp] -> [R, Np]: (coarse · w + (fine · w) × (1 / 254)) × ((a × (1 / 127)) ×
    wscale) (+ bias)."""
    k = rows.shape[1]
    weights = unpack_weights(packed)[:, :k].float()
    coarse, fine, amax = row_digits_reference(rows)
    y = _exact_dots(coarse, weights).add_(_exact_dots(fine, weights).mul_(1.0 / 254.0))
    y = y.mul_(amax.mul(1.0 / 127.0) * wscale)
    return y if bias is None else y.add_(bias)


# ----------------------------------------------------------------------------- the C kernel


class Int8Kernel:
    """`specdec_int8_linear` on contiguous CPU tensors, on `isa` (default: the best this CPU has)."""

    def __init__(self, lib: ctypes.CDLL, isa: Isa | None = None):
        i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
        self._linear = lib.specdec_int8_linear
        self._linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, f32, i32, i32]
        self._linear.restype = i32
        self.best = Isa(lib.specdec_int8_best_isa())
        self.isa = self.best if isa is None else isa
        self.lib = lib

    def on(self, isa: Isa) -> Int8Kernel:
        """The same library on another path (the tests run each one this CPU has)."""
        return Int8Kernel(self.lib, isa)

    def linear(
        self,
        rows: torch.Tensor,
        packed: torch.Tensor,
        wsum: torch.Tensor,
        wscale: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """rows [..., K] contiguous float32 -> [..., Np]: any leading shape, taken as its rows
        without a view (a view is a couple of microseconds of dispatch, 120 times a pass)."""
        k = rows.shape[-1]
        r = rows.numel() // k if k else 0
        np_, kp = packed.shape
        assert rows.dtype == torch.float32 and rows.is_contiguous()  # packed: pack_weights' int8
        out = torch.empty((*rows.shape[:-1], np_), dtype=torch.float32)
        status = self._linear(
            rows.data_ptr(),
            r,
            k,
            kp,
            packed.data_ptr(),
            wsum.data_ptr(),
            wscale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            np_,
            out.data_ptr(),
            TINY,
            torch.get_num_threads(),
            int(self.isa),
        )
        if status != 0:
            raise MemoryError(f"int8 product of {r} rows x {k} columns: scratch allocation failed")
        return out


class _Reference:
    isa = None

    @staticmethod
    def linear(rows, packed, wsum, wscale, bias):  # wsum is the VNNI path's; the reference needs none
        flat = int8_linear_reference(rows.reshape(-1, rows.shape[-1]), packed, wscale, bias)
        return flat.reshape(*rows.shape[:-1], packed.shape[0])


REFERENCE = _Reference()


@functools.cache
def int8_kernel() -> Int8Kernel | _Reference:
    """The C kernel if it builds and loads here, else the reference (logged once, with why)."""
    if os.environ.get("SPECDEC_KERNELS") == "reference":
        return REFERENCE
    try:
        kernel = Int8Kernel(ctypes.CDLL(str(built_library(SOURCE))))
    except BUILD_ERRORS as e:
        log.warning(
            "int8 on the CPU: the C kernel did not build (%s); using the tensor-op reference "
            "(the same numbers, much slower: --quantize none is faster here)",
            e,
        )
        return REFERENCE
    log.info("int8 on the CPU: the C kernel's %s path", kernel.isa.name)
    return kernel
