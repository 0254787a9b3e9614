"""Feature-reading drafts (EAGLE, ModelConfig.feature_input): the decoder computes what the
training forward computes with `transformers`' layers; the engine feeds every draft pass the
target's features of exactly the positions before its tokens (or the draft's own, for its later
proposals); greedy speculation with such a draft is the target alone token for token; and what it
cannot do is refused by name."""

from __future__ import annotations

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.batching import Row, make_batch
from specdec.config import EngineConfig
from specdec.errors import IncompatiblePairError, InvalidRequestError
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.loader import load_checkpoint
from specdec.request import Mode
from specdec.testing import feature_draft, hf_reference, random_prompt


@pytest.fixture(scope="module")
def close_pair(pairs):
    return pairs("llama-close")


@pytest.fixture(scope="module")
def eagle_dir(close_pair, tmp_path_factory):
    return feature_draft(close_pair[1], tmp_path_factory.mktemp("eagle"), feature_scale=0.3, seed=3)


def test_feature_draft_logits_match_transformers_layers_under_the_training_forward(close_pair, eagle_dir):
    """specdec's decoder against `distill.eagle.eagle_forward` on the `transformers` model of the
    same weights: logits and output features, for given input features."""
    from safetensors.torch import load_file

    from specdec.distill.eagle import eagle_forward

    ours = load_checkpoint(eagle_dir)
    assert ours.config.feature_input and not ours.config.answers_alone
    reference = hf_reference(close_pair[1])
    stored = load_file(str(eagle_dir / "model.safetensors"))
    reference.model.fc = torch.nn.Linear(*stored["model.fc.weight"].shape[::-1])
    reference.model.fc.load_state_dict({"weight": stored["model.fc.weight"], "bias": stored["model.fc.bias"]})
    tokens = random_prompt(torch.Generator().manual_seed(1), 12)
    features = torch.randn(1, 12, ours.config.hidden_size, generator=torch.Generator().manual_seed(2))
    want_logits, want_features = eagle_forward(reference, torch.tensor([tokens]), features)

    cache = KVCache(ours.config, CacheLayout(1, 64, 4), torch.float32, "cpu")
    ours.model.init_rope(cache.layout.capacity)
    batch = make_batch([Row(0, 0, tokens)], torch.device("cpu"), cache.layout.capacity)
    batch.features = features
    with torch.no_grad():
        logits, out_features = ours.model.forward_features(batch, cache)
    vocab = want_logits.shape[-1]
    torch.testing.assert_close(logits[..., :vocab], want_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_features, want_features, atol=2e-5, rtol=1e-4)
    # Its features change its answer: the draft does read them.
    batch.features = torch.zeros_like(features)
    cache = KVCache(ours.config, CacheLayout(1, 64, 4), torch.float32, "cpu")
    with torch.no_grad():
        assert not torch.allclose(ours.model.forward_features(batch, cache)[0], logits)
        batch.features = None
        with pytest.raises(ValueError, match=r"needs ForwardBatch\.features"):
            ours.model(batch, cache)


def _recording(model):
    """Wrap `model.forward_features` to record each pass's rows, the features it was fed and the
    features it returned."""
    calls = []
    inner = model.forward_features

    def record(batch, cache):
        logits, features = inner(batch, cache)
        calls.append(
            {
                "slots": batch.slots.tolist(),
                "start": batch.start.tolist(),
                "n_valid": batch.n_valid.tolist(),
                "tokens": batch.tokens.tolist(),
                "fed": batch.features,
                "returned": features,
            }
        )
        return logits, features

    model.forward_features = record
    return calls


