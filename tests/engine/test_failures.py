"""A failing step fails only its own requests; in-process generation of any number of prompts;
-inf as "impossible"; near-zero temperatures; the engine keeps serving after all of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import FinishReason, Mode

CONFIG = EngineConfig(max_batch_size=4, max_queue=1, max_context=128, max_gamma=4, warmup=False)
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target=target, draft=draft, config=CONFIG)


def _baseline(engine, prompts, params=GREEDY):
    return [r.token_ids for r in engine.generate(prompts, params, mode=Mode.TARGET)]


def test_a_long_sampled_external_draft_beside_a_sampled_model_drafted_row(engine):
    """The external row verifies 10 positions, the model-drafted row drafts 2: the draft's q has
    only 2 positions. Both finish, and the engine serves the next request."""
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True)
    [reference] = engine.generate([[5, 6, 7]], GREEDY, mode=Mode.TARGET)
    external = engine.make_request(
        [5, 6, 7], sampled, Mode.SPECULATIVE, external_draft=reference.token_ids[:10]
    )
    drafted = engine.make_request([8, 9], sampled, Mode.SPECULATIVE, 2)
    results = engine.generate([external, drafted])
    assert [r.finish_reason for r in results] == [FinishReason.LENGTH] * 2
    assert results[0].stats.drafted_tokens >= 10 and results[1].stats.drafted_tokens > 0
    assert [r.token_ids for r in engine.generate([[5, 6, 7]], GREEDY)] == [reference.token_ids]


def test_a_step_that_raises_fails_its_requests_and_the_next_ones_are_served(engine, monkeypatch):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    expected = _baseline(engine, prompts)
    run = engine.runner.step.run
    calls = {"n": 0}

    def failing_once(plans, draft_only):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return run(plans, draft_only)

    monkeypatch.setattr(engine.runner.step, "run", failing_once)
    results = engine.generate(prompts, GREEDY, num_speculative_tokens=2)
    assert [r.finish_reason for r in results] == [FinishReason.ERROR] * 3
    assert all("internal error while decoding: RuntimeError: injected fault" in r.error for r in results)
    scheduler = engine.scheduler
    assert not scheduler.has_unfinished() and len(scheduler.free_slots) == CONFIG.max_batch_size
    monkeypatch.undo()
    assert [r.token_ids for r in engine.generate(prompts, GREEDY, num_speculative_tokens=2)] == expected


def test_a_failing_prefill_fails_only_the_rows_being_prefilled(engine, monkeypatch):
    expected = _baseline(engine, [[5, 6, 7]])
    prefill = engine.runner.prefill

    def failing(chunks):
        if any(s.request.prompt_ids == [40, 41, 42] for s, _ in chunks):
            raise RuntimeError("injected prefill fault")
        prefill(chunks)

    monkeypatch.setattr(engine.runner, "prefill", failing)
    scheduler = engine.scheduler
    good = scheduler.add_request(engine.make_request([5, 6, 7], GREEDY, Mode.TARGET))
    scheduler.step()  # the good request is running
    bad = scheduler.add_request(engine.make_request([40, 41, 42], GREEDY, Mode.TARGET))
    outputs = {good: [], bad: []}
    while scheduler.has_unfinished():
        for out in scheduler.step().outputs:
            outputs[out.handle].append(out)
    assert outputs[bad][-1].finish_reason is FinishReason.ERROR
    assert "while prefilling" in outputs[bad][-1].error
    assert outputs[good][-1].finish_reason is FinishReason.LENGTH
    # The good row's first token came from the first step, before this loop.
    assert len([t for o in outputs[good] for t in o.new_token_ids]) == len(expected[0]) - 1


def test_generate_takes_more_prompts_than_the_queue_holds_and_leaves_nothing_behind(engine):
    prompts = [[5 + i, 6, 7] for i in range(9)]  # max_batch_size 4 + max_queue 1 < 9
    results = engine.generate(prompts, GREEDY, mode=Mode.TARGET)
    assert [r.finish_reason for r in results] == [FinishReason.LENGTH] * 9
    steps = {"n": 0}

    def interrupt(_report):
        steps["n"] += 1
        if steps["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, GREEDY, mode=Mode.TARGET, on_step=interrupt)
    assert not engine.scheduler.has_unfinished()  # nothing left to run during a later call
    assert [r.token_ids for r in engine.generate(prompts[:2], GREEDY, mode=Mode.TARGET)] == [
        r.token_ids for r in results[:2]
    ]


def test_long_prompts_are_prefilled_in_chunks_while_running_rows_decode(pairs):
    target, draft = pairs("llama-close")
    budget = 16
    chunked = Engine(
        target=target, draft=draft, config=dataclasses.replace(CONFIG, max_prefill_tokens=budget)
    )
    whole = Engine(target=target, draft=draft, config=CONFIG)
    g = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(3, 300, (70,), generator=g).tolist()
    short = SamplingParams(max_new_tokens=30, ignore_eos=True)
    reports = []
    requests = [
        chunked.make_request([5, 6, 7], short, Mode.SPECULATIVE, 2),
        chunked.make_request(long_prompt, GREEDY, Mode.SPECULATIVE, 2),
    ]
    results = chunked.generate(requests, max_concurrency=2, on_step=reports.append)
    assert all(r.prefill_tokens <= budget for r in reports)
    prefill_steps = [r for r in reports if r.prefill_tokens]
    assert len(prefill_steps) >= 69 // budget  # the long prompt took several steps ...
    short_id = results[0].request_id
    decoding_meanwhile = [
        r for r in prefill_steps if any(o.request_id == short_id and o.new_token_ids for o in r.outputs)
    ]
    assert len(decoding_meanwhile) >= len(prefill_steps) - 1  # ... and the short row decoded in them
    reference = whole.generate([[5, 6, 7], long_prompt], [short, GREEDY], mode=Mode.TARGET)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def test_external_drafts_share_the_step_budget_and_stay_exact(pairs):
    target, draft = pairs("llama-close")
    budget = 8
    engine = Engine(target=target, draft=draft, config=dataclasses.replace(CONFIG, max_prefill_tokens=budget))
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10]]
    reference = engine.generate(prompts, params, mode=Mode.TARGET)
    requests = [
        engine.make_request(p, params, Mode.SPECULATIVE, external_draft=r.token_ids[:29])
        for p, r in zip(prompts, reference)
    ]
    reports = []
    results = engine.generate(requests, on_step=reports.append)
    for report in reports:
        verified = sum(len(p.external) for p in report.plan.rows if p.external is not None)
        assert verified <= max(budget - report.prefill_tokens, 0)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert sum(r.stats.verify_steps for r in results) >= 2 * 29 // budget


@pytest.mark.parametrize("temperature", [1e-39, 1e-6])
def test_a_temperature_below_1e_5_is_greedy(engine, temperature):
    tiny = SamplingParams(max_new_tokens=12, temperature=temperature, ignore_eos=True)
    [result] = engine.generate([[5, 6, 7]], tiny, num_speculative_tokens=2)
    assert result.error is None and result.token_ids == _baseline(engine, [[5, 6, 7]])[0]


def _masking(engine, monkeypatch, banned):
    """Make the target's logits -inf on `banned` (a function of the batch -> bool mask [V])."""
    model = engine.target.model
    forward = model.forward

    def masked(batch, cache):
        logits = forward(batch, cache)
        if logits is not None:
            logits[..., banned(logits.shape[-1])] = float("-inf")
        return logits

    monkeypatch.setattr(model, "forward", masked)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_minus_infinity_means_impossible_never_a_failed_row(engine, monkeypatch, temperature):
    params = SamplingParams(max_new_tokens=16, temperature=temperature, seed=5, ignore_eos=True)
    free = engine.generate([[5, 6, 7]], params, mode=Mode.TARGET)[0].token_ids
    banned = set(free[:4])
    _masking(engine, monkeypatch, lambda v: torch.tensor([i in banned for i in range(v)]))
    for mode, gamma in ((Mode.TARGET, 0), (Mode.SPECULATIVE, 3)):
        [result] = engine.generate([[5, 6, 7]], params, mode=mode, num_speculative_tokens=gamma)
        assert result.error is None and result.finish_reason is FinishReason.LENGTH
        assert not banned & set(result.token_ids)


