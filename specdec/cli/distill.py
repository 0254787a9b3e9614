"""`specdec distill` (KL distillation of a draft for a target) and `specdec train-demo` (the
embedded demo pair, from scratch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specdec.errors import SpecdecError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    dist = sub.add_parser("distill", help="train a small draft to imitate a target (KL distillation)")
    dist.add_argument("--target", required=True, help="target checkpoint: directory, .gguf file or hub id")
    dist.add_argument("--out", type=Path, required=True, help="where the draft checkpoint goes")
    dist.add_argument("--data", nargs="+", required=True, help="text files, .jsonl files or source trees")
    dist.add_argument("--layers", type=int, default=1, help="the draft's own (trained) layers")
    dist.add_argument(
        "--shared-layers",
        type=int,
        default=0,
        help="borrow the target's first N layers, frozen, under the trained ones (not stored)",
    )
    dist.add_argument(
        "--hidden", type=int, default=None, help="default: the target's (embeddings then start from it)"
    )
    dist.add_argument("--heads", type=int, default=None)
    dist.add_argument("--kv-heads", type=int, default=None)
    dist.add_argument("--intermediate", type=int, default=None)
    dist.add_argument("--vocab-size", type=int, default=None, help="logits width; default: the target's")
    dist.add_argument(
        "--head-tokens",
        type=int,
        default=None,
        help="a small output head over the N most frequent tokens of the training text (default: all)",
    )
    dist.add_argument(
        "--share-embeddings",
        action="store_true",
        help="borrow the target's input embedding instead of storing one",
    )
    dist.add_argument(
        "--teacher-top-k",
        type=int,
        default=0,
        help="run the target once over the training text and keep its top K (default 0: every step)",
    )
    dist.add_argument(
        "--feature-input",
        action="store_true",
        help="an EAGLE-style draft: reads the target's final hidden state of the position before each "
        "token (needs --teacher-top-k, which caches them); it only speculates",
    )
    dist.add_argument(
        "--feature-unroll",
        type=int,
        default=2,
        help="with --feature-input: drafting passes trained per step, each after the first reading the "
        "draft's own features (default 2)",
    )
    dist.add_argument(
        "--feature-weight",
        type=float,
        default=0.0,
        help="with --feature-input: weight of the regression of the draft's features onto the target's",
    )
    dist.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    dist.add_argument("--steps", type=int, default=1000)
    dist.add_argument("--batch-size", type=int, default=16)
    dist.add_argument("--seq-len", type=int, default=256)
    dist.add_argument("--lr", type=float, default=2e-3)
    dist.add_argument("--warmup", type=int, default=50)
    dist.add_argument("--eval-every", type=int, default=200)
    dist.add_argument("--heldout-fraction", type=float, default=0.05)
    dist.add_argument(
        "--heldout-data",
        nargs="+",
        default=None,
        help="held-out files (instead of every n-th document of --data)",
    )
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
    dist.set_defaults(func=run_distill_command)

    data = sub.add_parser(
        "distill-data",
        help="self-distillation data: a chat target's own answers to the pinned instructions (JSONL)",
    )
    data.add_argument("--target", default=None, help="the chat target (default: the default target)")
    data.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    data.add_argument("--count", type=int, default=400, help="instructions to answer")
    data.add_argument("--start", type=int, default=0, help="skip this many first (to extend a data set)")
    data.add_argument(
        "--heldout", action="store_true", help="the held-out instructions instead of the training ones"
    )
    data.add_argument("--max-new-tokens", type=int, default=160)
    data.add_argument("--seed", type=int, default=0, help="the sampled answers' seeds follow it")
    data.add_argument(
        "--all-sampled",
        action="store_true",
        help="sample every answer (default: half greedy): more answers to the same instructions under another --seed",
    )
    data.add_argument("--max-batch-size", type=int, default=16)
    data.set_defaults(func=run_distill_data)

    demo = sub.add_parser("train-demo", help="train the embedded demo pair from scratch on the Python stdlib")
    demo.add_argument("--out", type=Path, default=None, help="default: the package's assets/demo")
    demo.add_argument(
        "--work", type=Path, default=Path("out/train-demo"), help="fp32 checkpoints and training state"
    )
    demo.add_argument("--target-steps", type=int, default=None)
    demo.add_argument("--draft-steps", type=int, default=None)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--resume", action="store_true")
    demo.set_defaults(func=run_train_demo)


def _train_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecdecError("--device cuda: no CUDA device is available")
    return name


def run_distill_command(args: argparse.Namespace) -> int:
    import torch

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
        head_tokens=args.head_tokens,
        share_embeddings=args.share_embeddings,
        shared_layers=args.shared_layers,
        feature_input=args.feature_input,
    )
    split = None
    if args.heldout_data:
        from specdec.distill.data import read_documents

        split = (read_documents(args.data), read_documents(args.heldout_data))
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
        teacher_top_k=args.teacher_top_k,
        save_dtype=getattr(torch, args.save_dtype),
        feature_unroll=args.feature_unroll,
        feature_weight=args.feature_weight,
        split=split,
    )
    print(json.dumps(result.final))
    return 0


def run_distill_data(args: argparse.Namespace) -> int:
    import sys

    from specdec.assets import default_target
    from specdec.config import EngineConfig
    from specdec.distill.chat_data import instructions, write_answers
    from specdec.engine import Engine

    try:
        prompts = instructions(args.start + args.count, heldout=args.heldout)[args.start :]
    except ValueError as e:
        raise SpecdecError(f"--count: {e}") from None
    engine = Engine(
        args.target or default_target(),
        config=EngineConfig(
            max_batch_size=args.max_batch_size, max_context=512, warmup=False, dtype="float32"
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokens = write_answers(
        engine,
        prompts,
        args.out,
        args.max_new_tokens,
        args.seed,
        first=args.start,
        all_sampled=args.all_sampled,
    )
    print(f"specdec: {len(prompts)} answers, {tokens} tokens, in {args.out}", file=sys.stderr)
    return 0


def run_train_demo(args: argparse.Namespace) -> int:
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
