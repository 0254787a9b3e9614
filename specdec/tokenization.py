"""Tokenizer helpers: training a byte-level BPE, the vocabulary a model may emit, and each token's
exact bytes (`TokenPieces`).

The demo pair and the tiny test checkpoints both use `train_byte_bpe`, so tests exercise the same
kind of tokenizer that ships.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

# ChatML, the template most small instruction-tuned models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE (every byte string encodable) of `vocab_size` entries, specials included,
    wrapped as a `transformers` fast tokenizer with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def real_vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can decode (base vocabulary plus added tokens)."""
    return len(tokenizer)


def emittable_vocab_size(target: Any, draft: Any = None) -> int:
    """Ids an engine on these models takes and emits: the target tokenizer's, within the target's
    logits and the draft's embedding rows (every emitted token is fed to the draft). Not within the
    draft's head: a subset head is narrower than the vocabulary, and the target still decides."""
    size = min(real_vocab_size(target.tokenizer), target.config.vocab_size)
    return size if draft is None else min(size, draft.config.vocab_size)


class TokenPieces:
    """Each token's exact bytes, and which tokens decoding skips: what the incremental detokenizer
    (`stopping.IncrementalDetokenizer`) and OpenAI's logprobs (`bytes`) need.

    For a byte-level BPE (GPT-2's alphabet: Llama 3, Qwen 2, SmolLM2, the tiny test tokenizers) a
    token's bytes come from the alphabet, so a token that is part of a UTF-8 character is still
    exact, and the text of a sequence is the UTF-8 decoding of its tokens' bytes joined - what
    `tokenizer.decode(..., skip_special_tokens=True, clean_up_tokenization_spaces=False)` gives,
    without calling it (special tokens are skipped). For other tokenizers (SentencePiece) a token's
    bytes are its byte-fallback byte or its decoding alone; `byte_level` says which holds."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_level = _decoder_is_byte_level(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | {
            i for i, t in added.items() if getattr(t, "special", False)
        }
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self.byte_level:
            # As the `tokenizers` ByteLevel decoder does, added tokens included: the alphabet's
            # bytes when every character is in it, else the piece's own UTF-8.
            alphabet = _byte_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode("utf-8")
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece's byte fallback
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


def _decoder_is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder is exactly GPT-2's ByteLevel (nothing stripped or replaced
    after it, so joining token bytes is decoding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    return decoder.get("type") == "ByteLevel"


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable character for each of the 256 byte values, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}
