"""Stop conditions: EOS, stop ids, stop strings spanning tokens (with hold-back), limits."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.request import FinishReason
from specdec.stopping import IncrementalDetokenizer, OutputStopper
from specdec.testing import tiny_tokenizer
from specdec.tokenization import TokenPieces


def _stopper(tok, prompt, stop=(), max_new=100, max_total=1000, eos=(0,), stop_ids=()):
    return OutputStopper(TokenPieces(tok), prompt, eos, stop_ids, stop, max_new, max_total)


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


def _tokenizers():
    """The tiny byte-level BPE, and a copy with a token added by hand (decoded literally, not
    through the byte alphabet: 'ü' is also an alphabet character, standing for byte 0xFC)."""
    plain = tiny_tokenizer()
    added = copy.deepcopy(plain)
    added.add_tokens(["ü-mark"])
    return {"plain": plain, "added": added}


TOKENIZERS = _tokenizers()


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("byte_level", [True, False])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_text_is_what_the_tokenizer_decodes(name, byte_level, data):
    """Pushed token by token - random ids: specials, partial UTF-8 characters, added tokens - the
    detokenizer's text equals one tokenizer.decode of the whole output, on the byte path (no
    tokenizer call) and on the window path alike, and no streamed delta is ever taken back."""
    tok = TOKENIZERS[name]
    pieces = TokenPieces(tok)
    assert pieces.byte_level
    if not byte_level:
        pieces.byte_level = False  # the SentencePiece path, on the same tokenizer
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    # The window path decodes a few prompt tokens with the output; a prompt that ends inside a
    # UTF-8 character can swallow an incomplete character of the output there (the byte path has no
    # context and no such case). Prompts here end on a whole character, as text prompts do.
    text = data.draw(st.text(alphabet="abc xyz=(1)\n", min_size=1, max_size=12))
    prompt = tok.encode(text, add_special_tokens=False) or [5]
    detok = IncrementalDetokenizer(pieces, prompt)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    expected = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert streamed == detok.text == expected


def test_the_byte_path_calls_no_tokenizer_per_token(monkeypatch):
    tok = tiny_tokenizer()
    pieces = TokenPieces(tok)
    ids = tok.encode("naïve café ✓ " * 4, add_special_tokens=False)
    for i in ids:
        pieces.bytes(i)  # the per-token cache is warm, as after a few requests
    monkeypatch.setattr(tok, "decode", lambda *a, **k: pytest.fail("decode called"))
    monkeypatch.setattr(tok, "convert_ids_to_tokens", lambda *a, **k: pytest.fail("lookup called"))
    detok = IncrementalDetokenizer(pieces, [5])
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "naïve café ✓ " * 4
