"""Tokenizer helpers: training a byte-level BPE, and the vocabulary a model may emit.

The demo pair and the tiny test checkpoints both use `train_byte_bpe`, so tests exercise the same
kind of tokenizer that ships.
"""

from __future__ import annotations

from collections.abc import Iterable
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
