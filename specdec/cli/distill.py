"""`specdec distill` (KL distillation of a draft for a target) and `specdec train-demo` (the
embedded demo pair, from scratch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specdec.errors import SpecdecError


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    dist.set_defaults(func=run_distill_command)

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
