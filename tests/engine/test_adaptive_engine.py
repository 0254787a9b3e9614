"""Adaptive γ inside the engine, with an injected cost model: the decisions follow the estimates,
forced rows keep their γ, exploration keeps estimates fresh, and greedy output stays exact."""

from __future__ import annotations

import shutil

import pytest
from test_adaptive import costs

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.request import Mode

CONFIG = EngineConfig(max_batch_size=4, max_context=160, max_gamma=6, explore_every=8, warmup=False)


def _engine(target, draft, machine):
    engine = Engine(target=target, draft=draft, config=CONFIG)
    engine.scheduler.costs = machine
    engine.scheduler.observe_costs = False
    return engine


def _record_gammas(engine):
    """Wrap the step runner to record the γ each row ran with, step by step."""
    seen = []
    run = engine.scheduler.step_runner.run

    def recording(plans, draft_only):
        seen.append({p.seq.request_id: p.gamma for p in plans})
        return run(plans, draft_only)

    engine.scheduler.step_runner.run = recording
    return seen


@pytest.fixture(scope="module")
def twin_pair(pairs, tmp_path_factory):
    target, _ = pairs("llama")
    twin = tmp_path_factory.mktemp("twin") / "draft"
    shutil.copytree(target, twin)
    return target, twin


def test_a_perfect_cheap_draft_gets_long_drafts_and_stays_exact(twin_pair):
    engine = _engine(*twin_pair, costs(draft=0.001, verify_base=1.0, verify_per_token=0.001))
    seen = _record_gammas(engine)
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 12]]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = engine.generate(prompts, params)
    drafted = [g for step in seen for g in step.values()]
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in spec] == [r.token_ids for r in target]
    # Every step drafts the longest γ allowed, except where a row's remaining budget caps it.
    assert drafted.count(CONFIG.max_gamma) >= len(drafted) - 3, drafted


def test_a_useless_draft_is_turned_off_but_still_explored(pairs):
    target, draft = pairs("llama")  # an unrelated random draft: acceptance near 0
    engine = _engine(target, draft, costs(draft=0.3, verify_base=1.0, verify_per_token=0.2))
    seen = _record_gammas(engine)
    [result] = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=100, ignore_eos=True))
    gammas = [next(iter(step.values())) for step in seen][:-1]  # the last step has no room to draft
    late = gammas[len(gammas) // 3 :]
    assert late.count(0) > 0.75 * len(late), gammas
    # Exploration: it drafts γ = 1 at least every `explore_every` + 1 steps.
    runs, current = [], 0
    for g in late:
        current = current + 1 if g == 0 else 0
        runs.append(current)
    assert max(runs) <= CONFIG.explore_every, str(gammas)
    assert result.stats.drafted_tokens > 0


def test_forced_rows_keep_their_gamma_while_the_policy_turns_others_off(pairs):
    target, draft = pairs("llama")
    machine = costs(draft=0.3, verify_base=1.0, verify_per_token=0.2)
    for b in (1, 2, 4):
        machine.observe_catchup(b, 1, 0.001)  # cheap catch-up: idling costs the free row nothing
    engine = _engine(target, draft, machine)
    seen = _record_gammas(engine)
    requests = [
        engine.make_request(
            [5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True), Mode.SPECULATIVE, 5, "forced"
        ),
        engine.make_request(
            [8, 9], SamplingParams(max_new_tokens=30, ignore_eos=True), Mode.SPECULATIVE, 0, "free"
        ),
    ]
    engine.generate(requests)
    forced = [step["forced"] for step in seen if "forced" in step]
    assert (
        all(g == min(5, 29 - i) or g <= 5 for i, g in enumerate(forced))
        and forced.count(5) >= len(forced) - 6
    )
    free = [step["free"] for step in seen[8:] if "free" in step]
    assert free.count(0) > 0.6 * len(free)


def test_adaptive_greedy_output_equals_target_alone_with_real_timings(pairs):
    """No injection: real measured costs, whatever γ they lead to, never change greedy output."""
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=128))
    assert engine.scheduler.costs.ready  # warm-up measured the passes
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 12], [7] * 10, [200, 201]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = engine.generate(prompts, params)
    target_only = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in spec] == [r.token_ids for r in target_only]
