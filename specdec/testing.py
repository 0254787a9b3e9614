"""Tiny random checkpoints, for tests and for trying specdec without downloading weights.

    from specdec.testing import write_tiny_checkpoint
    path = write_tiny_checkpoint("/tmp/tiny-llama", "llama", vocab_size=320)

writes a real Hugging Face checkpoint directory: ``config.json`` and ``model.safetensors`` saved by
`transformers`' ``save_pretrained``, and a byte-level BPE tokenizer trained with `tokenizers`. The
loader treats it exactly like a downloaded one. ``vocab_size`` is the logits width; the tokenizer
has ``tokenizer_vocab`` entries, so a larger ``vocab_size`` gives a padded vocabulary, as real
checkpoints often have.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from specdec.tokenization import END_OF_TEXT, train_byte_bpe

# A small mixed corpus: enough structure for BPE merges, embedded so nothing is read from disk.
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "while True:\n    line = f.readline()\n    if not line:\n        break\n",
    "return {'key': value, 'items': [1, 2, 3]}\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "try:\n    x = int(s)\nexcept ValueError:\n    x = 0\n",
] * 4

# Per-architecture defaults for a tiny model; the caller's keyword arguments override them.
# Each exercises what makes its family different: windows shorter than the test sequences, a
# head_dim that is not hidden / heads, partial rotary, soft-capping, tied embeddings.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 24},
    "phi3": {
        "sliding_window": 20,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    },
    "gemma2": {
        "head_dim": 32,
        "sliding_window": 12,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}


@functools.lru_cache(maxsize=8)
def _tokenizer(vocab: int) -> Any:
    return train_byte_bpe(_CORPUS, vocab_size=vocab, min_frequency=1)


def tiny_tokenizer(vocab: int = 300) -> Any:
    """The test tokenizer with `vocab` entries (ids 0..2 are the special tokens)."""
    return _tokenizer(vocab)


@functools.lru_cache(maxsize=4)
def word_tokenizer(vocab: int = 16) -> Any:
    """A word-level tokenizer of `vocab` entries ("w3", "w4", ... after the three specials): for
    tests that need a vocabulary small enough to enumerate joint distributions exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specdec.tokenization import CHAT_TEMPLATE, IM_END, IM_START, SPECIAL_TOKENS

    words = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    words.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    vocab_size: int = 320,
    tokenizer_vocab: int = 300,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    initializer_range: float = 0.1,
    tokenizer: str = "bpe",
    **overrides: Any,
) -> Path:
    """Write a randomly initialised `arch` checkpoint with a real tokenizer to `path`.

    tokenizer: "bpe" (byte-level BPE of `tokenizer_vocab` entries) or "words" (word-level)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if vocab_size < tokenizer_vocab:
        raise ValueError("vocab_size (logits width) must be >= tokenizer_vocab")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer not in ("bpe", "words"):
        raise ValueError(f"tokenizer must be 'bpe' or 'words', got {tokenizer!r}")
    tok = tiny_tokenizer(tokenizer_vocab) if tokenizer == "bpe" else word_tokenizer(tokenizer_vocab)
    eos = tok.convert_tokens_to_ids(END_OF_TEXT)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        **_ARCH_DEFAULTS.get(arch, {}),
    }
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def perturb_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], noise: float, seed: int = 0
) -> Path:
    """Copy checkpoint `src` to `dst` with Gaussian noise of relative scale `noise` on every weight:
    a "draft" that agrees with its target often but not always."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {}
    for name, tensor in weights.items():
        scale = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        noisy[name] = tensor + noise * scale * torch.randn(
            tensor.shape, generator=generator, dtype=tensor.dtype
        )
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