def test_a_position_with_no_possible_token_fails_the_request_with_a_message(engine, monkeypatch):
    _masking(engine, monkeypatch, lambda v: torch.ones(v, dtype=torch.bool))
    for params in (GREEDY, SamplingParams(max_new_tokens=4, temperature=1.0, ignore_eos=True)):
        [result] = engine.generate([[5, 6, 7]], params, mode=Mode.TARGET)
        assert result.finish_reason is FinishReason.ERROR and result.token_ids == []
        assert "no token is possible" in result.error and "-inf" in result.error
    monkeypatch.undo()
    assert engine.generate([[5, 6, 7]], GREEDY, mode=Mode.TARGET)[0].error is None


@pytest.mark.timeout(60)  # the bug this pins made generate() loop forever
def test_text_the_tokenizer_cannot_decode_fails_that_request_only(engine, monkeypatch):
    """The row's final output is still delivered (generate returns), the other row finishes."""
    prompts = [[5, 6, 7], [40, 41]]
    bad_out, good_out = _baseline(engine, prompts)
    poison = next(t for t in bad_out[2:] if t not in good_out)
    # The detokenizer reads token bytes (a byte-level tokenizer: no decode call); fail them there.
    pieces = engine.scheduler.pieces
    token_bytes = pieces.bytes

    def failing(token_id):
        if token_id == poison:
            raise ValueError("undecodable")
        return token_bytes(token_id)

    monkeypatch.setattr(pieces, "bytes", failing)
    bad, good = engine.generate(prompts, GREEDY, mode=Mode.TARGET)
    assert bad.finish_reason is FinishReason.ERROR and "ValueError: undecodable" in bad.error
    assert good.finish_reason is FinishReason.LENGTH and good.token_ids == good_out
    assert not engine.scheduler.has_unfinished()
    monkeypatch.undo()
    assert [r.token_ids for r in engine.generate(prompts, GREEDY, mode=Mode.TARGET)] == [bad_out, good_out]
