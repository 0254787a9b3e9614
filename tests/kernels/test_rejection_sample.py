"""The rejection-sampling kernel against its reference (Triton interpreter on CPU), and the
properties that do not need statistics: batch-position invariance, robustness to bad numbers."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.philox import STREAM_DRAFT
from specdec.kernels.rejection_sample import rejection_sample_reference, rejection_sample_triton
from specdec.kernels.sample import sample_reference
from specdec.kernels.status import ROW_NO_TOKEN, ROW_NONFINITE
from specdec.sampling import SamplingParams, SamplingTensors, probabilities

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _probs(gen, rows, width, vocab, sharp=2.0, params=None):
    logits = torch.randn(rows, width, generator=gen) * sharp
    st = SamplingTensors.from_params(params or [SamplingParams(temperature=1.0)] * rows, torch.device("cpu"))
    return probabilities(logits[:, :vocab], st)


def _case(b=8, g=4, vocab=200, seed=0, same=False, params=None):
    gen = torch.Generator().manual_seed(seed)
    row_params = params or [SamplingParams(temperature=1.0)] * b
    p = _probs(gen, b * (g + 1), vocab, vocab, params=[sp for sp in row_params for _ in range(g + 1)]).view(
        b, g + 1, vocab
    )
    q = (
        p[:, :g].clone()
        if same
        else _probs(gen, b * g, vocab, vocab, params=[sp for sp in row_params for _ in range(g)]).view(
            b, g, vocab
        )
    )
    seeds = torch.randint(0, 2**62, (b,), generator=gen)
    positions = torch.randint(0, 5000, (b,), generator=gen)
    # Drafts sampled from q, as the draft model would.
    drafts = torch.stack(
        [
            sample_reference(
                q[:, j].log(),
                q[:, j],
                torch.zeros(b, dtype=torch.bool),
                seeds,
                positions + j,
                STREAM_DRAFT,
                vocab,
            )[0]
            for j in range(g)
        ],
        1,
    )
    return {
        "p": p.contiguous(),
        "q": q.contiguous(),
        "q_row": torch.arange(b),
        "point_mass": torch.zeros(b, dtype=torch.bool),
        "draft_tokens": drafts,
        "num_drafts": torch.full((b,), g),
        "active": torch.ones(b, dtype=torch.bool),
        "seeds": seeds,
        "positions": positions,
        "vocab_size": vocab,
    }


def _both(case, block=64):
    case = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ref = rejection_sample_reference(**case)
    got = rejection_sample_triton(**case, block=block)
    for name, r, k in zip(("accepted", "tokens", "status"), ref, got):
        assert torch.equal(r, k), f"{name}:\nref {r}\nkernel {k}"
    return tuple(t.cpu() for t in ref)


@pytest.mark.parametrize("seed", range(3))
def test_random_inputs(seed):
    accepted, tokens, bad = _both(_case(seed=seed))
    assert not bad.any() and (tokens < 200).all()
    assert 0 < accepted.float().mean() < 4


def test_p_equals_q_accepts_everything():
    accepted, _tokens, _ = _both(_case(same=True))
    assert (accepted == 4).all()


def test_first_rejected_when_q_puts_mass_where_p_has_none():
    case = _case(seed=5)
    case["p"][:, 0, :] = 0.0
    case["p"][:, 0, 7] = 1.0  # p is a point mass on 7 at position 0 ...
    case["draft_tokens"][:, 0] = 8  # ... and the draft proposed 8: p(8) = 0 -> always rejected
    accepted, tokens, _ = _both(case)
    assert (accepted == 0).all() and (tokens[:, 0] == 7).all()  # the residual is all on 7


def test_q_zero_where_p_positive_accepts():
    case = _case(seed=6)
    d = case["draft_tokens"][:, 0]
    case["q"][torch.arange(8), 0, d] = 0.0  # an impossible proposal under q: min(1, p/0) = 1
    accepted, _, _ = _both(case)
    assert (accepted >= 1).all()


def test_ragged_rows_with_gamma_zero_are_plain_sampling():
    case = _case(seed=7)
    case["num_drafts"] = torch.tensor([0, 4, 1, 0, 3, 2, 0, 4])
    accepted, tokens, _ = _both(case)
    assert (accepted <= case["num_drafts"]).all()
    zero = case["num_drafts"] == 0
    # A γ = 0 row samples its one token from p_1 with the resample stream: the same draw as the bonus.
    plain = sample_reference(
        case["p"][:, 0].log(),
        case["p"][:, 0],
        torch.zeros(8, dtype=torch.bool),
        case["seeds"],
        case["positions"],
        2,
        200,
    )[0]
    assert torch.equal(tokens[zero, 0], plain[zero])


def test_truncated_distributions():
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.2, top_p=0.6)] * 4
    case = _case(seed=8, params=params)
    accepted, tokens, _ = _both(case)
    support = case["p"] > 0
    for b in range(8):
        for i in range(int(accepted[b]) + 1):
            assert support[b, i, tokens[b, i]], "a token outside the truncated support"


def test_point_mass_drafts_and_inactive_rows():
    case = _case(seed=9)
    case["point_mass"] = torch.tensor([True, False] * 4)
    case["q_row"] = torch.where(case["point_mass"], -1, case["q_row"])
    case["active"] = torch.tensor([True, True, False, True, True, True, False, True])
    accepted, tokens, _bad = _both(case)
    assert (accepted[~case["active"]] == 0).all() and (tokens[~case["active"]] == 0).all()


def test_bad_numbers_are_flagged_and_ids_stay_in_vocabulary():
    case = _case(seed=10)
    case["p"][1, 2, 5] = float("nan")
    case["q"][3, 1, :] = float("inf")
    case["p"][5, 0, :] = 0.0  # no mass at position 0, which always decides: nothing possible
    case["p"][6, 3, :] = float("nan")
    case["num_drafts"][6] = 2  # ... but position 3 is past row 6's drafts: not its problem
    case["p"][7, 0, :] = 0.0
    case["p"][7, 0, 7] = 1.0
    case["draft_tokens"][7, 0] = 8  # rejected at position 0 for sure ...
    case["p"][7, 3, :] = 0.0  # ... so a position with no mass later on never decides
    accepted, tokens, status = _both(case)
    assert status.tolist() == [0, ROW_NONFINITE, 0, ROW_NONFINITE, 0, ROW_NO_TOKEN, 0, 0]
    assert ((tokens >= 0) & (tokens < 200)).all() and (accepted[status != 0] == 0).all()
    assert accepted[7] == 0 and tokens[7, 0] == 7


def test_draft_ids_outside_the_vocabulary_are_never_accepted():
    case = _case(seed=13, same=True)  # p == q: every valid draft is accepted
    case["point_mass"] = torch.tensor([True, True, False, False] * 2)
    case["draft_tokens"][0, 0] = 200 + 5  # external, past the vocabulary (clamped it would be 199)
    case["p"][0, 0, :] = 0.0
    case["p"][0, 0, 199] = 1.0  # ... and the target is sure of 199
    case["p"][1, 0, :] = 0.0
    case["p"][1, 0, case["draft_tokens"][1, 0]] = 1.0  # row 1's first (external) draft: sure to pass
    case["draft_tokens"][1, 1] = -1
    case["draft_tokens"][2, 2] = 10_000  # a model row (a kernel bug upstream)
    accepted, tokens, status = _both(case)
    assert accepted[:3].tolist() == [0, 1, 2] and not status.any()
    assert tokens[0, 0] == 199  # drawn from p (the proposal had no mass in the vocabulary)
    assert ((tokens >= 0) & (tokens < 200)).all()


def test_q_may_hold_fewer_positions_than_a_long_external_draft():
    """A sampled external draft longer than the batch's longest model draft: q has only the model
    drafts' positions, and the external row reads none of it."""
    case = _case(seed=14)
    case["q"] = case["q"][:, :2].contiguous()
    case["num_drafts"] = torch.tensor([4, 2, 1, 4, 0, 2, 4, 2])
    case["point_mass"] = case["num_drafts"] == 4
    case["q_row"] = torch.where(case["point_mass"], -1, case["q_row"])
    accepted, _tokens, status = _both(case)
    assert not status.any() and (accepted <= case["num_drafts"]).all()


