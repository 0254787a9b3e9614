"""Counter-based randomness: Philox4x32-10 keyed on the request seed, counted by (stream, position, lane).

Every random number specdec draws is a pure function of

    key     = the request's 64-bit seed            (k0 = low word, k1 = high word)
    counter = (lane // 4, position, stream, 0)     (lane: vocabulary index, or 0 for a scalar draw)

and the value is word ``lane % 4`` of the Philox output, turned into a uniform in the open interval
(0, 1): ``((word >> 9) * 2 + 1) * 2**-24`` is exact in float32 and never 0 or 1, so ``-log(u)`` is
finite and positive wherever it divides. Nothing depends on the row's place in the batch, the batch
size or any global generator state, so a seeded request draws the same numbers wherever it runs.
Offsets never multiply position by vocabulary size: both are separate counter words.

`philox_uniform` is the Triton device function the kernels inline; `uniform_reference` is its
bit-exact PyTorch mirror. The reference implementations (and so the CPU path) draw through
`uniform`: the same numbers from C (`philox_cpu.c`, built at first use like specdec's other C
kernels) on CPU tensors, the tensor ops elsewhere, with SPECDEC_KERNELS=reference or where no
compiler works.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from specdec.kernels.native import BUILD_ERRORS, built_library

try:  # Triton is optional on CPU machines; the references below never need it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

# Streams: separate sequences of draws for each decision, so that e.g. the draft's sample at a
# position never shares a number with the acceptance test at that position.
STREAM_DRAFT = 0  # the draft model's proposals (and draft-only generation)
STREAM_ACCEPT = 1  # the acceptance test u < p(d) / q(d)
STREAM_RESAMPLE = 2  # replacement, bonus and plain target samples

_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_N_ROUNDS = 10

if HAVE_TRITON:

    @triton.jit
    def philox_uniform(seed, stream, position, lane):
        """Uniform float32 in (0, 1) for (seed: int64, stream, position, lane) - broadcasts."""
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        lane = lane.to(tl.int64)
        c0 = (lane >> 2).to(tl.uint32)
        c1 = (position + lane * 0).to(tl.uint32)
        c2 = (stream + lane * 0).to(tl.uint32)
        c3 = c0 * 0
        k0 = k0 + c3
        k1 = k1 + c3
        for _ in tl.static_range(10):
            hi_b = tl.umulhi(c2, 0xCD9E8D57)
            hi_a = tl.umulhi(c0, 0xD2511F53)
            lo_b = c2 * 0xCD9E8D57
            lo_a = c0 * 0xD2511F53
            c0 = hi_b ^ c1 ^ k0
            c2 = hi_a ^ c3 ^ k1
            c1 = lo_b
            c3 = lo_a
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        word = lane & 3
        x = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
        return ((x >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08  # 2**-24

    @triton.jit
    def _uniform_kernel(out_ptr, seed_ptr, position_ptr, stream, n_lanes, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        lanes = block * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr + row)
        position = tl.load(position_ptr + row)
        u = philox_uniform(seed, stream, position, lanes)
        tl.store(out_ptr + row * n_lanes + lanes, u, mask=lanes < n_lanes)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and int64 b < 2**32, without
    overflowing int64 (split b into 16-bit halves)."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2**48
    p_lo = a * b_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_reference(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcast together)."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*(t.to(torch.int64) for t in (c0, c1, c2, c3, k0, k1)))
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_words_reference(
    seed: torch.Tensor, counter0: torch.Tensor, position: torch.Tensor, stream: int
) -> tuple[torch.Tensor, ...]:
    """The four output words (int64 in [0, 2**32)) for counter (counter0, position, stream, 0)
    under key `seed`; tensors broadcast together."""
    zero = torch.zeros((), dtype=torch.int64, device=seed.device)
    return philox4x32_reference(
        counter0, position, zero + stream, zero, seed & _MASK32, (seed >> 32) & _MASK32
    )


def _to_uniform(word: torch.Tensor) -> torch.Tensor:
    return ((word >> 9).to(torch.float32) * 2.0 + 1.0) * 2.0**-24


def uniform_reference(
    seed: torch.Tensor, stream: int, position: torch.Tensor, n_lanes: int = 1
) -> torch.Tensor:
    """Uniforms [N, n_lanes] in (0, 1) for N rows of (seed [N], position [N]): lane j of row n is the
    same number `philox_uniform(seed[n], stream, position[n], j)` gives inside a kernel."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    position = position.to(torch.int64).reshape(-1, 1)
    groups = (n_lanes + 3) // 4
    counter0 = torch.arange(groups, device=seed.device, dtype=torch.int64)[None, :]
    words = philox_words_reference(seed, counter0, position, stream)  # 4 x [N, groups]
    # One Philox call yields four lanes: interleave the words back into lane order.
    lanes = torch.stack(words, dim=-1).reshape(seed.shape[0], groups * 4)[:, :n_lanes]
    return _to_uniform(lanes)


SOURCE = Path(__file__).with_name("philox_cpu.c")
log = logging.getLogger(__name__)


@functools.cache
def _cpu_uniform() -> ctypes._CFuncPtr | None:
    """`philox_cpu.c`'s specdec_uniform if it builds and loads here, else None (logged once)."""
    if os.environ.get("SPECDEC_KERNELS") == "reference":
        return None
    try:
        fn = ctypes.CDLL(str(built_library(SOURCE))).specdec_uniform
    except BUILD_ERRORS as e:
        log.warning("CPU sampling: the C Philox did not build (%s); using tensor ops (slower)", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i64, ctypes.c_uint32, i64, ptr, ctypes.c_int]
    fn.restype = None
    return fn


def uniform(seed: torch.Tensor, stream: int, position: torch.Tensor, n_lanes: int = 1) -> torch.Tensor:
    """`uniform_reference`'s numbers [N, n_lanes] for N rows of (seed [N], position [N]), bitwise:
    from C on CPU tensors where it built (a 49152-lane row in 0.35 ms on one thread here, where
    the tensor ops take 15 ms), from the tensor ops elsewhere."""
    fn = _cpu_uniform() if seed.device.type == "cpu" else None
    if fn is None:
        return uniform_reference(seed, stream, position, n_lanes)
    seed = seed.to(torch.int64).reshape(-1).contiguous()
    position = position.to(torch.int64).reshape(-1).contiguous()
    assert seed.shape == position.shape, "one seed and one position per row"
    out = torch.empty((seed.numel(), n_lanes), dtype=torch.float32)
    fn(
        seed.data_ptr(),
        position.data_ptr(),
        seed.numel(),
        stream,
        n_lanes,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def uniform_triton(seed: torch.Tensor, stream: int, position: torch.Tensor, n_lanes: int = 1) -> torch.Tensor:
    """`uniform_reference` computed by the Triton kernel (tests hold the two bit-equal)."""
    n = seed.numel()
    out = torch.empty((n, n_lanes), dtype=torch.float32, device=seed.device)
    block = 128
    _uniform_kernel[(n, triton.cdiv(n_lanes, block))](
        out,
        seed.to(torch.int64).contiguous(),
        position.to(torch.int64).contiguous(),
        stream,
        n_lanes,
        BLOCK=block,
    )
    return out
