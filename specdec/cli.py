"""The `specdec` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from specdec.errors import SpecdecError


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
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


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, help="target checkpoint directory (default: the embedded pair)")
    p.add_argument("--draft", type=Path, help="draft checkpoint directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=16, help="running sequences (KV cache slots)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + output tokens per sequence")
    p.add_argument("--max-gamma", type=int, default=8, help="the most drafts per row per step")


def _engine_config(args: argparse.Namespace):
    from specdec.config import EngineConfig

    return EngineConfig(
        max_batch_size=args.max_batch_size,
        max_context=args.max_context,
        max_gamma=args.max_gamma,
        device=args.device,
        dtype=args.dtype,
    )


def _default_checkpoints() -> tuple[Path, Path | None]:
    """The models used when none are named: a tiny random checkpoint, written once to a cache dir."""
    from specdec.testing import write_tiny_checkpoint

    root = Path.home() / ".cache" / "specdec" / "tiny-random"
    target = root / "target"
    if not (target / "model.safetensors").exists():
        write_tiny_checkpoint(target, "llama", num_layers=4, hidden_size=128, intermediate_size=256, seed=0)
    print(
        f"note: no --target given; using a tiny RANDOM checkpoint at {target} (its text is noise)",
        file=sys.stderr,
    )
    return target, None


def cmd_generate(args: argparse.Namespace) -> int:
    from specdec.engine import Engine
    from specdec.sampling import SamplingParams

    target, draft = (args.target, args.draft) if args.target else _default_checkpoints()
    engine = Engine(target=target, draft=draft, config=_engine_config(args))
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    request = engine.make_request(args.prompt, params, args.mode, args.num_speculative_tokens)
    if args.stream and not args.json:
        sys.stdout.write(args.prompt)
        for out in engine.stream(request):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    [result] = engine.generate([request])
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(args.prompt + result.text)
        stats = result.stats
        print(
            f"[{result.finish_reason.value}; {len(result.token_ids)} tokens in {result.timing.total_seconds:.2f}s; "
            f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verify]",
            file=sys.stderr,
        )
    return 0 if result.error is None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative-decoding inference server.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt (in-process)")
    gen.add_argument("prompt")
    _add_engine_flags(gen)
    _add_sampling_flags(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except SpecdecError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
