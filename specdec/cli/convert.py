"""`specdec convert`: a GGUF file to a Hugging Face checkpoint directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser(
        "convert",
        help="write the Hugging Face checkpoint of a GGUF file (weights dequantized; config, tokenizer "
        "and chat template from its metadata)",
    )
    conv.add_argument("gguf", type=Path, help="the .gguf file")
    conv.add_argument("--out", type=Path, required=True, help="a new (or empty) directory for the checkpoint")
    conv.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="what the weights are stored as (default float32: dequantized values exactly)",
    )
    conv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from specdec.models.gguf_file import convert_gguf

    out = convert_gguf(args.gguf, args.out, getattr(torch, args.dtype))
    print(f"specdec: wrote {out}; use it with --target {out} (or --draft)")
    return 0