def test_every_draft_pass_reads_the_targets_features_of_the_positions_before(close_pair, eagle_dir):
    """Prefill, catch-up and first drafting passes read the target's final hidden states of the
    positions before their tokens - equal to `transformers`' over the finished sequence - and every
    later drafting pass reads the pass before's own output. Ragged rows, plain target steps among
    speculative ones (catch-up), γ up to 4."""
    from specdec.planner import GammaPlanner

    target_dir, _ = close_pair
    config = EngineConfig(max_batch_size=3, max_context=96, warmup=False)
    # Runs of plain target steps (γ = 0) between speculative ones, so rows fall behind the draft
    # and catch up; each row on its own schedule.
    schedule = [0, 0, 0, 0, 4, 4, 2, 1, 3, 0, 0, 4]
    steps = iter(range(10**6))
    planner = GammaPlanner(
        config, gamma_override=lambda seq: schedule[(next(steps) + seq.slot) % len(schedule)]
    )
    engine = Engine(target_dir, eagle_dir, config=config, planner=planner)
    calls = _recording(engine.draft.model)
    prompts = [[7 + i] + random_prompt(torch.Generator().manual_seed(10 + i), 5 + 3 * i) for i in range(3)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    results = engine.generate(prompts, params, mode=Mode.SPECULATIVE)
    finished = {p[0]: p + r.token_ids for p, r in zip(prompts, results)}
    reference = hf_reference(target_dir)
    with torch.no_grad():
        target_features = {
            first: reference.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0]
            for first, seq in finished.items()
        }
    slot_of_request: dict[int, int] = {}
    checked_target = checked_own = 0
    previous = None
    for call in calls:
        fed = call["fed"]
        own = previous is not None and fed is previous
        for b, (slot, start, n) in enumerate(zip(call["slots"], call["start"], call["n_valid"])):
            if start == 0:
                slot_of_request[slot] = call["tokens"][b][0]
            if own:
                checked_own += 1
                continue
            seq = finished[slot_of_request[slot]]
            for t in range(n):
                position = start + t
                assert call["tokens"][b][t] == seq[position], "the draft read a token that was not committed"
                want = target_features[seq[0]][position - 1] if position else torch.zeros_like(fed[b, t])
                torch.testing.assert_close(fed[b, t], want, atol=1e-4, rtol=1e-4)
                checked_target += 1
        previous = call["returned"]
    assert checked_target > 60 and checked_own > 20


def test_greedy_with_a_feature_draft_is_the_target_alone(close_pair, eagle_dir):
    target_dir, _ = close_pair
    config = EngineConfig(max_batch_size=4, max_context=128, warmup=False)
    prompts = [random_prompt(torch.Generator().manual_seed(s), 4 + 5 * s) for s in range(4)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    expected = Engine(target_dir, config=config).generate(prompts, params, mode=Mode.TARGET)
    engine = Engine(target_dir, eagle_dir, config=config)
    for gamma in (1, 3, 4):
        got = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=gamma)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected], gamma
        assert sum(r.stats.accepted_tokens for r in got) > 0
    # An external draft (a predicted output) is verified as point masses, and the draft catches up.
    prediction = expected[0].token_ids[:10] + [3, 3, 3]
    request = engine.make_request(prompts[0], params, Mode.SPECULATIVE, external_draft=prediction)
    [got] = engine.generate([request])
    assert got.token_ids == expected[0].token_ids and got.stats.accepted_tokens >= 10


def test_what_a_feature_draft_cannot_do_is_refused(close_pair, eagle_dir, pairs, tmp_path):
    target_dir, _ = close_pair
    config = EngineConfig(max_batch_size=2, max_context=64, warmup=False)
    engine = Engine(target_dir, eagle_dir, config=config)
    assert not engine.limits.draft_answers
    with pytest.raises(InvalidRequestError, match="reads the target's features"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=4), mode=Mode.DRAFT)
    narrow_target = pairs("llama")[0]  # hidden 64 against a draft built here at 32
    narrow = feature_draft(pairs("llama")[1], tmp_path / "narrow")
    with pytest.raises(IncompatiblePairError, match=r"reads its target's features .* at hidden size 32"):
        Engine(narrow_target, narrow, config=config)
