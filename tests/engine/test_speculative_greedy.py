"""Greedy speculative decoding is exact: token for token what the target alone produces."""

from __future__ import annotations

import itertools

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import IncompatiblePairError
from specdec.planner import GammaPlanner
from specdec.request import FinishReason, Mode
from specdec.testing import (
    PADDED_VOCAB,
    TOKENIZER_VOCAB,
    first_divergence,
    hf_reference,
    is_near_tie,
    random_prompt,
)

CONFIG = EngineConfig(max_batch_size=4, max_context=128, max_gamma=8)


@pytest.fixture(scope="module")
def engines(pairs):
    cache = {}

    def get(name):
        if name not in cache:
            target, draft = pairs(name)
            cache[name] = Engine(target=target, draft=draft, config=CONFIG)
        return cache[name]

    return get


def _scheduled_engine(engine, schedule):
    """An engine on the same loaded models whose rows draft by `schedule` (cycled, offset by the
    row's slot) instead of by the policy."""
    counter = itertools.count()
    planner = GammaPlanner(
        CONFIG, gamma_override=lambda seq: schedule[(next(counter) + seq.slot) % len(schedule)]
    )
    return Engine(target=engine.target, draft=engine.draft, config=CONFIG, planner=planner)


def _prompts(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [random_prompt(g, int(length)) for length in torch.randint(1, 30, (n,), generator=g)]


def _params(n, seed=0):
    # Different lengths, so rows finish at different steps and new rows join mid-flight.
    return [SamplingParams(max_new_tokens=8 + (7 * i + seed) % 23) for i in range(n)]


def _assert_same(engine, name, prompts, spec, target):
    ref = hf_reference(engine.target.path)
    near_ties = 0
    for prompt, s, t in zip(prompts, spec, target):
        i = first_divergence(s.token_ids, t.token_ids)
        if i is None:
            continue
        if i < min(len(s.token_ids), len(t.token_ids)) and is_near_tie(ref, prompt + t.token_ids[:i]):
            near_ties += 1  # batched vs single-row numerics may split an exact tie; skip the prompt
            continue
        raise AssertionError(
            f"{name}: speculative diverges at {i}\n spec   {s.token_ids}\n target {t.token_ids}"
        )
    assert near_ties <= 1, f"{near_ties} near-ties skipped"


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "llama-close", "gemma2-close"])
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_speculative_equals_target_alone(engines, name, gamma):
    engine = engines(name)
    prompts, params = _prompts(gamma), _params(8, gamma)
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    spec = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=gamma)
    _assert_same(engine, name, prompts, spec, target)
    stats = [r.stats for r in spec]
    assert all(s.accepted_tokens <= s.drafted_tokens for s in stats)
    assert all(all(a <= d for a, d in zip(s.accepted_by_position, s.drafted_by_position)) for s in stats)
    if name.endswith("-close"):
        # A close draft is mostly accepted: full accepts, bonus tokens and 2-token catch-ups happen.
        first_accepted = sum(s.accepted_by_position[0] for s in stats if s.drafted_by_position)
        first_drafted = sum(s.drafted_by_position[0] for s in stats if s.drafted_by_position)
        assert first_accepted > 0.5 * first_drafted
        assert any(
            len(s.accepted_by_position) >= gamma and s.accepted_by_position[gamma - 1] > 0 for s in stats
        )


@pytest.mark.parametrize("name", ["llama-close", "qwen2"])
def test_rows_at_gamma_zero_catch_up_later(engines, name):
    """A per-step γ that drops to 0 for several steps and comes back: the draft cache falls behind
    and is caught up in one batched pass, never by recomputing a prefix."""
    engine = engines(name)
    scheduled = _scheduled_engine(engine, [0, 0, 3, 0, 0, 0, 5, 2, 0, 1, 4, 0, 0, 0, 0, 6])
    prompts, params = _prompts(11), _params(8, 3)
    spec = scheduled.generate(prompts, params, mode=Mode.SPECULATIVE)
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    _assert_same(engine, name, prompts, spec, target)


