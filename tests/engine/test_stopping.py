"""Stop conditions: EOS, stop ids, stop strings spanning tokens (with hold-back), limits."""

from __future__ import annotations

from specdec.request import FinishReason
from specdec.stopping import OutputStopper
from specdec.testing import tiny_tokenizer


def _stopper(tok, prompt, stop=(), max_new=100, max_total=1000, eos=(0,), stop_ids=()):
    return OutputStopper(tok, prompt, eos, stop_ids, stop, max_new, max_total)


def _ids_per_char(tok, text):
    """Token ids that spell `text` one character at a time (so a stop string spans tokens)."""
    return [tok.convert_tokens_to_ids(tok.tokenize(ch))[0] for ch in text]


def test_stop_string_spanning_tokens_truncates_exactly():
    tok = tiny_tokenizer()
    ids = _ids_per_char(tok, "abcSTOPxyz")
    s = _stopper(tok, [5], stop=("STOP",))
    kept, reason = s.consume(ids)
    assert reason is FinishReason.STOP and kept == 7  # up to and including the 'P'
    assert s.take_text(final=True) == "abc"


def test_hold_back_a_possible_stop_prefix_while_streaming():
    tok = tiny_tokenizer()
    s = _stopper(tok, [5], stop=("STOP",))
    s.consume(_ids_per_char(tok, "abST"))
    assert s.take_text(final=False) == "ab"  # "ST" might begin "STOP"
    s.consume(_ids_per_char(tok, "ay"))
    assert s.take_text(final=False) == "STay"
    assert s.take_text(final=True) == ""


def test_eos_and_stop_ids_are_kept_as_ids_not_text():
    tok = tiny_tokenizer()
    ids = _ids_per_char(tok, "hi")
    s = _stopper(tok, [5], stop_ids=(ids[1],))
    assert s.consume(ids + [7]) == (2, FinishReason.STOP)
    s = _stopper(tok, [5])
    assert s.consume([ids[0], 0, 9]) == (2, FinishReason.EOS)
    assert s.take_text(final=True) == "h"


def test_max_new_tokens_and_context_limit():
    tok = tiny_tokenizer()
    assert _stopper(tok, [5], max_new=3).consume([10, 11, 12, 13]) == (3, FinishReason.LENGTH)
    assert _stopper(tok, [5, 6], max_total=4).consume([10, 11, 12]) == (2, FinishReason.CONTEXT)
    s = _stopper(tok, [5], max_new=10)
    assert s.consume([10, 11]) == (2, None)
    assert s.consume([12]) == (1, None)


def test_incremental_text_equals_full_decode():
    tok = tiny_tokenizer()
    text = "def add(a, b):\n    return a + b  # é ü 中文\n"
    ids = tok.encode(text, add_special_tokens=False)
    s = _stopper(tok, [5])
    pieces = []
    for t in ids:
        s.consume([t])
        pieces.append(s.take_text(final=False))
    pieces.append(s.take_text(final=True))
    assert "".join(pieces) == tok.decode(ids) == text
