"""nn.Linear with a faster matmul for the few-row products of decoding on the CPU.

A decode or verify pass multiplies each weight by very few rows: one per running sequence and
draft position, 2-8 at batch size 1-4. For those shapes the CPU BLAS that torch calls for
``x @ W^T`` (F.linear) is slow - on the 2-core machine this project is measured on, SmolLM2's
full pass at 3 rows took twice as long as at 1 row, and its 49152-wide output layer 3.5x as long -
while the same product written as ``(W @ x^T)^T`` goes down another BLAS kernel and costs about
what one row does. Measured on whole passes (docs/BENCHMARKS.md, "Few-row matmuls on the CPU"):
at 1 row nothing changes, at 2-8 rows a pass gets 1.3-2x faster, from 12 rows on F.linear is as
fast or faster, so the rewrite is used only for 2-8 rows of float32 on the CPU.

The two orders round differently in the last bits (as F.linear at 1 row and at 3 rows already
do); nothing in the engine relies on a product being bitwise equal across batch shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows (tokens in the pass) for which (W @ x^T)^T beats x @ W^T; see the module docstring.
FEW_ROWS = range(2, 9)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the faster product for few rows of float32 on the CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows not in FEW_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    flat_t = x.reshape(rows, x.shape[-1]).t()
    out_t = torch.mm(weight, flat_t) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat_t)
    # A transposed view, [rows, out]: the next ops read it in place (a copy would cost more).
    return out_t.t().reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