def test_external_draft_equal_to_the_target_is_accepted_whole(engines):
    engine = engines("llama")
    prompt = _prompts(5, 1)[0]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    [reference] = engine.generate([prompt], params, mode=Mode.TARGET)
    request = engine.make_request(prompt, params, Mode.SPECULATIVE, external_draft=reference.token_ids[:19])
    [result] = engine.generate([request])
    assert result.token_ids == reference.token_ids
    assert result.stats.verify_steps == 1 and result.stats.accepted_tokens == 19  # one verify pass


def test_an_external_draft_reads_its_prompt_in_a_pass_apart_from_decoding_rows(engines, monkeypatch):
    """A row with an external draft defers its prompt's last chunk to its first verify pass, which
    runs apart from the decoding rows (a pass padded to its width would slow them): every row's
    output is still the target's own, and no verify pass wider than γ + 1 holds another row."""
    engine = engines("llama")
    prompts = [p for p in _prompts(9, 12) if len(p) > 8][:3]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    references = engine.generate(prompts, params, mode=Mode.TARGET)
    passes = []  # (rows, width) of each target pass that yields logits (a verify pass)
    model = engine.target.model
    real = model.forward

    def record(batch, *args, **kwargs):
        if batch.logits_index is None or batch.logits_index.shape[1]:
            passes.append(tuple(batch.tokens.shape))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(model, "forward", record)
    requests = [engine.make_request(p, params, Mode.SPECULATIVE, 2) for p in prompts[:2]]
    requests.append(
        engine.make_request(prompts[2], params, Mode.SPECULATIVE, external_draft=references[2].token_ids[:11])
    )
    results = engine.generate(requests)
    assert [r.token_ids for r in results] == [r.token_ids for r in references]
    assert results[2].stats.verify_steps == 1 and results[2].stats.accepted_tokens == 11
    wide = [(rows, width) for rows, width in passes if width > 3]
    assert wide == [(1, len(prompts[2]) + 11)], passes  # the prompt and the draft, in one pass alone


def test_wrong_external_draft_is_corrected(engines):
    engine = engines("llama")
    prompt = _prompts(6, 1)[0]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    [reference] = engine.generate([prompt], params, mode=Mode.TARGET)
    wrong = list(reference.token_ids)
    wrong[7] = (wrong[7] + 1) % TOKENIZER_VOCAB
    request = engine.make_request(prompt, params, Mode.SPECULATIVE, external_draft=wrong)
    [result] = engine.generate([request])
    assert result.token_ids == reference.token_ids
    assert result.stats.accepted_by_position[:7] == [1] * 7 and result.stats.accepted_by_position[7] == 0


