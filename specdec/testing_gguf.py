"""Tiny GGUF files for the tests, written with the `gguf` package's writer from a tiny Hugging Face
checkpoint (`testing.write_tiny_checkpoint`), laid out as llama.cpp's converter lays them out:
llama.cpp's tensor names, its rotary permutation of Llama's query and key projections, the
tokenizer as a token list with merges, the chat template in the metadata.

Types: whatever `gguf.quants.quantize` can produce (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
The K-quants (Q4_K, Q6_K: what users mostly download) it cannot write, so `kquant_blocks` packs
their blocks by hand from random bits: the values are not any model's, but the loaders must still
agree on them, which is what the tests hold them to.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

# llama.cpp's names for our per-layer tensors (HF name after "model.layers.N.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a Llama q/k projection (rotary halves interleaved per head)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    checkpoint: str | Path, out: str | Path, qtype: str = "F32", embedding_qtype: str | None = None
) -> Path:
    """GGUF file `out` holding the Llama or Qwen2 checkpoint directory `checkpoint`: 2-D weights in
    `qtype`, the token embedding in `embedding_qtype` (default: the same; SmolLM2 stores it as
    Q8_0), norms and biases in F32 as llama.cpp keeps them."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    config = AutoConfig.from_pretrained(checkpoint)
    arch = config.model_type
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"write_tiny_gguf writes llama and qwen2, not {arch}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    state = load_file(str(checkpoint / "model.safetensors"))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(checkpoint.name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    _add_tokenizer(writer, tokenizer, checkpoint)

    for name, tensor in state.items():
        array = tensor.float().numpy()
        if name in _GLOBAL_NAMES:
            gguf_name = _GLOBAL_NAMES[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_LAYER_NAMES[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                array = _permute(array, heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                array = _permute(array, kv_heads)
        kind = embedding_qtype if gguf_name == "token_embd.weight" and embedding_qtype else qtype
        _add(writer, gguf_name, array, kind if array.ndim == 2 else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer: Any, name: str, array: np.ndarray, kind: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    elif kind in ("Q4_K", "Q6_K"):
        writer.add_tensor(
            name, kquant_blocks(array.shape, kind, seed=zlib.crc32(name.encode())), raw_dtype=qtype
        )
    else:
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)


def kquant_blocks(shape: tuple[int, ...], kind: str, seed: int = 0) -> np.ndarray:
    """Hand-packed `kind` blocks (rows of 256 values) for a weight of `shape`: random quants and
    scales, small finite f16 super-block scales, so every dequantized value is finite and modest."""
    import gguf

    rows, cols = shape
    if cols % 256:
        raise ValueError(f"K-quant rows hold multiples of 256 values, not {cols}")
    rng = np.random.default_rng(seed)
    blocks = rows * cols // 256
    if kind == "Q4_K":  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        d = (rng.uniform(0.5, 1.0, blocks) * 2e-3).astype(np.float16).view(np.uint8).reshape(blocks, 2)
        dmin = (rng.uniform(0.5, 1.0, blocks) * 1e-3).astype(np.float16).view(np.uint8).reshape(blocks, 2)
        body = rng.integers(0, 256, (blocks, 12 + 128), dtype=np.uint8)
        packed = np.concatenate([d, dmin, body], axis=1)
    elif kind == "Q6_K":  # 128 bytes low bits, 64 bytes high bits, 16 int8 scales, d (f16)
        bits = rng.integers(0, 256, (blocks, 192), dtype=np.uint8)
        scales = rng.integers(-32, 32, (blocks, 16), dtype=np.int8).view(np.uint8)
        d = (rng.uniform(0.5, 1.0, blocks) * 1e-4).astype(np.float16).view(np.uint8).reshape(blocks, 2)
        packed = np.concatenate([bits, scales, d], axis=1)
    else:
        raise ValueError(f"no hand packing for {kind}")
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    assert packed.shape[1] == block_bytes
    return packed.reshape(rows, cols // 256 * block_bytes)


def _add_tokenizer(writer: Any, tokenizer: Any, checkpoint: Path) -> None:
    """The byte-level BPE tokenizer as llama.cpp stores one ("gpt2": tokens, types, merges)."""
    import gguf

    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """`transformers`' own logits for GGUF file `path` (fp32, eager attention): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]
