"""The greedy acceptance kernel against its reference on random ragged batches."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton

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
    _accepted, tokens, bad = _check(*_case(seed=seed))
    assert (tokens < 257).all() and not bad.any()


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
    logits[6, 5, 0] = float("-inf")  # -inf alone is non-finite too
    logits[7, :, 300 - 1] = float("nan")  # NaN only in a padded lane: not this row's problem
    accepted, tokens, bad = _check(logits, drafts, num, vocab)
    assert bad.tolist() == [False, True, False, False, True, False, True, False]
    assert (accepted[bad] == 0).all() and ((tokens >= 0) & (tokens < vocab)).all()


def test_nan_past_a_rows_drafts_is_ignored():
    logits, drafts, num, vocab = _case(seed=4)
    num[:] = 2
    logits[:, 4, 3] = float("nan")  # position 4 > γ = 2: not read
    _accepted, _tokens, bad = _check(logits, drafts, num, vocab)
    assert not bad.any()