def test_stop_string_spanning_tokens_truncates_exactly(engines):
    engine = engines("llama-close")
    prompt = _prompts(7, 1)[0]
    [reference] = engine.generate(
        [prompt], SamplingParams(max_new_tokens=40, ignore_eos=True), mode=Mode.TARGET
    )
    text = reference.text
    # A stop string that starts inside one token and ends inside a later one.
    ids = reference.token_ids
    pieces = [engine.tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    lengths = [len(p) for p in pieces]
    k = next(
        i
        for i in range(5, len(ids))
        if lengths[i] - lengths[i - 1] >= 1 and lengths[i - 1] - lengths[i - 2] >= 1
    )
    stop = text[lengths[k - 2] - 1 : lengths[k - 1] + 1]
    assert len(stop) >= 2
    [result] = engine.generate(
        [prompt], SamplingParams(max_new_tokens=40, stop=(stop,), ignore_eos=True), num_speculative_tokens=5
    )
    cut = text.find(stop)
    assert result.finish_reason is FinishReason.STOP
    assert result.text == text[:cut]
    end_token = next(i for i, n in enumerate(lengths) if n >= cut + len(stop))
    assert result.token_ids == ids[: end_token + 1]


def test_padded_vocabulary_pair_never_emits_padded_ids(tmp_path, checkpoints):
    """Padded lanes of both models get huge logits; nothing outside the tokenizer is emitted and
    the output still equals the target's."""
    from safetensors.torch import load_file, save_file

    paths = []
    for name, kwargs in (
        ("t", {"vocab_size": PADDED_VOCAB, "num_layers": 2, "seed": 21}),
        ("d", {"vocab_size": 330, "num_layers": 1, "seed": 22}),
    ):
        src = checkpoints("llama", **kwargs)
        dst = tmp_path / name
        import shutil

        shutil.copytree(src, dst)
        w = load_file(str(dst / "model.safetensors"))
        head = w["lm_head.weight"]
        head[TOKENIZER_VOCAB:] = 50 * head[:TOKENIZER_VOCAB].mean(0, keepdim=True)  # padded lanes win often
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
        paths.append(dst)
    engine = Engine(target=paths[0], draft=paths[1], config=CONFIG)
    assert engine.vocab_size == TOKENIZER_VOCAB
    prompts = _prompts(8, 6)
    params = [SamplingParams(max_new_tokens=16)] * 6
    spec = engine.generate(prompts, params, num_speculative_tokens=4)
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    assert all(t < TOKENIZER_VOCAB for r in spec + target for t in r.token_ids)
    assert [r.token_ids for r in spec] == [r.token_ids for r in target]


def test_non_finite_logits_fail_one_request_and_the_others_finish(engines, monkeypatch):
    engine = engines("llama-close")
    prompts, params = _prompts(9, 4), [SamplingParams(max_new_tokens=12, ignore_eos=True)] * 4
    expected = engine.generate(prompts, params, mode=Mode.TARGET)
    model = engine.target.model
    forward = model.forward
    victim_slot = {}

    def poisoned(batch, cache):
        logits = forward(batch, cache)
        if logits is not None and "slot" in victim_slot:
            rows = (batch.slots == victim_slot["slot"]).nonzero().flatten()
            logits[rows] = float("nan")
        return logits

    monkeypatch.setattr(model, "forward", poisoned)
    requests = [engine.make_request(p, sp, Mode.SPECULATIVE, 3) for p, sp in zip(prompts, params)]
    ids = [engine.scheduler.add_request(r) for r in requests]
    results = {i: [] for i in ids}
    engine.scheduler.step()  # admits all four and runs one step
    victim_slot["slot"] = next(s.slot for s in engine.scheduler.running if s.handle == ids[1])
    while engine.scheduler.has_unfinished():
        for out in engine.scheduler.step().outputs:
            results[out.handle].append(out)
    final = {i: outs[-1] for i, outs in results.items()}
    assert final[ids[1]].finish_reason is FinishReason.ERROR
    assert "non-finite logits (NaN or +inf) from the target model" in final[ids[1]].error
    for k in (0, 2, 3):
        assert final[ids[k]].finish_reason is FinishReason.LENGTH
    assert engine.scheduler.num_running == 0 and len(engine.scheduler.free_slots) == CONFIG.max_batch_size
    monkeypatch.undo()
    again = engine.generate(prompts, params, num_speculative_tokens=3)
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]


def test_mixed_modes_in_one_batch(engines, pairs):
    name = "qwen2"
    engine = engines(name)
    prompts = _prompts(12, 6)
    params = _params(6)
    modes = [Mode.SPECULATIVE, Mode.TARGET, Mode.DRAFT, Mode.SPECULATIVE, Mode.DRAFT, Mode.TARGET]
    mixed = engine.generate([engine.make_request(p, sp, m, 3) for p, sp, m in zip(prompts, params, modes)])
    target_alone = engine.generate(prompts, params, mode=Mode.TARGET)
    draft_engine = Engine(target=pairs(name)[1], config=CONFIG)
    draft_alone = draft_engine.generate(prompts, params)
    for r, m, t, d in zip(mixed, modes, target_alone, draft_alone):
        assert r.token_ids == (d.token_ids if m is Mode.DRAFT else t.token_ids), m


