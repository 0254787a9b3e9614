"""The per-row arithmetic around fbgemm's int8 product (Int8LinearCPU), in C beside its reference.

Int8LinearCPU scales each row by its own maximum and splits it into two 8-bit digits before
fbgemm multiplies, then recombines the two products after (specdec/models/quant_linear.py says
why). As tensor ops that is about ten small ops per product, each a dispatch, and at a decode's
width they cost more than fbgemm's products themselves (docs/QUANTIZATION.md). `int8_rows.c` does
each side in one call. It is compiled at first use with the system's C compiler (`$CC`, else
`cc`) into specdec's cache and loaded through ctypes; where no compiler works, or with
SPECDEC_KERNELS=reference, the tensor-op reference below runs instead. The two are bitwise equal
(tests/models/test_int8_rows.py), so which one ran never changes an output.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from specdec.cache import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_rows.c")
# No fused multiply-add and no fast-math: the C must round exactly where the reference does.
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
TINY = 1e-30  # floor of a row's maximum: an all-zero row stays zero instead of dividing by 0


# ----------------------------------------------------------------------------- the reference


def row_digits_reference(rows: torch.Tensor, levels: float, top: float, out: torch.Tensor) -> torch.Tensor:
    """rows [R, K] float32 -> out [2R, K + 2] (the two digits, each row ending in the guard pair
    +1, -1); returns amax [R, 1]. What `specdec_int8_row_digits` computes, as tensor ops."""
    r, k = rows.shape
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True).clamp_(min=TINY)
    steps = rows * amax.reciprocal().mul_(levels)  # [R, K] in [-levels, levels]
    coarse = torch.round(steps).clamp_(-top, top)
    out[:, k] = 1.0
    out[:, k + 1] = -1.0
    torch.mul(coarse, 1.0 / levels, out=out[:r, :k])
    torch.sub(steps, coarse, out=out[r:, :k])
    return amax


def combine_reference(
    both: torch.Tensor, amax: torch.Tensor, bias: torch.Tensor | None, levels: float
) -> torch.Tensor:
    """both [2R, N] -> [R, N]: (fine / levels + coarse) × amax (+ bias), in place in both's fine
    half. What `specdec_int8_row_combine` computes, as tensor ops."""
    r = both.shape[0] // 2
    y = both[r:].mul_(1.0 / levels).add_(both[:r]).mul_(amax)
    return y if bias is None else y.add_(bias)


# ----------------------------------------------------------------------------- the C kernel


class RowKernels:
    """The two C functions, called on contiguous float32 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL):
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        self._digits = lib.specdec_int8_row_digits
        self._digits.argtypes = [ptr, i64, i64, f32, f32, f32, f32, ptr, ptr]
        self._digits.restype = None
        self._combine = lib.specdec_int8_row_combine
        self._combine.argtypes = [ptr, i64, i64, ptr, ptr, f32, ptr]
        self._combine.restype = None

    def row_digits(self, rows: torch.Tensor, levels: float, top: float, out: torch.Tensor) -> torch.Tensor:
        r, k = rows.shape
        assert rows.dtype == out.dtype == torch.float32 and rows.is_contiguous() and out.is_contiguous()
        amax = torch.empty(r, 1, dtype=torch.float32)
        self._digits(rows.data_ptr(), r, k, levels, 1.0 / levels, top, TINY, out.data_ptr(), amax.data_ptr())
        return amax

    def combine(
        self, both: torch.Tensor, amax: torch.Tensor, bias: torch.Tensor | None, levels: float
    ) -> torch.Tensor:
        r, n = both.shape[0] // 2, both.shape[1]
        assert both.dtype == amax.dtype == torch.float32 and both.is_contiguous()
        assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        out = both[r:]  # in place, as the reference: the fine half is read before it is written
        self._combine(
            both.data_ptr(),
            r,
            n,
            amax.data_ptr(),
            None if bias is None else bias.data_ptr(),
            1.0 / levels,
            out.data_ptr(),
        )
        return out


class _Reference:
    row_digits = staticmethod(row_digits_reference)
    combine = staticmethod(combine_reference)


REFERENCE = _Reference()


@functools.cache
def row_kernels() -> RowKernels | _Reference:
    """The C kernels if they build and load here, else the reference (logged once, with why)."""
    if os.environ.get("SPECDEC_KERNELS") == "reference":
        return REFERENCE
    try:
        return RowKernels(ctypes.CDLL(str(_built_library())))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning(
            "int8 on the CPU: the C row kernels did not build (%s); using the tensor-op path "
            "(the same numbers, slower)",
            e,
        )
        return REFERENCE


def _built_library() -> Path:
    """The shared library of int8_rows.c in specdec's cache, compiled if this source, compiler
    and machine have none yet. Written to a temporary name and renamed, so processes building at
    once never load a half-written file."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((compiler, CFLAGS, platform.machine())).encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"int8_rows-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        cmd = [*compiler, *CFLAGS, "-o", str(built), str(SOURCE), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{shlex.join(cmd)} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    log.info("int8 on the CPU: compiled the C row kernels into %s", target)
    return target
