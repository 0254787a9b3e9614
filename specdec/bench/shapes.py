"""Randomly initialised models of real shapes, built in memory, for cost and bandwidth measurement.

Nothing is downloaded: the configs below are the published shapes, the weights are N(0, 0.02), and
the tokenizer is synthetic (word-level, the shape's vocabulary size). A random pair accepts almost
nothing, so these shapes measure costs (step times, bandwidth, cost ratio c); acceptance comes
from the trained demo pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.models.config import ModelConfig, RopeConfig, check_config
from specdec.models.decoder import Decoder
from specdec.models.loader import LoadedModel


@dataclass(frozen=True)
class Shape:
    model_type: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int | None = None
    tie: bool = False
    qkv_bias: bool = False
    rope_theta: float = 500000.0
    max_positions: int = 8192


# Published shapes (config.json of each model), and small ones that run anywhere.
SHAPES: dict[str, Shape] = {
    "llama-3-8b": Shape("llama", 128256, 4096, 32, 32, 8, 14336),
    "llama-3.2-1b": Shape("llama", 128256, 2048, 16, 32, 8, 8192, tie=True),
    "qwen2.5-7b": Shape("qwen2", 152064, 3584, 28, 28, 4, 18944, qkv_bias=True, rope_theta=1e6),
    "qwen2.5-0.5b": Shape("qwen2", 151936, 896, 24, 14, 2, 4864, tie=True, qkv_bias=True, rope_theta=1e6),
    "tiny-1b-like": Shape("llama", 8192, 512, 8, 8, 4, 1408, tie=True),
    "tiny-draft": Shape("llama", 8192, 512, 1, 8, 4, 1408, tie=True),
}
# The draft that goes with each target shape when only --shape is given.
DEFAULT_DRAFT = {"llama-3-8b": "llama-3.2-1b", "qwen2.5-7b": "qwen2.5-0.5b", "tiny-1b-like": "tiny-draft"}


def model_config(shape: Shape) -> ModelConfig:
    head_dim = shape.head_dim or shape.hidden // shape.heads
    cfg = ModelConfig(
        model_type=shape.model_type,
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_layers=shape.layers,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        rope=RopeConfig("default", shape.rope_theta, head_dim),
        tie_word_embeddings=shape.tie,
        qkv_bias=shape.qkv_bias,
        sliding_windows=tuple([None] * shape.layers),
        eos_token_ids=(0,),
    )
    check_config(cfg)
    return cfg


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer of exactly `vocab_size` entries ("t0", "t1", ...; "t0" is EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t0", unk_token="t0", pad_token="t0")


def random_model(
    name: str, device: torch.device, dtype: torch.dtype, tokenizer: Any, seed: int = 0
) -> LoadedModel:
    """The named shape with N(0, 0.02) weights (norms at 1), on `device`, never written to disk."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    cfg = model_config(SHAPES[name])
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or ".q_norm." in pname or ".k_norm." in pname:
                param.fill_(1.0)
            elif pname.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.eval().requires_grad_(False)
    return LoadedModel(
        path=Path(f"random:{name}"), name=name, config=cfg, model=model, tokenizer=tokenizer, hf_config=None
    )


def weight_bytes(lm: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def hf_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The same shape as a randomly initialised `transformers` model (for the HF baselines)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[name]
    config = AutoConfig.for_model(
        shape.model_type,
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        head_dim=shape.head_dim or shape.hidden // shape.heads,
        tie_word_embeddings=shape.tie,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_positions,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)
