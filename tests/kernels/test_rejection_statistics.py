"""Statistical proof that rejection sampling emits the target's distribution - and that the test
would catch a wrong rule (negative controls).

Synthetic p and q, the same sharp, distinct pair at every position, vocabulary 12: the first
emitted token must follow p, and the accepted count must follow β^i (1 - β) for i < γ and β^γ for
i = γ, with β = Σ min(p, q). Pearson χ² at significance 1e-3, 40 000 rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.kernels.philox import STREAM_DRAFT
from specdec.kernels.rejection_sample import rejection_sample_reference
from specdec.kernels.sample import sample_reference
from specdec.testing import chi_square_pvalue

ALPHA = 1e-3
N = 40_000
GAMMA = 4
V = 12

# Sharp and distinct: the mass sits on different tokens in p and q, and β is about 0.5.
P = torch.softmax(torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0]), 0)
Q = torch.softmax(torch.tensor([0.0, 1.0, 3.0, 2.5, 2.0, 0.5, -0.5, 0.0, -2.0, -1.0, -4.0, -3.0]), 0)


def _wrong_replacement(p, q):
    return p  # replacement drawn from p instead of the residual


def _inverted_ratio(p_d, q_d, u):
    return u * p_d < q_d  # accepts with min(1, q/p)


def _run(accept_rule=None, residual_rule=None, seed_base=0):
    p = P.expand(N, GAMMA + 1, V).contiguous()
    q = Q.expand(N, GAMMA, V).contiguous()
    seeds = torch.arange(N, dtype=torch.int64) + seed_base * N
    positions = torch.full((N,), 17, dtype=torch.int64)
    drafts = torch.stack(
        [
            sample_reference(
                q[:, j].log(),
                q[:, j],
                torch.zeros(N, dtype=torch.bool),
                seeds,
                positions + j,
                STREAM_DRAFT,
                V,
            )[0]
            for j in range(GAMMA)
        ],
        1,
    )
    kwargs = {}
    if accept_rule:
        kwargs["accept_rule"] = accept_rule
    if residual_rule:
        kwargs["residual_rule"] = residual_rule
    accepted, tokens, bad = rejection_sample_reference(
        p, q, torch.arange(N), torch.zeros(N, dtype=torch.bool), drafts, torch.full((N,), GAMMA),
        torch.ones(N, dtype=torch.bool), seeds, positions, V, **kwargs,
    )  # fmt: skip
    assert not bad.any()
    return accepted.numpy(), tokens.numpy()


def _token_pvalue(tokens):
    return chi_square_pvalue(np.bincount(tokens[:, 0], minlength=V), P.numpy())


def _accepted_pvalue(accepted):
    beta = float(torch.minimum(P, Q).sum())
    expected = [beta**i * (1 - beta) for i in range(GAMMA)] + [beta**GAMMA]
    return chi_square_pvalue(np.bincount(accepted, minlength=GAMMA + 1), expected)


@pytest.fixture(scope="module")
def correct():
    return _run()


def test_emitted_tokens_follow_p(correct):
    _accepted, tokens = correct
    assert _token_pvalue(tokens) > ALPHA


def test_accepted_counts_follow_the_truncated_geometric(correct):
    accepted, _tokens = correct
    assert _accepted_pvalue(accepted) > ALPHA


def test_the_draft_proposals_follow_q():
    """The proposals themselves (the exponential race over q) are distributed as q."""
    seeds = torch.arange(N, dtype=torch.int64)
    q = Q.expand(N, V).contiguous()
    drafts, _ = sample_reference(
        q.log(),
        q,
        torch.zeros(N, dtype=torch.bool),
        seeds,
        torch.zeros(N, dtype=torch.int64),
        STREAM_DRAFT,
        V,
    )
    assert chi_square_pvalue(np.bincount(drafts.numpy(), minlength=V), Q.numpy()) > ALPHA


@pytest.mark.parametrize("rule", ["replacement from p", "inverted ratio"])
def test_negative_controls_fail(rule):
    """A deliberately wrong rule must be rejected by the same tests: they have power."""
    kwargs = (
        {"residual_rule": _wrong_replacement}
        if rule == "replacement from p"
        else {"accept_rule": _inverted_ratio}
    )
    accepted, tokens = _run(**kwargs)
    assert _token_pvalue(tokens) < ALPHA
    if rule == "inverted ratio":
        assert _accepted_pvalue(accepted) < ALPHA
