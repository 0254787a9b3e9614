"""The step's one device-to-host copy: tensors of every dtype the step reads back, of odd sizes and
in any order, come back equal and in the order added."""

from __future__ import annotations

import torch

from specdec.logprobs import Logprobs
from specdec.readback import HostCopy, HostLogprobs


def test_mixed_dtypes_and_odd_sizes_round_trip():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.tensor([True, False, True]),  # 3 bytes first: later parts must still land aligned
        torch.randint(0, 50_000, (3, 5), generator=g),
        torch.randn(2, 3, generator=g),
        torch.randn(3, 1, 0, generator=g),  # top-0 log-probabilities: no bytes at all
        torch.randint(0, 9, (7,), generator=g, dtype=torch.int32),
        torch.tensor([False]),
    ]
    copy = HostCopy()
    handles = [copy.add(t) for t in tensors]
    host = copy.fetch(torch.device("cpu"))
    assert handles == list(range(len(tensors)))
    for t, h in zip(tensors, handles):
        assert host[h].shape == tuple(t.shape)
        assert torch.equal(torch.from_numpy(host[h].copy()), t)


def test_logprobs_come_back_per_row():
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    lp = Logprobs.of(logits, tokens, top_n=2, vocab=10)
    copy = HostCopy()
    handles = copy.add_logprobs(lp)
    host = HostLogprobs.of(copy.fetch(torch.device("cpu")), handles)
    row = host.row(1, [4, 5], top_n=1)
    expected = torch.log_softmax(logits[1], -1)
    assert [t.token_id for t in row] == [4, 5]
    assert abs(row[0].logprob - expected[0, 4].item()) < 1e-6
    assert row[1].top == [(int(expected[1].argmax()), expected[1].max().item())]
    assert HostLogprobs.of([], None) is None
