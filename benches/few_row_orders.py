"""Microseconds of F.linear(x, W) against torch.mm(W, x.t()) for SmolLM2's weight shapes at 1-12
rows (median of 30, after two warm-ups): which few-row matmul order is faster on this machine
(`specdec/models/linear.py` measures the same per shape at first use).

    python benches/few_row_orders.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # out x in
ROWS = (1, 2, 3, 4, 5, 8, 12)


def median_us(product, n: int = 30) -> float:
    product()
    product()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        product()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e6


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; F.linear / transposed, µs")
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features)
        cells = []
        for rows in ROWS:
            x = torch.randn(rows, in_features)
            plain = median_us(lambda x=x, w=weight: F.linear(x, w))
            transposed = median_us(lambda x=x, w=weight: torch.mm(w, x.t()))
            cells.append(f"r{rows}: {plain:.0f} / {transposed:.0f}")
        print(f"{out_features} x {in_features}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
