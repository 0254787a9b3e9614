"""`specdec bench`: tokens/s of target, draft, speculative and Hugging Face, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="tokens/s of target, draft, speculative and Hugging Face, side by side"
    )
    bench.add_argument(
        "--target", help="target checkpoint: directory, .gguf file or hub id (default: the default pair)"
    )
    bench.add_argument("--draft", help="draft checkpoint")
    bench.add_argument("--demo", action="store_true", help="the tiny embedded demo pair")
    bench.add_argument(
        "--random-weights", action="store_true", help="random models of a real shape (see --shape)"
    )
    bench.add_argument(
        "--shape",
        default="tiny-1b-like",
        help="with --random-weights: llama-3-8b, llama-3.2-1b, qwen2.5-7b, qwen2.5-0.5b, tiny-1b-like",
    )
    bench.add_argument(
        "--draft-shape",
        default=None,
        help="with --random-weights: the draft's shape (default: the usual pairing)",
    )
    bench.add_argument("--batch-sizes", default="1,4,16")
    bench.add_argument(
        "--gamma",
        default="0,2,4,8,adaptive",
        help="γ values to run; 0 = target alone; adaptive (as served); adaptive-per-row (to compare)",
    )
    bench.add_argument("--prompt-len", type=int, default=64)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument(
        "--waves",
        type=int,
        default=2,
        help="requests per run = batch size x waves, batch size in flight (a closed loop); 1 = static batch",
    )
    bench.add_argument(
        "--length-spread",
        type=float,
        default=0.5,
        help="each output's length is drawn from new-tokens x [1 - s, 1 + s] (seeded, the same for every "
        "configuration); 0 = all exactly new-tokens, which runs target-alone rows in lockstep",
    )
    bench.add_argument(
        "--respect-eos",
        action="store_true",
        help="our engine's answers end at their end of sequence (at most their drawn length), as a chat "
        "server's do, so acceptance is that of real answers; by default they run to their drawn lengths "
        "(Hugging Face's always do)",
    )
    bench.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt per line")
    bench.add_argument(
        "--json-schema",
        default=None,
        metavar="extraction|FILE",
        help="also run every configuration constrained to a JSON Schema (rows 'json target', 'json "
        "speculative', ...) on chat prompts: 'extraction' is a built-in workload (name, age and city "
        "from a sentence); a schema FILE takes its user turns from --prompts (one per line) or the "
        "same extraction instructions. Constrained answers end where the grammar does",
    )
    bench.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baselines")
    bench.add_argument(
        "--no-llama-cpp",
        action="store_true",
        help="skip the llama.cpp baseline (run at batch size 1 when llama-cpp-python is installed and "
        "the target is a .gguf file)",
    )
    bench.add_argument(
        "--quantize",
        default="none",
        help="comma list of the weights to bench side by side: none, int8, int4 (both models), or "
        "TARGET:DRAFT such as int8:none (e.g. none,int8); on the CPU int8 quantizes the activations "
        "too, per row (docs/QUANTIZATION.md)",
    )
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bench.add_argument("--out", default="out/bench", help="directory for bench.json and the PNG plots")
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specdec.bench.main import run as run_bench

    run_bench(args)
    return 0