def test_padded_probability_lanes_are_never_read():
    case = _case(seed=11)
    padded = torch.zeros(8, 5, 256)
    padded[..., :200] = case["p"]
    padded[..., 200:] = 10.0  # garbage in lanes past the vocabulary
    case["p"] = padded
    _accepted, tokens, bad = _both(case)
    assert not bad.any() and (tokens < 200).all()


def test_a_seeded_row_is_independent_of_its_batch():
    """Same p, q, γ and seed: the same tokens at any batch position and any batch size."""
    case = _case(b=16, seed=12)
    ref = rejection_sample_reference(**case)
    for order in (torch.arange(16).flip(0), torch.randperm(16, generator=torch.Generator().manual_seed(0))):
        shuffled = {
            k: (v[order] if isinstance(v, torch.Tensor) and v.shape[:1] == (16,) else v)
            for k, v in case.items()
        }
        shuffled["q_row"] = torch.arange(16)  # q was permuted with the rows
        got = rejection_sample_reference(**shuffled)
        for r, k in zip(ref, got):
            assert torch.equal(r[order], k)
    single = {
        k: (v[3:4] if isinstance(v, torch.Tensor) and v.shape[:1] == (16,) else v) for k, v in case.items()
    }
    single["q_row"] = torch.zeros(1, dtype=torch.int64)
    single = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in single.items()}
    for r, k in zip(ref, rejection_sample_triton(**single)):
        assert torch.equal(r[3:4].to(DEVICE), k)
