"""nn.Linear with the faster of two matmul orders for the few-row products of decoding on the CPU.

A decode or verify pass multiplies each weight by very few rows: one per running sequence and
draft position, 2-8 at batch size 1-4. For those shapes which of the CPU BLAS kernels is fast
depends on the machine: on the 2-core VM this project was first measured on, ``x @ W^T``
(F.linear) took twice as long for SmolLM2's pass at 3 rows as at 1 and the same product written
as ``(W @ x^T)^T`` cost about what one row does (docs/BENCHMARKS.md, "CPU: few-row
matmuls"); on a later AVX-512 VM it was the other way round - the rewrite 2-3x slower than F.linear at
2-5 rows, which made every verify pass cost two decode passes. So neither order is fixed: the
first product of each (rows, out, in) shape times both (a few interleaved repeats, a few ms in
all, during the engine's warm-up when it has one) and that shape keeps the faster for the life of
the process. `SPECDEC_FEW_ROW_MATMUL=linear|transposed` forces one (measuring nothing).

The two orders round differently in the last bits (as F.linear at 1 row and at 3 rows already
do); nothing in the engine relies on a product being bitwise equal across batch shapes.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

# Rows (tokens in the pass) for which (W @ x^T)^T may beat x @ W^T; see the module docstring.
FEW_ROWS = range(2, 9)
FORCE_ENV = "SPECDEC_FEW_ROW_MATMUL"  # linear | transposed: one order always, nothing measured
FORCED = os.environ.get(FORCE_ENV) or None  # read once: the hot path does not consult the environment
if FORCED not in (None, "linear", "transposed"):
    raise ValueError(f"{FORCE_ENV}={FORCED!r}: give linear or transposed, or leave it unset to measure")

# (rows, out_features, in_features) -> whether the transposed order is the faster, as measured.
_transposed_faster: dict[tuple[int, int, int], bool] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the faster product for few rows of float32 on the CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows not in FEW_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if not transposed_is_faster(rows, weight):
        return F.linear(x, weight, bias)
    flat_t = x.reshape(rows, x.shape[-1]).t()
    out_t = torch.mm(weight, flat_t) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat_t)
    # A transposed view, [rows, out]: the next ops read it in place (a copy would cost more).
    return out_t.t().reshape(*x.shape[:-1], weight.shape[0])


def transposed_is_faster(rows: int, weight: torch.Tensor) -> bool:
    """Whether (W @ x^T)^T is the faster order for `rows` rows times this weight's shape: forced by
    SPECDEC_FEW_ROW_MATMUL, else measured at the first product of that shape and kept."""
    if FORCED is not None:
        return FORCED == "transposed"
    key = (rows, weight.shape[0], weight.shape[1])
    found = _transposed_faster.get(key)
    if found is None:
        found = _transposed_faster[key] = _measure(rows, weight)
    return found


def _measure(rows: int, weight: torch.Tensor, repeats: int = 5) -> bool:
    """Time both orders on this weight, interleaved (a drift hits both alike), fastest of each;
    the transposed order must win by 10% to be taken (F.linear is the default)."""
    x = torch.randn(rows, weight.shape[1])
    best = {"linear": float("inf"), "transposed": float("inf")}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms both up
            for name in best:
                t0 = time.perf_counter()
                if name == "linear":
                    F.linear(x, weight)
                else:
                    torch.mm(weight, x.t())
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["transposed"] < 0.9 * best["linear"]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
