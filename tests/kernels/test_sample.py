"""The token-draw kernel against its reference, and the exponential race against its definition."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from specdec.kernels.philox import STREAM_DRAFT
from specdec.kernels.sample import sample_reference, sample_triton
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(n=12, width=300, vocab=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, width, generator=g) * 2
    logits[:, vocab:] = 50.0  # padded lanes with huge logits: must never win
    probs = torch.softmax(logits[:, :vocab], -1)
    greedy = torch.arange(n) % 3 == 0
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    positions = torch.randint(0, 10_000, (n,), generator=g)
    return tuple(t.to(DEVICE) for t in (logits, probs, greedy, seeds, positions)) + (vocab,)


def test_kernel_equals_reference():
    logits, probs, greedy, seeds, positions, vocab = _case()
    ref = sample_reference(logits, probs, greedy, seeds, positions, STREAM_DRAFT, vocab)
    # A block smaller than the vocabulary, not dividing it: the cross-block argmax is exercised.
    got = sample_triton(logits, probs, greedy, seeds, positions, STREAM_DRAFT, vocab, block=64)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert (ref[0] < vocab).all() and not ref[1].any()


def test_bad_rows_are_flagged_and_stay_in_vocabulary():
    logits, probs, greedy, seeds, positions, vocab = _case(n=6)
    logits[0, 5] = float("nan")  # greedy row with a NaN
    probs[1, :] = 0.0  # sampled row with no mass: nothing possible
    probs[2, 7] = float("inf")
    logits[3, :] = float("-inf")  # greedy row, all -inf: nothing possible
    greedy[4] = True
    logits[4, :5] = float("-inf")  # greedy row, some tokens impossible: fine
    logits[4, 2] = float("-inf")
    for fn in (sample_reference, sample_triton):
        tokens, status = fn(logits, probs, greedy, seeds, positions, STREAM_DRAFT, vocab)
        assert status.tolist() == [ROW_NONFINITE, ROW_NO_TOKEN, ROW_NONFINITE, ROW_NO_TOKEN, 0, 0]
        assert ((tokens >= 0) & (tokens < vocab)).all() and (tokens[status != 0] == 0).all()
        assert tokens[4] == logits[4, :vocab].argmax() and tokens[4] >= 5


def test_greedy_rows_take_the_argmax_of_the_real_vocabulary():
    logits, _probs, _greedy, seeds, positions, vocab = _case()
    greedy = torch.ones(len(logits), dtype=torch.bool, device=DEVICE)
    tokens, _ = sample_reference(logits, None, greedy, seeds, positions, STREAM_DRAFT, vocab)
    assert torch.equal(tokens, logits[:, :vocab].argmax(-1))


def test_race_samples_follow_p():
    """Many independent draws (distinct positions) from one p match it by χ² at 1e-3."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0])
    n = 20_000
    probs = p.expand(n, -1).contiguous()
    tokens, bad = sample_reference(
        probs.log(),
        probs,
        torch.zeros(n, dtype=torch.bool),
        torch.full((n,), 7),
        torch.arange(n),
        STREAM_DRAFT,
        8,
    )
    assert not bad.any()
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[7] == 0
    assert chisquare(counts[:7].numpy(), (p[:7] * n).numpy()).pvalue > 1e-3
