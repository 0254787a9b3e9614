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


DEMO = Path(__file__).resolve().parent / "assets" / "demo"


def _default_checkpoints() -> tuple[Path, Path | None]:
    """The models used when none are named: the embedded demo pair (trained on the Python stdlib)."""
    target, draft = DEMO / "target", DEMO / "draft"
    if not (target / "model.safetensors").exists():
        raise SpecdecError(f"the embedded demo pair is missing from {DEMO}; name a checkpoint with --target")
    return target, draft


def _checkpoints(args: argparse.Namespace) -> tuple[Path, Path | None]:
    if args.target:
        return args.target, args.draft
    if args.draft:
        raise SpecdecError("--draft needs --target")
    return _default_checkpoints()


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        return _generate_remote(args)
    from specdec.engine import Engine
    from specdec.sampling import SamplingParams

    target, draft = _checkpoints(args)
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


def _generate_remote(args: argparse.Namespace) -> int:
    """`specdec generate --server`: the same flags, over gRPC."""
    import grpc

    from specdec.client import Client, response_dict

    fields = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "num_speculative_tokens": args.num_speculative_tokens,
    }
    try:
        with Client(args.server, timeout=args.timeout) as client:
            if args.stream:
                last = None
                if not args.json:
                    sys.stdout.write(args.prompt)
                pieces = []
                for chunk in client.stream(args.prompt, args.mode, **fields):
                    pieces.append(chunk)
                    last = chunk
                    if not args.json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                assert last is not None
                last.text = "".join(c.text for c in pieces)
                del last.token_ids[:]
                last.token_ids.extend(t for c in pieces for t in c.token_ids)
                reply = last
                if not args.json:
                    sys.stdout.write("\n")
            else:
                reply = client.generate(args.prompt, args.mode, **fields)
                if not args.json:
                    print(args.prompt + reply.text)
    except grpc.RpcError as e:
        print(f"specdec: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(response_dict(reply)))
    else:
        stats = reply.stats
        print(
            f"[{len(reply.token_ids)} tokens in {reply.timing.total_seconds:.2f}s; acceptance "
            f"{stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verify]",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from specdec.config import EngineConfig
    from specdec.engine import Engine, resolve_device
    from specdec.server.app import ServerConfig, configure_cpu_threads, serve

    target, draft = _checkpoints(args)
    if args.cpu_threads < 0:
        raise SpecdecError(f"--cpu-threads must be >= 0 (0 = all cores but one), got {args.cpu_threads}")
    device = resolve_device(args.device)
    threads = configure_cpu_threads(device, args.cpu_threads)
    if device.type == "cpu":
        print(f"specdec: {threads} torch compute thread(s)", file=sys.stderr, flush=True)
    config = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_context=args.max_context,
        max_gamma=args.max_gamma,
        device=args.device,
        dtype=args.dtype,
        adaptive=not args.no_adaptive,
    )
    print(
        f"specdec: loading target {target}" + (f" and draft {draft}" if draft else ""),
        file=sys.stderr,
        flush=True,
    )
    engine = Engine(target=target, draft=draft, config=config)
    print(
        f"specdec: KV cache per model: {engine.scheduler.target_cache.describe()}",
        file=sys.stderr,
        flush=True,
    )
    server = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, grace_period=args.grace_period
    )

    def ready(port: int) -> None:
        print(
            f"specdec: serving on {args.host}:{port} (metrics on :{args.metrics_port or 'off'}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )

    asyncio.run(serve(engine, server, on_ready=ready))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from specdec.bench.main import run

    run(args)
    return 0


def _train_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecdecError("--device cuda: no CUDA device is available")
    return name


def cmd_distill(args: argparse.Namespace) -> int:
    from specdec.distill.distill import DraftShape, run_distill
    from specdec.distill.trainer import TrainConfig

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=min(args.warmup, max(1, args.steps // 10)),
        eval_every=args.eval_every,
        seed=args.seed,
        device=_train_device(args.device),
    )
    shape = DraftShape(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab_size=args.vocab_size,
    )
    result = run_distill(
        args.target,
        args.out,
        args.data,
        shape,
        config,
        heldout_fraction=args.heldout_fraction,
        self_generated=args.self_generated,
        init_from=not args.no_init_from_target,
        resume=args.resume,
    )
    print(json.dumps(result.final))
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from specdec.distill.demo import ASSETS, DemoRecipe, train_demo

    recipe = DemoRecipe()
    if args.target_steps:
        recipe = replace(recipe, target_steps=args.target_steps)
    if args.draft_steps:
        recipe = replace(recipe, draft_steps=args.draft_steps)
    record = train_demo(args.out or ASSETS, args.work, recipe, _train_device(args.device), args.resume)
    print(json.dumps(record["shipped_pair"], indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative-decoding inference server.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="generate text for one prompt: in-process, or over gRPC with --server"
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "--server", help="HOST:PORT of a running `specdec serve` (default: run the engine in-process)"
    )
    gen.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds (with --server)")
    _add_engine_flags(gen)
    _add_sampling_flags(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the models over gRPC (default: the embedded demo pair)")
    _add_engine_flags(srv)
    srv.add_argument("--host", default="0.0.0.0")
    srv.add_argument("--port", type=int, default=50051)
    srv.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 = off")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond the running ones")
    srv.add_argument(
        "--grace-period", type=float, default=30.0, help="seconds in-flight requests get on shutdown"
    )
    srv.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="torch compute threads on the CPU; 0 = all cores but one, left to the gRPC threads",
    )
    srv.add_argument(
        "--no-adaptive", action="store_true", help="a fixed γ of 4 per step instead of the adaptive choice"
    )
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser(
        "bench", help="tokens/s of target, draft, speculative and Hugging Face, side by side"
    )
    bench.add_argument("--target", type=Path, help="target checkpoint (default: the embedded demo pair)")
    bench.add_argument("--draft", type=Path, help="draft checkpoint")
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
    bench.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt per line")
    bench.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baselines")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bench.add_argument("--out", default="out/bench", help="directory for bench.json and the PNG plots")
    bench.set_defaults(func=cmd_bench)

    dist = sub.add_parser("distill", help="train a small draft to imitate a target (KL distillation)")
    dist.add_argument("--target", type=Path, required=True, help="target checkpoint directory")
    dist.add_argument("--out", type=Path, required=True, help="where the draft checkpoint goes")
    dist.add_argument("--data", nargs="+", required=True, help="text files, .jsonl files or source trees")
    dist.add_argument("--layers", type=int, default=1)
    dist.add_argument(
        "--hidden", type=int, default=None, help="default: the target's (embeddings then start from it)"
    )
    dist.add_argument("--heads", type=int, default=None)
    dist.add_argument("--kv-heads", type=int, default=None)
    dist.add_argument("--intermediate", type=int, default=None)
    dist.add_argument("--vocab-size", type=int, default=None, help="logits width; default: the target's")
    dist.add_argument("--steps", type=int, default=1000)
    dist.add_argument("--batch-size", type=int, default=16)
    dist.add_argument("--seq-len", type=int, default=256)
    dist.add_argument("--lr", type=float, default=2e-3)
    dist.add_argument("--warmup", type=int, default=50)
    dist.add_argument("--eval-every", type=int, default=200)
    dist.add_argument("--heldout-fraction", type=float, default=0.05)
    dist.add_argument(
        "--self-generated",
        type=float,
        default=0.0,
        help="fraction of batches sampled from the target itself instead of read from --data",
    )
    dist.add_argument(
        "--no-init-from-target",
        action="store_true",
        help="start from random weights instead of the target's embeddings and first layers",
    )
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--device", default="auto", help="auto, cpu or cuda")
    dist.add_argument("--resume", action="store_true", help="continue the training state in --out")
    dist.set_defaults(func=cmd_distill)

    demo = sub.add_parser("train-demo", help="train the embedded demo pair from scratch on the Python stdlib")
    demo.add_argument("--out", type=Path, default=None, help="default: the package's assets/demo")
    demo.add_argument(
        "--work", type=Path, default=Path("out/train-demo"), help="fp32 checkpoints and training state"
    )
    demo.add_argument("--target-steps", type=int, default=None)
    demo.add_argument("--draft-steps", type=int, default=None)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--resume", action="store_true")
    demo.set_defaults(func=cmd_train_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The server logs at INFO (one structured line per request); other commands only warn.
    level = logging.INFO if args.verbose or args.command == "serve" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except SpecdecError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
