"""The greedy acceptance kernel against its reference on random ragged batches."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE

# On a GPU the kernels are compiled for real and compared on CUDA tensors; here, interpreted.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(b=8, g=5, width=300, vocab=257, seed=0, agree=0.7):
    """Logits with the argmax forced to the draft token with probability `agree` per position."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, g + 1, width, generator=gen)
    logits[..., vocab:] = 100.0  # padded lanes: huge, and must never win
    drafts = torch.randint(0, vocab, (b, g), generator=gen)
    agree_mask = torch.rand(b, g, generator=gen) < agree
    for i in range(b):
        for j in range(g):
            if agree_mask[i, j]:
                logits[i, j, drafts[i, j]] = 10.0
    num_drafts = torch.randint(0, g + 1, (b,), generator=gen)
    return logits.to(DEVICE), drafts.to(DEVICE), num_drafts.to(DEVICE), vocab


def _check(logits, drafts, num_drafts, vocab, block=64):
    ref = greedy_accept_reference(logits, drafts, num_drafts, vocab)
    got = greedy_accept_triton(logits, drafts, num_drafts, vocab, block=block)
    for r, k in zip(ref, got):
        assert torch.equal(r, k), (r, k)
    return ref


@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_batches(seed):
    _accepted, tokens, status = _check(*_case(seed=seed))
    assert (tokens < 257).all() and not status.any()


def test_all_accepted_emits_the_bonus():
    logits, drafts, _, vocab = _case(agree=1.0)
    num = torch.full((8,), 5, device=DEVICE)
    accepted, tokens, _ = _check(logits, drafts, num, vocab)
    assert (accepted == 5).all()
    assert torch.equal(tokens[:, :5], drafts)
    assert torch.equal(tokens[:, 5], logits[:, 5, :vocab].argmax(-1))


def test_first_rejected_emits_the_correction():
    logits, drafts, _, vocab = _case(agree=1.0)
    drafts[:, 0] = (logits[:, 0, :vocab].argmax(-1) + 1) % vocab
    accepted, tokens, _ = _check(logits, drafts, torch.full((8,), 5, device=DEVICE), vocab)
    assert (accepted == 0).all()
    assert torch.equal(tokens[:, 0], logits[:, 0, :vocab].argmax(-1))


def test_gamma_zero_rows_are_plain_greedy_steps():
    logits, drafts, _, vocab = _case()
    accepted, tokens, _ = _check(logits, drafts, torch.zeros(8, dtype=torch.int64, device=DEVICE), vocab)
    assert (accepted == 0).all() and torch.equal(tokens[:, 0], logits[:, 0, :vocab].argmax(-1))
    _check(
        logits[:, :1], drafts[:, :0], torch.zeros(8, dtype=torch.int64, device=DEVICE), vocab
    )  # G = 0 overall


def test_vocabulary_not_a_multiple_of_the_block():
    for vocab in (1, 63, 65, 129, 299):
        _check(*_case(vocab=vocab, width=301)[:3], vocab, block=64)


def test_non_finite_rows_are_flagged_and_stay_in_vocabulary():
    logits, drafts, num, vocab = _case(seed=3)
    num[:] = 5
    logits[1, 2, 7] = float("nan")
    logits[4, 0, :] = float("inf")
    logits[6, 5, 0] = float("-inf")  # -inf is an impossible token, not a bad number
    logits[7, :, 300 - 1] = float("nan")  # NaN only in a padded lane: not this row's problem
    accepted, tokens, status = _check(logits, drafts, num, vocab)
    assert status.tolist() == [0, ROW_NONFINITE, 0, 0, ROW_NONFINITE, 0, 0, 0]
    assert (accepted[status != 0] == 0).all() and ((tokens >= 0) & (tokens < vocab)).all()


def test_minus_infinity_masks_tokens_and_an_empty_deciding_position_fails_the_row():
    logits, drafts, num, vocab = _case(seed=5, agree=1.0)
    num[:] = 5
    # Row 0: its best token at the bonus position is masked out: the bonus is the best unmasked one.
    best = logits[0, 5, :vocab].argmax()
    logits[0, 5, best] = float("-inf")
    # Row 1: nothing possible at position 0, which decides: ROW_NO_TOKEN, never emitted as id 0.
    logits[1, 0, :vocab] = float("-inf")
    # Row 2: the draft is rejected at position 1; position 3, never reached, has nothing possible.
    drafts[2, 1] = (logits[2, 1, :vocab].argmax() + 1) % vocab
    logits[2, 3, :vocab] = float("-inf")
    # Row 3: nothing possible after a full accept, at the bonus position that decides.
    logits[3, 5, :vocab] = float("-inf")
    accepted, tokens, status = _check(logits, drafts, num, vocab)
    assert status.tolist() == [0, ROW_NO_TOKEN, 0, ROW_NO_TOKEN, 0, 0, 0, 0]
    masked = logits[0, 5, :vocab].clone()
    assert accepted[0] == 5 and tokens[0, 5] == masked.argmax() and tokens[0, 5] != best
    assert accepted[1] == 0 and accepted[3] == 0
    assert accepted[2] == 1 and tokens[2, 1] == logits[2, 1, :vocab].argmax()


def test_draft_ids_outside_the_vocabulary_are_never_accepted():
    logits, drafts, num, vocab = _case(seed=6, agree=1.0)
    num[:] = 5
    drafts[0, 0] = vocab + 3  # clamped it would be vocab - 1; make that the argmax too
    logits[0, 0, vocab - 1] = 50.0
    drafts[1, 2] = -1
    logits[1, 2, 0] = 50.0
    accepted, tokens, status = _check(logits, drafts, num, vocab)
    assert accepted[0] == 0 and tokens[0, 0] == vocab - 1  # the target's own choice, not an acceptance
    assert accepted[1] == 2 and not status.any()


def test_nan_past_a_rows_drafts_is_ignored():
    logits, drafts, num, vocab = _case(seed=4)
    num[:] = 2
    logits[:, 4, 3] = float("nan")  # position 4 > γ = 2: not read
    _accepted, _tokens, status = _check(logits, drafts, num, vocab)
    assert not status.any()
