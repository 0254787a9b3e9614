"""Stop conditions, in one place: EOS, stop token ids, stop strings, max new tokens, the context limit.

A speculative step can emit several tokens at once; `OutputStopper.consume` walks them in order and
says how many to keep, so a stop inside an accepted run truncates it exactly where a token-by-token
decoder would have stopped.

Stop strings can span tokens, so the output is detokenised incrementally and the tail of the text
is searched after every token. Text that could still be the start of a stop string is held back
from streaming until it is known not to be one.

Detokenising costs what the new text does. With a byte-level BPE (`TokenPieces.byte_level`) a
token's text is its bytes through an incremental UTF-8 decoder: no tokenizer call at all. Other
tokenizers (SentencePiece, whose decoders drop a leading space at the start of a decode) take
vLLM's way: two decodes per token of a short window, with a few prompt tokens of context.
"""

from __future__ import annotations

import codecs

from specdec.request import FinishReason
from specdec.tokenization import TokenPieces

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output for context (vLLM does the same)


class IncrementalDetokenizer:
    def __init__(self, pieces: TokenPieces, prompt_ids: list[int]):
        self.pieces = pieces
        self.tokenizer = pieces.tokenizer
        self.text = ""
        # Byte-level: bytes in, text out, a partial UTF-8 character held until it completes.
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if pieces.byte_level else None
        # Otherwise: windows of ids decoded by the tokenizer.
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "" while a UTF-8 character is split)."""
        if self.utf8 is not None:
            if token_id in self.pieces.special_ids:
                return ""
            delta = self.utf8.decode(self.pieces.bytes(token_id))
            self.text += delta
            return delta
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is pending, even an incomplete character (as U+FFFD)."""
        if self.utf8 is not None:
            delta = self.utf8.decode(b"", final=True)
        else:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            delta = full[len(prefix) :] if len(full) > len(prefix) else ""
            self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class OutputStopper:
    """One request's output text and stop state."""

    def __init__(
        self,
        pieces: TokenPieces,
        prompt_ids: list[int],
        eos_token_ids: tuple[int, ...] | frozenset[int],
        stop_token_ids: tuple[int, ...],
        stop_strings: tuple[str, ...],
        max_new_tokens: int,
        max_total_tokens: int,
    ):
        self.detok = IncrementalDetokenizer(pieces, prompt_ids)
        self.eos = frozenset(eos_token_ids)
        self.stop_ids = frozenset(stop_token_ids)
        self.stop_strings = stop_strings
        self.max_new_tokens = max_new_tokens
        self.max_total_tokens = max_total_tokens
        self.num_prompt = len(prompt_ids)
        self.generated = 0
        self.text_end: int | None = None  # where the text is cut when a stop string matched
        self.emitted_chars = 0

    @property
    def text(self) -> str:
        return self.detok.text if self.text_end is None else self.detok.text[: self.text_end]

    def consume(self, tokens: list[int]) -> tuple[int, FinishReason | None]:
        """Take `tokens` in order; return how many are kept and the finish reason if one stopped."""
        for i, token in enumerate(tokens):
            self.generated += 1
            kept = i + 1
            if token in self.eos:
                return kept, FinishReason.EOS
            if token in self.stop_ids:
                return kept, FinishReason.STOP
            delta = self.detok.push(token)
            if delta and self.stop_strings and self._find_stop(len(delta)):
                return kept, FinishReason.STOP
            if self.generated >= self.max_new_tokens:
                return kept, FinishReason.LENGTH
            if self.num_prompt + self.generated >= self.max_total_tokens:
                return kept, FinishReason.CONTEXT
        return len(tokens), None

    def _find_stop(self, delta_len: int) -> bool:
        text = self.detok.text
        longest = max(len(s) for s in self.stop_strings)
        window_start = max(0, len(text) - delta_len - longest + 1)
        hits = [i for s in self.stop_strings if (i := text.find(s, window_start)) >= 0]
        if hits:
            self.text_end = min(hits)
            return True
        return False

    def take_text(self, final: bool) -> str:
        """Text not yet handed out. Unless final, keep back a tail that could begin a stop string."""
        if final and self.text_end is None:
            self.detok.flush()
        text = self.text
        end = len(text)
        if not final and self.stop_strings:
            end -= self._partial_stop_suffix(text)
        delta = text[self.emitted_chars : max(end, self.emitted_chars)]
        self.emitted_chars = max(end, self.emitted_chars)
        return delta

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
