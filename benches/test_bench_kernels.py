"""Acceptance kernels against their PyTorch references.

On a GPU these are the real numbers (B = 64, γ = 4, V = 128k: the issue's target shape); the HBM
floor for greedy acceptance is one read of the [B, γ+1, V] logits. On a CPU the Triton kernels run
interpreted, so only the harness is exercised.
"""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.greedy_accept import greedy_accept_reference, greedy_accept_triton

from conftest import sizes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def greedy_inputs(device):
    shape = sizes(device, {"b": 64, "g": 4, "v": 128_256}, {"b": 4, "g": 4, "v": 2048})
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
