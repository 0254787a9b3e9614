"""Plain generation with one model: greedy equals `transformers`, sampling is seeded and truncated."""

from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import FinishReason, Mode
from specdec.testing import (
    ARCHITECTURES,
    TOKENIZER_VOCAB,
    assert_greedy_equal,
    hf_greedy,
    hf_reference,
    random_prompt,
)


@pytest.fixture(scope="module")
def engine(llama_path):
    return Engine(target=llama_path, config=EngineConfig(max_batch_size=4, max_context=128))


def test_greedy_equals_transformers_generate(engine, llama_path):
    ref = hf_reference(llama_path)
    g = torch.Generator().manual_seed(10)
    prompts = [random_prompt(g, n) for n in (1, 5, 12, 30, 7, 19)]  # more prompts than slots
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=False))
    exact = 0
    for prompt, result in zip(prompts, results):
        theirs = hf_greedy(ref, prompt, 24)
        exact += assert_greedy_equal(ref, prompt, result.token_ids, theirs)
        assert all(t < TOKENIZER_VOCAB for t in result.token_ids), "a padded id was emitted"
    assert exact >= len(prompts) - 1


def test_stops_on_eos_and_max_new_tokens(engine):
    eos = engine.tokenizer.eos_token_id
    result = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=9))[0]
    if result.finish_reason is FinishReason.EOS:
        assert result.token_ids[-1] == eos and eos not in result.token_ids[:-1]
    else:
        assert result.finish_reason is FinishReason.LENGTH and len(result.token_ids) == 9
    # Forcing EOS to be the only allowed stop: a stop_token_id that is certainly produced.
    first = result.token_ids[0]
    stopped = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=9, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason is FinishReason.STOP


def test_seeded_sampling_reproduces_and_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    a = engine.generate([[10, 11, 12]], params)[0]
    b = engine.generate([[10, 11, 12]], params)[0]
    assert a.token_ids == b.token_ids and a.seed == 1234
    # The same seeded request next to other requests draws the same numbers: same output.
    others = [SamplingParams(max_new_tokens=20, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2)]
    batched = engine.generate([[40, 41], [10, 11, 12], [7]], [others[0], params, others[1]])
    assert batched[1].token_ids == a.token_ids
    c = engine.generate(
        [[10, 11, 12]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=99, ignore_eos=True)
    )[0]
    assert c.token_ids != a.token_ids


def test_unseeded_requests_report_their_seed(engine):
    r = engine.generate([[10, 11, 12]], SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True))[0]
    again = engine.generate(
        [[10, 11, 12]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=r.seed, ignore_eos=True)
    )[0]
    assert again.token_ids == r.token_ids


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([[20, 21, 22]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    top1 = engine.generate(
        [[20, 21, 22]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    )[0]
    tiny_p = engine.generate(
        [[20, 21, 22]],
        SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True),
    )[0]
    assert top1.token_ids == greedy.token_ids == tiny_p.token_ids


def test_sampled_tokens_stay_in_truncated_support(engine, llama_path):
    """With top-k = 3 every sampled token is among the reference's 3 best at its position."""
    ref = hf_reference(llama_path)
    prompt = [30, 31, 32, 33]
    r = engine.generate(
        [prompt], SamplingParams(max_new_tokens=15, temperature=2.0, top_k=3, seed=5, ignore_eos=True)
    )[0]
    seq = prompt + r.token_ids
    with torch.no_grad():
        logits = ref(torch.tensor([seq])).logits[0, :, :TOKENIZER_VOCAB]
    for i, token in enumerate(r.token_ids):
        top3 = logits[len(prompt) - 1 + i].topk(3).indices.tolist()
        assert token in top3


def test_single_model_engine_refuses_speculative_mode(engine):
    from specdec.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="mode speculative needs a draft model"):
        engine.generate([[1, 2]], mode=Mode.SPECULATIVE)


def test_stream_chunks_concatenate_to_generate(engine):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, seed=11, ignore_eos=True)
    chunks = list(engine.stream([50, 51, 52], params))
    whole = engine.generate([[50, 51, 52]], params)[0]
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert [t for c in chunks for t in c.new_token_ids] == whole.token_ids
    assert "".join(c.new_text for c in chunks) == whole.text


def test_closing_a_stream_cancels_and_frees_the_slot(engine):
    it = engine.stream([50, 51, 52], SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert not engine.scheduler.has_unfinished()
    assert len(engine.scheduler.free_slots) == engine.config.max_batch_size


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_equals_transformers_per_architecture(arch, checkpoints):
    """Every architecture of the seed table, batched and ragged, against `generate()`; long enough
    to run past the sliding windows."""
    model_type, kwargs = ARCHITECTURES[arch]
    path = checkpoints(model_type, **kwargs)
    ref = hf_reference(path)
    engine = Engine(target=path, config=EngineConfig(max_batch_size=3, max_context=96))
    g = torch.Generator().manual_seed(20)
    prompts = [random_prompt(g, n) for n in (3, 14, 25, 9)]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    exact = sum(
        assert_greedy_equal(ref, p, r.token_ids, hf_greedy(ref, p, 20)) for p, r in zip(prompts, results)
    )
    assert exact >= len(prompts) - 1
