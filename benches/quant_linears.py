"""The linear layers of SmolLM2-135M (30 layers: qkv 576→960, o 576→576, gate_up 576→3072,
down 1536→576; random weights, 425 MB in float32, so every pass reads them from memory) through
each way PyTorch offers to multiply quantized weights on the CPU, at a decode's width (1 row) and
a verify pass's (5 rows): the measurements behind docs/QUANTIZATION.md's choice of kernels.

    python benches/quant_linears.py [--compile]

Each path is timed as the median of 7 runs of all 120 products, after 2 warm-up runs, one path
after the other in one process. --compile adds inductor's code generation of a dequantize-and-
multiply (torch.compile) for one layer shape, warm in cache, against float32 on the same shape.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
import warnings
from datetime import datetime, timezone

import medians  # benches/medians.py, beside this script
import torch

from specdec.kernels.int8_linear import REFERENCE, Isa, int8_kernel
from specdec.models.quant_linear import (
    Int4Linear,
    Int8LinearCPU,
    Int8LinearWeightOnly,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
)


def on_kernel(layers, kernel):
    """Every module of `layers`, its product set to `kernel` (a C path or the reference)."""
    for layer in layers:
        for m in layer:
            m.kernel = kernel
            yield layer, m


def pack_fbgemm_per_tensor(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed weight (per-channel int8) for its own dynamic linear."""
    n = codes.shape[0]
    qweight = torch._make_per_channel_quantized_tensor(
        codes, scale.double(), torch.zeros(n, dtype=torch.long), 0
    )
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        return torch.ops.quantized.linear_prepack(qweight, None)
    finally:
        torch.backends.quantized.engine = engine


median_ms = functools.partial(medians.median_ms, runs=7)  # one call = one median of 7 runs

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one layer's products
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of dequantize + matmul")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=g) * 0.02 for n, k in SHAPES] for _ in range(LAYERS)]
    int8_rows = [[Int8LinearCPU(*quantize_int8(w), None) for w in layer] for layer in weights]
    int8_weight_only = [
        [Int8LinearWeightOnly(*quantize_int8(w), None, torch.float32) for w in layer] for layer in weights
    ]
    int4 = [[Int4Linear(*quantize_int4(w), None, torch.float32) for w in layer] for layer in weights]
    # fbgemm's own dynamic linear, one activation scale per tensor (not usable: see the docs).
    per_tensor = [[pack_fbgemm_per_tensor(*quantize_int8(w)) for w in layer] for layer in weights]
    kernel = int8_kernel()
    paths = [] if kernel is REFERENCE else [kernel.on(isa) for isa in Isa if isa <= kernel.best]
    print(
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
    )
    print("| path | width 1 (ms) | width 5 (ms) |\n|---|---|---|")
    for name, run in [
        ("float32 (F.linear)", lambda x: [torch.nn.functional.linear(x[w.shape[1]], w) for layer in weights for w in layer]),
        *[(f"int8, per-row activations in two digits: specdec's C kernel, {path.isa.name} path",
           lambda x, path=path: [m(x[m.in_features]) for layer, m in on_kernel(int8_rows, path)])
          for path in paths],
        ("the same as tensor ops (the reference; where no C compiler works)",
         lambda x: [m(x[m.in_features]) for layer, m in on_kernel(int8_rows, REFERENCE)]),
        ("int8, fbgemm's dynamic linear as is (one activation scale per tensor, one digit)",
         lambda x: [torch.ops.quantized.linear_dynamic(x[w.shape[1]], p, False)
                    for packs, ws in zip(per_tensor, weights) for p, w in zip(packs, ws)]),
        ("int8 weight-only (aten._weight_int8pack_mm)",
         lambda x: [m(x[m.in_features]) for layer in int8_weight_only for m in layer]),
        ("int4 groups of 32, weight-only (aten._weight_int4pack_mm_for_cpu)",
         lambda x: [m(x[m.in_features]) for layer in int4 for m in layer]),
    ]:  # fmt: skip
        cells = []
        for width in (1, 5):
            x = {k: torch.randn(width, k, generator=g) for _, k in SHAPES}
            cells.append(f"{median_ms(lambda run=run, x=x: run(x)):.1f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)

    if args.compile:
        n, k = 3072, 576
        w = torch.randn(n, k, generator=g) * 0.02
        codes, scale, zero = quantize_int4(w)

        def dequantize_matmul(x, codes, scale, zero):
            return x @ dequantize_int4(codes, scale, zero).t()

        compiled = torch.compile(dequantize_matmul, dynamic=False)
        print(f"\none {n}x{k} layer, warm in cache | width 1 (ms) | width 5 (ms) |\n|---|---|---|")
        rows = {"float32": [], "torch.compile(dequantize int4 + matmul)": []}
        for width in (1, 5):
            x = torch.randn(width, k, generator=g)
            t0 = time.perf_counter()
            compiled(x, codes, scale, zero)
            print(f"(compiling for width {width}: {time.perf_counter() - t0:.1f} s)")
            rows["float32"].append(median_ms(lambda x=x: torch.nn.functional.linear(x, w), runs=50))
            rows["torch.compile(dequantize int4 + matmul)"].append(
                median_ms(lambda x=x: compiled(x, codes, scale, zero), runs=50)
            )
        for name, (a, b) in rows.items():
            print(f"| {name} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main()
