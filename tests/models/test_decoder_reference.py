"""Our decoder against the `transformers` reference, logit for logit, through the KV cache.

Each architecture's tiny checkpoint is written by `transformers` and loaded through our loader;
fp32, eager attention in the reference, tight tolerance.
"""

from __future__ import annotations

import pytest
import torch

from specdec.batching import Row, make_batch
from specdec.models import CacheLayout, KVCache, load_checkpoint
from specdec.testing import ARCHITECTURES, LLAMA3_ROPE, PADDED_VOCAB, hf_reference, random_prompt

ATOL = 2e-5
RTOL = 1e-4


class Runner:
    """A loaded model with its own cache; runs ragged rows through our forward pass."""

    def __init__(self, path, slots: int = 4, max_context: int = 96):
        self.lm = load_checkpoint(path)
        self.cache = KVCache(self.lm.config, CacheLayout(slots, max_context, 10), torch.float32, "cpu")
        self.lm.model.init_rope(self.cache.layout.capacity)

    def run(self, rows: list[Row], all_logits: bool = True) -> torch.Tensor:
        batch = make_batch(
            rows,
            torch.device("cpu"),
            self.cache.layout.capacity,
            logits_columns=[list(range(len(r.tokens))) for r in rows] if all_logits else None,
        )
        return self.lm.model(batch, self.cache)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_case(request, checkpoints):
    model_type, kwargs = ARCHITECTURES[request.param]
    path = checkpoints(model_type, **kwargs)
    return request.param, path, hf_reference(path)


def _reference_logits(ref, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0]


def test_prompt_in_one_pass(arch_case):
    _name, path, ref = arch_case
    runner = Runner(path)
    prompt = random_prompt(torch.Generator().manual_seed(1), 40)
    ours = runner.run([Row(slot=2, start=0, tokens=prompt)])[0]
    torch.testing.assert_close(ours, _reference_logits(ref, prompt), atol=ATOL, rtol=RTOL)


def test_token_by_token_through_the_cache(arch_case):
    _name, path, ref = arch_case
    runner = Runner(path)
    prompt = random_prompt(torch.Generator().manual_seed(2), 30)
    expected = _reference_logits(ref, prompt)
    for i, token in enumerate(prompt):
        ours = runner.run([Row(slot=1, start=i, tokens=[token])])[0, 0]
        torch.testing.assert_close(ours, expected[i], atol=ATOL, rtol=RTOL)


def test_rollback_then_different_tokens(arch_case):
    """Rolling back is setting the length: feed k tokens, 'forget' them, feed others."""
    _name, path, ref = arch_case
    runner = Runner(path)
    g = torch.Generator().manual_seed(3)
    prefix, rejected, replacement = random_prompt(g, 20), random_prompt(g, 6), random_prompt(g, 4)
    runner.run([Row(slot=0, start=0, tokens=prefix)], all_logits=False)
    runner.run([Row(slot=0, start=len(prefix), tokens=rejected)])
    # Roll back all 6: the next pass starts at len(prefix) again, over the stale K/V.
    ours = runner.run([Row(slot=0, start=len(prefix), tokens=replacement)])[0]
    expected = _reference_logits(ref, prefix + replacement)[len(prefix) :]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("slot_order", ["scattered", "consecutive"])
def test_ragged_batch_rows_equal_rows_alone(arch_case, slot_order):
    """Rows of different lengths, slots and start positions share one call; each equals itself alone
    and the reference. Scattered slots read the cache by gather, consecutive ones as a view."""
    _name, path, ref = arch_case
    runner = Runner(path)
    g = torch.Generator().manual_seed(4)
    # (slot, prefix length already in the cache, new tokens this pass)
    plan = [(3, 17, 5), (0, 4, 1), (2, 30, 3), (1, 0, 9)]
    if slot_order == "consecutive":
        plan.sort()
    sequences = [random_prompt(g, p + n) for _, p, n in plan]
    for (slot, p, _n), seq in zip(plan, sequences):
        if p:
            runner.run([Row(slot=slot, start=0, tokens=seq[:p])], all_logits=False)
    rows = [Row(slot=slot, start=p, tokens=seq[p:]) for (slot, p, _n), seq in zip(plan, sequences)]
    expected_first_slot = 0 if slot_order == "consecutive" else None
    assert (
        make_batch(rows, torch.device("cpu"), runner.cache.layout.capacity).first_slot == expected_first_slot
    )
    batched = runner.run(rows)
    for b, ((_slot, p, n), seq) in enumerate(zip(plan, sequences)):
        alone = runner.run([rows[b]])[0]
        torch.testing.assert_close(batched[b, :n], alone[:n], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(batched[b, :n], _reference_logits(ref, seq)[p:], atol=ATOL, rtol=RTOL)


def test_padding_never_clobbers_other_rows(checkpoints):
    """Padded positions write to the scratch row: a short row next to a long one keeps its cache."""
    path = checkpoints("llama", vocab_size=PADDED_VOCAB, rope_parameters=LLAMA3_ROPE)
    runner = Runner(path)
    g = torch.Generator().manual_seed(5)
    short, long_ = random_prompt(g, 3), random_prompt(g, 12)
    runner.run([Row(slot=0, start=0, tokens=short), Row(slot=1, start=0, tokens=long_)], all_logits=False)
    ref = hf_reference(path)
    nxt = random_prompt(g, 1)
    ours = runner.run([Row(slot=0, start=3, tokens=nxt)])[0, 0]
    torch.testing.assert_close(ours, _reference_logits(ref, short + nxt)[-1], atol=ATOL, rtol=RTOL)
