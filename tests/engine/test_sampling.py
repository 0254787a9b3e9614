"""The one logits -> probabilities transform, against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from specdec.errors import InvalidRequestError
from specdec.sampling import SamplingParams, SamplingTensors, probabilities


def _tensors(params):
    return SamplingTensors.from_params(params, torch.device("cpu"))


def _brute(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    x = logits.double() / t
    order = x.argsort(descending=True).tolist()
    kept = order[:k] if k else order
    probs = torch.softmax(x[kept], 0)
    mass, nucleus = 0.0, []
    for tok, pr in zip(kept, probs.tolist()):
        if mass >= p:
            break
        nucleus.append(tok)
        mass += pr
    out = torch.zeros_like(x)
    out[nucleus] = torch.softmax(x[nucleus], 0)
    return out.float()


@pytest.mark.parametrize(
    "t,k,p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 5, 1.0), (1.0, 0, 0.7), (0.8, 10, 0.5), (1.3, 1, 0.9)]
)
def test_transform_matches_definition(t, k, p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    st = _tensors([SamplingParams(temperature=t, top_k=k, top_p=p)] * 6)
    got = probabilities(logits, st)
    for row in range(6):
        torch.testing.assert_close(got[row], _brute(logits[row], t, k, p), atol=1e-6, rtol=1e-5)


def test_rows_keep_their_own_parameters():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.3),
    ]
    got = probabilities(logits, _tensors(params))
    for row, sp in enumerate(params):
        torch.testing.assert_close(
            got[row], _brute(logits[row], sp.temperature, sp.top_k, sp.top_p), atol=1e-6, rtol=1e-5
        )
    assert (got[1] > 0).sum() == 3


def test_repeat_rows_matches_per_position():
    st = _tensors([SamplingParams(temperature=0.5, top_k=2), SamplingParams()]).repeat_rows(3)
    assert st.temperature.tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert st.greedy.tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -5}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
        ({"stop": ("x" * 300,)}, "stop"),
        ({"stop_token_ids": (999,)}, "stop_token_ids"),
        ({"top_logprobs": 50}, "top_logprobs"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs).validate(vocab_size=300)
    assert e.value.field == field and str(e.value).startswith(field)


@pytest.mark.parametrize("candidates", [4, 12])
def test_candidate_selection_matches_definition_and_the_whole_sort(monkeypatch, candidates):
    """Top-k / top-p read each row's best `CANDIDATES` logits and sort a row whole only when its
    kept tokens may pass them: with the count shrunk below the vocabulary, rows of every kind -
    top-k inside and past the candidates, a nucleus inside them and one past them (a flat row),
    no truncation beside truncating rows - still match the definition, and the same row gives the
    same probabilities alone as in the batch."""
    import specdec.sampling as sampling

    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 50, generator=g) * 3
    logits[3] = torch.randn(50, generator=g) * 0.05  # flat: a 0.9 nucleus holds most of the row
    params = [
        SamplingParams(temperature=1.0, top_k=3),  # inside the candidates
        SamplingParams(temperature=0.9, top_k=30),  # past them: sorted whole
        SamplingParams(temperature=1.0, top_p=0.5),  # a peaked nucleus inside them
        SamplingParams(temperature=1.0, top_p=0.9),  # past them
        SamplingParams(temperature=1.2, top_k=20, top_p=0.6),
        SamplingParams(temperature=1.0),  # no truncation, in a truncating batch
        SamplingParams(temperature=0.7, top_k=2, top_p=0.99),
    ]
    got = probabilities(logits, _tensors(params))
    for row, sp in enumerate(params):
        want = _brute(logits[row], sp.temperature, sp.top_k, sp.top_p)
        torch.testing.assert_close(got[row], want, atol=1e-6, rtol=1e-5)
        alone = probabilities(logits[row : row + 1], _tensors([sp]))
        torch.testing.assert_close(alone[0], got[row], atol=0, rtol=0)
    assert (got[3] > 0).sum() > candidates  # the flat row's nucleus did pass the candidates
