"""What only a GPU can show. Skipped, with the reason, where there is no CUDA device; run by
benches/gpu_suite.sh on an H100/H200 (the kernel tests in tests/kernels also switch to CUDA there)."""

from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import Mode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=8, max_context=128, device="cuda")
    )


def test_bf16_weights_and_caches_on_cuda(engine):
    assert engine.target.dtype == torch.bfloat16 and engine.scheduler.target_cache.k.dtype == torch.bfloat16
    assert engine.scheduler.target_cache.k.device.type == "cuda"


def test_greedy_speculative_equals_target_on_cuda(engine):
    prompts = [[5, 6, 7], [40, 41, 42, 43], [100], [7] * 12]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    spec = engine.generate(prompts, params, num_speculative_tokens=4)
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    same = sum(s.token_ids == t.token_ids for s, t in zip(spec, target))
    assert same >= len(prompts) - 1  # bf16: batched and single-row numerics may split a near-tie


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_step_synchronises_with_the_host_once(engine, temperature):
    """Every synchronising op outside the step's one sync point raises."""
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
