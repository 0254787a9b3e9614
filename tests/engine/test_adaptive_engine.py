"""Adaptive γ inside the engine, with an injected cost model: the decisions follow the estimates,
forced rows keep their γ, exploration keeps estimates fresh, and greedy output stays exact."""

from __future__ import annotations

import itertools
import shutil

import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.planner import GammaPlanner
from specdec.request import Mode
from specdec.testing import synthetic_costs as costs

CONFIG = EngineConfig(max_batch_size=4, max_context=160, max_gamma=6, explore_every=8, warmup=False)


def _engine(target, draft, machine):
    """An engine whose planner prices steps with `machine` and never learns real timings."""
    planner = GammaPlanner(CONFIG, costs=machine, learn_costs=False)
    return Engine(target=target, draft=draft, config=CONFIG, planner=planner)


class GammaLog:
    """An on_step observer: the γ each row ran with, and the tokens it got, step by step."""

    def __init__(self):
        self.gammas: list[dict[str, int]] = []
        self.emitted: list[dict[str, int]] = []

    def __call__(self, report):
        if report.plan is not None:
            self.gammas.append({p.seq.request_id: p.gamma for p in report.plan.rows})
            self.emitted.append({o.request_id: len(o.new_token_ids) for o in report.outputs})


@pytest.fixture(scope="module")
def twin_pair(pairs, tmp_path_factory):
    target, _ = pairs("llama")
    twin = tmp_path_factory.mktemp("twin") / "draft"
    shutil.copytree(target, twin)
    return target, twin


def test_a_perfect_cheap_draft_gets_long_drafts_and_stays_exact(twin_pair):
    engine = _engine(*twin_pair, costs(draft=0.001, verify_base=1.0, verify_per_token=0.001))
    log = GammaLog()
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 12]]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = engine.generate(prompts, params, on_step=log)
    drafted = [g for step in log.gammas for g in step.values()]
    target = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in spec] == [r.token_ids for r in target]
    # Every step drafts the longest γ allowed, except where a row's remaining budget caps it.
    assert drafted.count(CONFIG.max_gamma) >= len(drafted) - 3, drafted


def test_a_useless_draft_is_turned_off_explored_then_left_alone(pairs):
    target, draft = pairs("llama")  # an unrelated random draft: acceptance near 0
    engine = _engine(target, draft, costs(draft=0.3, verify_base=1.0, verify_per_token=0.2))
    log = GammaLog()
    [result] = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=100, ignore_eos=True), on_step=log)
    gammas = [next(iter(step.values())) for step in log.gammas][:-1]  # the last step has no room to draft
    late = gammas[len(gammas) // 3 :]
    assert late.count(0) > 0.9 * len(late), gammas
    # Exploration: once kept out, it drafts γ = 1 after every `explore_every` idle steps while its
    # optimistic acceptance could still pay for that; then the gate (GammaPlanner._hopeless) stops.
    explorations = [i for i, g in enumerate(gammas) if g == 1]
    assert len(explorations) >= 2 and result.stats.drafted_tokens > 0, gammas
    gaps = [b - a for a, b in itertools.pairwise(explorations)]
    assert all(gap == CONFIG.explore_every + 1 for gap in gaps[1:]), gammas


def test_forced_rows_keep_their_gamma_while_the_policy_turns_others_off(pairs):
    target, draft = pairs("llama")
    machine = costs(draft=0.3, verify_base=1.0, verify_per_token=0.2)
    for b in (1, 2, 4):
        machine.observe_catchup(b, 1, 0.001)  # cheap catch-up: idling costs the free row nothing
    engine = _engine(target, draft, machine)
    log = GammaLog()
    requests = [
        engine.make_request(
            [5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True), Mode.SPECULATIVE, 5, "forced"
        ),
        engine.make_request(
            [8, 9], SamplingParams(max_new_tokens=30, ignore_eos=True), Mode.SPECULATIVE, 0, "free"
        ),
    ]
    engine.generate(requests, on_step=log)
    # The forced row drafts exactly 5 every step, until the room left (a step emits up to γ + 1
    # tokens) caps it at remaining - 1.
    remaining, forced, expected = 30, [], []
    for gammas, emitted in zip(log.gammas, log.emitted):
        if "forced" not in gammas:
            continue
        forced.append(gammas["forced"])
        expected.append(min(5, remaining - 1))
        remaining -= emitted.get("forced", 0)
    assert forced == expected and remaining == 0
    assert forced.count(5) >= len(forced) - 5
    free = [step["free"] for step in log.gammas[8:] if "free" in step]
    assert free.count(0) > 0.6 * len(free)


def test_adaptive_greedy_output_equals_target_alone_with_real_timings(pairs):
    """No injection: real measured costs, whatever γ they lead to, never change greedy output."""
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=128))
    assert engine.planner.costs.ready  # warm-up measured the passes
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 12], [7] * 10, [200, 201]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = engine.generate(prompts, params)
    target_only = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in spec] == [r.token_ids for r in target_only]
