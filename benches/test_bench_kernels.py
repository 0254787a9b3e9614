"""Acceptance kernels against their PyTorch references.

On a GPU these are the real numbers (B = 64, γ = 4, V = 128k: the issue's target shape); the HBM
floor for greedy acceptance is one read of the [B, γ+1, V] logits. On a CPU the Triton kernels run
interpreted, so only the harness is exercised.
"""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def greedy_inputs(device, sizes):
    shape = sizes({"b": 64, "g": 4, "v": 128_256}, {"b": 4, "g": 4, "v": 2048})
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(shape["b"], shape["g"] + 1, shape["v"], generator=gen).to(device, dtype)
    drafts = torch.randint(0, shape["v"], (shape["b"], shape["g"]), generator=gen).to(device)
    num = torch.full((shape["b"],), shape["g"], device=device)
    return logits, drafts, num, shape["v"]


@pytest.mark.benchmark(group="greedy-accept")
def test_greedy_accept_reference(benchmark, greedy_inputs, device):
    logits, drafts, num, vocab = greedy_inputs

    def run():
        out = greedy_accept_reference(logits, drafts, num, vocab)
        _sync(device)
        return out

    benchmark.extra_info["bytes_read"] = logits.numel() * logits.element_size()
    benchmark(run)


@pytest.mark.benchmark(group="greedy-accept")
def test_greedy_accept_triton(benchmark, greedy_inputs, device):
    logits, drafts, num, vocab = greedy_inputs

    def run():
        out = greedy_accept_triton(logits, drafts, num, vocab)
        _sync(device)
        return out

    benchmark.extra_info["bytes_read"] = logits.numel() * logits.element_size()
    result = benchmark.pedantic(run, rounds=3 if device.type == "cpu" else 50, warmup_rounds=1)
    assert all(torch.equal(a, b) for a, b in zip(result, greedy_accept_reference(logits, drafts, num, vocab)))


@pytest.fixture(scope="module")
def rejection_inputs(device, sizes):
    shape = sizes({"b": 64, "g": 4, "v": 128_256}, {"b": 4, "g": 4, "v": 1024})
    b, g, v = shape["b"], shape["g"], shape["v"]
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(b, g + 1, v, generator=gen), -1).to(device)
    q = torch.softmax(torch.randn(b, g, v, generator=gen), -1).to(device)
    return {
        "p": p,
        "q": q,
        "q_row": torch.arange(b, device=device),
        "point_mass": torch.zeros(b, dtype=torch.bool, device=device),
        "draft_tokens": torch.randint(0, v, (b, g), generator=gen).to(device),
        "num_drafts": torch.full((b,), g, device=device),
        "active": torch.ones(b, dtype=torch.bool, device=device),
        "seeds": torch.arange(b, device=device),
        "positions": torch.full((b,), 100, device=device),
        "vocab_size": v,
    }


@pytest.mark.benchmark(group="rejection-sample")
def test_rejection_sample_reference(benchmark, rejection_inputs, device):
    from specdec.kernels.rejection_sample import rejection_sample_reference

    def run():
        out = rejection_sample_reference(**rejection_inputs)
        _sync(device)
        return out

    # The HBM floor: p and q each read once.
    benchmark.extra_info["bytes_read"] = sum(rejection_inputs[k].numel() * 4 for k in ("p", "q"))
    benchmark(run)


@pytest.mark.benchmark(group="rejection-sample")
def test_rejection_sample_triton(benchmark, rejection_inputs, device):
    from specdec.kernels.rejection_sample import rejection_sample_reference, rejection_sample_triton

    def run():
        out = rejection_sample_triton(**rejection_inputs)
        _sync(device)
        return out

    benchmark.extra_info["bytes_read"] = sum(rejection_inputs[k].numel() * 4 for k in ("p", "q"))
    result = benchmark.pedantic(run, rounds=2 if device.type == "cpu" else 50, warmup_rounds=1)
    expected = rejection_sample_reference(**rejection_inputs)
    assert all(torch.equal(a, b) for a, b in zip(result, expected))