def test_incompatible_tokenizers_are_refused(checkpoints):
    target = checkpoints("llama", seed=31)
    draft = checkpoints("llama", tokenizer_vocab=280, vocab_size=300, seed=32)
    with pytest.raises(
        IncompatiblePairError, match=r"do not share a tokenizer: target tokenizer has 300 entries, draft 280"
    ):
        Engine(target=target, draft=draft, config=CONFIG)


def test_draft_cache_bookkeeping_with_an_identical_draft(pairs, tmp_path):
    """With the target as its own draft every proposal must be accepted - through full accepts
    (two unseen tokens), rejections, γ = 0 stretches and catch-up passes. A draft cache that held
    one stale or missing position would show up as rejections here, even though the output stayed
    exact."""
    import shutil

    target, _ = pairs("llama")
    twin = tmp_path / "twin"
    shutil.copytree(target, twin)
    engine = _scheduled_engine(
        Engine(target=target, draft=twin, config=CONFIG), [4, 0, 0, 2, 7, 0, 1, 3, 0, 0, 0, 5]
    )
    prompts, params = _prompts(13), _params(8, 5)
    scheduler = engine.scheduler
    for p, sp in zip(prompts, params):
        scheduler.add_request(engine.make_request(p, sp, Mode.SPECULATIVE))
    finals = []
    while scheduler.has_unfinished():
        verify_steps = {id(s): s.stats.verify_steps for s in scheduler.running}
        finals += [o for o in scheduler.step().outputs if o.finished]
        for seq in scheduler.running:
            if seq.stats.verify_steps > verify_steps.get(id(seq), 0):
                # A row that just drafted has at most two tokens its draft has not seen, and the
                # target has all but the last: nothing is ever fed twice.
                assert len(seq.tokens) - seq.draft_len in (1, 2), (len(seq.tokens), seq.draft_len)
            assert seq.target_len == len(seq.tokens) - 1
    drafted = sum(o.stats.drafted_tokens for o in finals)
    accepted = sum(o.stats.accepted_tokens for o in finals)
    assert drafted > 50 and accepted >= drafted - 2, (accepted, drafted)


def test_max_concurrency_keeps_that_many_in_flight_and_the_same_tokens(engines):
    """A closed loop (what `specdec bench` runs): never more than the limit in flight, refilled as
    rows finish, and greedy output is the same as with everything submitted at once."""
    engine = engines("llama-close")
    prompts = _prompts(11, n=7)
    params = _params(7)
    in_flight = []
    limited = engine.generate(
        prompts,
        params,
        Mode.SPECULATIVE,
        num_speculative_tokens=3,
        max_concurrency=2,
        on_step=lambda report: in_flight.append(report.in_flight),
    )
    assert max(in_flight) == 2 and in_flight.count(2) > len(in_flight) // 2
    free = engine.generate(prompts, params, Mode.TARGET)
    _assert_same(engine, "llama-close", prompts, limited, free)
    with pytest.raises(ValueError, match="max_concurrency"):
        engine.generate(prompts, params, max_concurrency=0)


def test_warm_up_fits_a_tiny_context(pairs):
    """The start-up cost measurement writes dummy rows mid-context; with a context of 2 tokens they
    must still land inside the cache."""
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target,
        draft=draft,
        config=EngineConfig(max_batch_size=2, max_context=2, max_gamma=1, default_gamma=1),
    )
    assert engine.planner.costs.ready
    [result] = engine.generate([[5]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert len(result.token_ids) == 1


def test_a_request_id_is_a_label_two_requests_may_share(engines):
    """Requests are keyed by the engine's own handles: two with one request_id run independently,
    each labelled with it."""
    engine = engines("llama-close")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [engine.make_request(p, params, Mode.TARGET) for p in ([5, 6], [7, 8, 9])]
    for r in requests:
        r.request_id = "same"
    results = engine.generate(requests)
    alone = engine.generate([[5, 6], [7, 8, 9]], params, mode=Mode.TARGET)
    assert [r.request_id for r in results] == ["same", "same"]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
