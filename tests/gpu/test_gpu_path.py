"""What only a GPU can show. Skipped, with the reason, where there is no CUDA device; run by
benches/gpu_suite.sh on an H100/H200 (the kernel tests in tests/kernels also switch to CUDA there)."""

from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import Mode
from specdec.testing import assert_greedy_equal, hf_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]

CONFIG = EngineConfig(max_batch_size=8, max_context=128, device="cuda")


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target=target, draft=draft, config=CONFIG)


def test_bf16_weights_and_caches_on_cuda(engine):
    cache = engine.runner.target_cache
    assert engine.target.dtype == torch.bfloat16 and cache.k.dtype == torch.bfloat16
    assert cache.k.device.type == "cuda"


def test_greedy_speculative_equals_target_on_cuda_fp32(pairs):
    """Exactness on the GPU's kernels, in fp32 so that, as on the CPU, the only divergence allowed
    is at an exact near-tie of the fp32 reference (bf16 numerics of a batched verify and of single
    target steps differ by more than any tie tolerance that could still catch a bug)."""
    target, draft = pairs("llama-close")
    fp32 = Engine(
        target=target,
        draft=draft,
        config=EngineConfig(max_batch_size=8, max_context=128, device="cuda", dtype="float32"),
    )
    prompts = [[5, 6, 7], [40, 41, 42, 43], [100], [7] * 12]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    spec = fp32.generate(prompts, params, num_speculative_tokens=4)
    alone = fp32.generate(prompts, params, mode=Mode.TARGET)
    reference = hf_reference(target)
    exact = [
        assert_greedy_equal(reference, p, s.token_ids, t.token_ids) for p, s, t in zip(prompts, spec, alone)
    ]
    assert sum(exact) >= len(prompts) - 1, "more than one prompt diverged at a near-tie"


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_step_makes_no_other_sync_that_sync_debug_mode_sees(engine, temperature):
    """Under torch.cuda.set_sync_debug_mode("error") the synchronising CUDA calls torch knows of
    (blocking device-to-host copies, .item(), nonzero, ...) raise, except inside the step's one
    sync point. That mode does not see every stall: a copy from pageable host memory can still
    stall the stream without raising, so this test does not show that there is none."""
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=1, ignore_eos=True)
    scheduler = engine.scheduler
    for p in ([5, 6, 7], [8, 9]):
        scheduler.add_request(engine.make_request(p, params, Mode.SPECULATIVE, 3))
    scheduler.step()  # admission and prefill may sync; the steps after must not
    torch.cuda.set_sync_debug_mode("error")
    try:
        while scheduler.has_unfinished():
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("n,k", [(960, 576), (3072, 576), (576, 1536), (49152, 576)])  # SmolLM2's
def test_weight_only_int8_and_int4_match_their_references_on_cuda(n, k):
    """The CUDA kernels of quantized weights (aten._weight_int8pack_mm, tinygemm's int4) against
    the dequantized weights, bf16 activations, at every linear shape of SmolLM2-135M."""
    from specdec.models.quant_linear import (
        Int4Linear,
        Int8LinearWeightOnly,
        dequantize_int4,
        dequantize_int8,
        quantize_int4,
        quantize_int8,
    )

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    x = torch.randn(5, k, device="cuda", generator=g, dtype=torch.bfloat16)
    codes, scale = quantize_int8(w)
    y8 = Int8LinearWeightOnly(codes, scale, None, torch.bfloat16)(x).float()
    ref8 = x.float() @ dequantize_int8(codes, scale).t()
    assert float((y8 - ref8).norm() / ref8.norm()) < 0.02
    codes4, scale4, zero4 = quantize_int4(w)
    y4 = Int4Linear(codes4, scale4, zero4, None, torch.bfloat16)(x).float()
    ref4 = x.float() @ dequantize_int4(codes4, scale4, zero4).t()
    assert float((y4 - ref4).norm() / ref4.norm()) < 0.02


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_pair_speculates_like_its_target_on_cuda(pairs, scheme):
    """Speculative greedy output against the quantized target alone, on CUDA in bf16: all but an
    occasional bf16 near-tie prompt agree token for token."""
    target, draft = pairs("llama-close")
    config = EngineConfig(
        max_batch_size=8, max_context=128, device="cuda", target_quantize=scheme, draft_quantize=scheme
    )
    engine = Engine(target=target, draft=draft, config=config)
    prompts = [[5 + i, 17, 40 + 3 * i, 9] for i in range(8)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = engine.generate(prompts, params, mode=Mode.TARGET)
    spec = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=3)
    same = sum(a.token_ids == b.token_ids for a, b in zip(alone, spec))
    assert same >= 6, f"{same}/8 prompts agree"


def test_the_step_upload_comes_back_equal_from_pinned_memory_under_back_to_back_copies():
    """`HostStaging.upload` on CUDA: one pinned buffer per upload, copied asynchronously. Many
    uploads in a row, none waited for, must each arrive intact (the pinned-memory cache must not
    hand a buffer still being copied to the next upload), in every dtype a step sends."""
    import numpy as np

    from specdec.staging import HostStaging

    rng = np.random.default_rng(0)
    sent, received = [], []
    for i in range(200):
        arrays = [
            rng.integers(0, 2**40, (3, 17 + i % 5)),
            rng.standard_normal(9 + i % 3).astype(np.float32),
            rng.integers(0, 2, 5 + i % 7).astype(np.bool_),
            rng.integers(-100, 100, 11).astype(np.int8),
        ]
        staging = HostStaging()
        handles = [staging.add(a) for a in arrays]
        tensors = staging.upload(torch.device("cuda"))
        sent.append(arrays)
        received.append([tensors[h] for h in handles])
    torch.cuda.synchronize()
    for arrays, tensors in zip(sent, received):
        for a, t in zip(arrays, tensors):
            assert t.device.type == "cuda" and np.array_equal(t.cpu().numpy(), a)
