"""The adaptive-γ policy as a pure function of (acceptance estimates, costs), with injected costs."""

from __future__ import annotations

import itertools

import pytest

from specdec.adaptive import AcceptanceEstimate, RowView, choose_gammas, expected_tokens, step_rate
from specdec.costs import CostModel
from specdec.testing import synthetic_costs as costs
from specdec.timing import PassKind


def test_expected_tokens_matches_enumeration():
    """(1 - α^(γ+1)) / (1 - α) equals Σ_a P(a accepted) (a + 1) enumerated over accept patterns."""
    for alpha in (0.0, 0.3, 0.75, 0.99):
        for gamma in range(0, 7):
            exact = sum(alpha**a * (1 - alpha) * (a + 1) for a in range(gamma)) + alpha**gamma * (gamma + 1)
            assert expected_tokens(alpha, gamma) == pytest.approx(exact)


def test_low_acceptance_and_width_bound_verify_choose_plain_decoding():
    """Verification grows with width and α is low: speculation cannot pay; γ = 0."""
    machine = costs(draft=0.2, verify_base=1.0, verify_per_token=0.5)
    decision = choose_gammas([RowView(alpha=0.2) for _ in range(8)], machine, max_gamma=8)
    assert decision.gammas == (0,) * 8
    assert decision.expected_rate == pytest.approx(decision.target_rate)


def test_free_draft_and_high_acceptance_choose_a_large_gamma():
    machine = costs(draft=0.001, verify_base=1.0, verify_per_token=0.001)
    decision = choose_gammas([RowView(alpha=0.95)], machine, max_gamma=8)
    assert decision.gammas[0] >= 7
    assert decision.expected_rate > 4 * decision.target_rate


def test_middle_ground_picks_the_interior_optimum():
    machine = costs(draft=0.15, verify_base=1.0, verify_per_token=0.02)
    decision = choose_gammas([RowView(alpha=0.7)], machine, max_gamma=8)
    rates = [step_rate([RowView(alpha=0.7)], [g], machine) for g in range(9)]
    assert decision.gammas[0] == max(range(9), key=lambda g: rates[g])
    assert 0 < decision.gammas[0] < 8


@pytest.mark.parametrize("seed", range(20))
def test_policy_equals_brute_force_over_all_per_row_assignments(seed):
    """Exhaustive search over every per-row γ vector finds no better step than the policy's, and
    the curve the policy maximises is the best brute-force rate for each longest draft G. (Rows lag
    the draft equally: with unequal catch-up debts, drafting by α order is a heuristic.)"""
    import random

    rnd = random.Random(seed)
    machine = costs(draft=rnd.uniform(0.01, 0.5), verify_base=1.0, verify_per_token=rnd.uniform(0.0, 0.3))
    max_gamma = 4
    behind = rnd.choice([1, 2, 5, 40])
    rows = [
        RowView(
            alpha=rnd.random(),
            behind=behind,
            fixed=rnd.choice([None, None, None, 2, 0]),
            model_drafts=rnd.random() > 0.15,
        )
        for _ in range(rnd.randint(1, 4))
    ]
    rows = [
        r if r.model_drafts or r.fixed is not None else RowView(r.alpha, fixed=0, model_drafts=False)
        for r in rows
    ]
    draft_only = rnd.choice([0, 0, 1])
    decision = choose_gammas(rows, machine, max_gamma, draft_only, per_row=True)
    choices = [[r.fixed] if r.fixed is not None else list(range(max_gamma + 1)) for r in rows]
    best = {}
    for gammas in itertools.product(*choices):
        g = max(gammas, default=0)
        free_g = max((gm for gm, r in zip(gammas, rows) if r.fixed is None), default=0)
        rate = step_rate(rows, gammas, machine, draft_only)
        best[free_g] = max(best.get(free_g, 0.0), rate)
        assert rate <= decision.expected_rate * (1 + 1e-9), (gammas, rate, decision)
        del g
    assert decision.expected_rate == pytest.approx(max(best.values()))
    assert decision.expected_rate == pytest.approx(step_rate(rows, decision.gammas, machine, draft_only))
    for g, rate in enumerate(decision.curve):
        if g in best and g > 0:
            assert rate == pytest.approx(best[g]), (g, decision.curve, best)


def test_forced_rows_keep_their_gamma_and_the_policy_decides_the_others():
    machine = costs(draft=0.2, verify_base=1.0, verify_per_token=0.5)
    rows = [RowView(alpha=0.1, fixed=5), RowView(alpha=0.2), RowView(alpha=0.1)]
    decision = choose_gammas(rows, machine, max_gamma=8)
    assert decision.gammas[0] == 5
    # The others ride along only where that pays; here α is low, so they would not.
    assert decision.gammas[1:] == (0, 0) or decision.expected_rate >= step_rate(rows, (5, 0, 0), machine)


def test_leaving_speculation_counts_the_catch_up_it_will_need():
    """With an expensive catch-up, staying at γ = 0 costs more than it did without one."""
    cheap, dear = costs(0.3, 1.0, 0.2), costs(0.3, 1.0, 0.2)
    for b in (1, 2, 4, 8, 16):
        cheap.observe_catchup(b, 1, 0.0)
        dear.observe_catchup(b, 1, 0.5)
    row = [RowView(alpha=0.55, behind=1)]
    assert choose_gammas(row, dear, 8).target_rate < choose_gammas(row, cheap, 8).target_rate


def test_acceptance_estimate_moves_from_prior_to_evidence():
    est = AcceptanceEstimate()
    assert est.value(prior=0.5, prior_weight=4) == 0.5
    for _ in range(50):
        est.observe(gamma=4, accepted=4, decay=0.95)  # every draft accepted
    assert est.value(prior=0.5, prior_weight=4) > 0.9
    for _ in range(50):
        est.observe(gamma=4, accepted=0, decay=0.95)  # the first draft rejected every time
    assert est.value(prior=0.5, prior_weight=4) < 0.2  # the prior keeps 4 of ~24 effective trials


def test_acceptance_counts_only_tested_positions():
    """Positions after the first rejection were never tested: a=1 of γ=4 is 1 success in 2 trials."""
    est = AcceptanceEstimate()
    est.observe(gamma=4, accepted=1, decay=1.0)
    assert (est.successes, est.trials) == (1, 2)
    est.observe(gamma=3, accepted=3, decay=1.0)
    assert (est.successes, est.trials) == (4, 5)


def test_cost_model_interpolates_and_extrapolates():
    model = CostModel()
    model.set_verify_baseline(1, {1: 1.0, 5: 3.0})
    model.set_verify_baseline(4, {1: 2.0, 5: 6.0})
    assert model.verify_cost(1, 3) == pytest.approx(2.0)
    assert model.verify_cost(4, 3) == pytest.approx(4.0)
    assert model.verify_cost(8, 1) == pytest.approx(2.0 + 4 / 3)  # linear past the last batch size
    model.observe_verify(1, 1, 2.0)  # smoothed, not replaced
    assert 1.0 < model.verify_cost(1, 1) < 2.0


def test_a_pass_at_one_width_reprices_every_width():
    """Sequences grow, passes get dearer: a measurement at the width in use moves the level, so
    widths the policy is not using keep their relation to it instead of a stale warm-up price."""
    model = CostModel(smoothing=1.0)
    model.set_verify_baseline(2, {w: 1.0 + 0.1 * w for w in range(1, 10)})
    before = [model.verify_cost(2, w) for w in range(1, 10)]
    model.observe_verify(2, 3, 2 * before[2])  # width 3 now costs twice as much
    after = [model.verify_cost(2, w) for w in range(1, 10)]
    assert all(a == pytest.approx(2 * b) for a, b in zip(after, before))


def test_one_spike_does_not_move_the_estimate_but_a_lasting_change_does():
    model = CostModel()
    model.observe_draft(1, 1.0)
    model.observe_draft(1, 50.0)  # another process took the cores for one pass
    assert model.draft_cost(1) < 2.1
    for _ in range(200):
        model.observe_draft(1, 50.0)  # ...but the machine really became slower
    assert model.draft_cost(1) > 40


def test_verify_shape_follows_the_measured_widths():
    """The warm-up's curve as measured, not a line through it: on the CPU widths 1-3 at batch size
    1 cost about the same and a wider pass jumps (another matmul kernel, models.linear); a line
    would price width 1 too high and speculation too cheaply."""
    model = CostModel()
    model.set_verify_baseline(2, {1: 3.0, 2: 3.1, 3: 3.0, 4: 5.5, 5: 5.8, 6: 9.0, 7: 6.2})
    # A running median of three: the step between widths 3 and 4 stays, the one-off at 6 does not.
    assert [model.verify_cost(2, w) for w in range(1, 8)] == pytest.approx(
        [3.0, 3.0, 3.1, 5.5, 5.8, 6.2, 6.2]
    )
    # Past the last width (a long external draft): the curve's mean slope, (6.2 - 3.0) / 6, goes on.
    assert model.verify_cost(2, 13) == pytest.approx(6.2 + 6 * 3.2 / 6)
    # The level follows real passes at any width; the shape stays the measured one.
    for _ in range(200):
        model.observe_verify(2, 4, 11.0)
    assert model.verify_cost(2, 1) == pytest.approx(6.0, rel=0.01)
    assert model.verify_cost(2, 4) == pytest.approx(11.0, rel=0.01)


def test_step_overhead_favours_speculation():
    """A fixed per-step overhead is paid once per step whatever γ: the policy counts it."""
    rows = [RowView(alpha=0.6)]
    lean = costs(draft=0.3, verify_base=1.0, verify_per_token=0.1)
    heavy = costs(draft=0.3, verify_base=1.0, verify_per_token=0.1)
    for b in (1, 2, 4):
        heavy.observe_overhead(b, 3.0)
    assert choose_gammas(rows, heavy, 8).gammas[0] >= choose_gammas(rows, lean, 8).gammas[0]
    assert choose_gammas(rows, heavy, 8).gammas[0] > 0


def test_speculative_steps_own_overhead_is_priced_apart():
    """Steps with drafts cost more outside the passes than plain ones (more to batch, accept and
    commit); measured apart, a dear enough speculative overhead turns speculation off."""
    rows = [RowView(alpha=0.6) for _ in range(4)]
    machine = costs(draft=0.3, verify_base=1.0, verify_per_token=0.1)
    for _ in range(80):  # learnt from zero, as a moving average (steps of about 10 s)
        for b in (1, 2, 4):
            machine.observe_overhead(b, 0.1, step_seconds=10.0)
    assert machine.overhead_cost(4, speculative=True) == pytest.approx(0.1, rel=1e-3)  # falls back on plain
    assert choose_gammas(rows, machine, 8).gammas[0] > 0
    for _ in range(80):
        for b in (1, 2, 4):
            machine.observe_overhead(b, 5.0, speculative=True, step_seconds=10.0)
    assert machine.overhead_cost(4) == pytest.approx(0.1, rel=1e-3)
    decision = choose_gammas(rows, machine, 8)
    assert decision.gammas == (0,) * 4
    assert step_rate(rows, (2,) * 4, machine) < decision.target_rate


def test_the_margin_keeps_plain_decoding_when_speculation_barely_pays():
    machine = costs(draft=0.3, verify_base=1.0, verify_per_token=0.05)
    rows = [RowView(alpha=0.3)]
    bare = choose_gammas(rows, machine, 8, margin=0.0)
    assert bare.gammas[0] > 0 and bare.expected_rate < 1.05 * bare.target_rate  # a thin expected gain
    hedged = choose_gammas(rows, machine, 8, margin=0.05)
    assert hedged.gammas == (0,) and hedged.expected_rate == hedged.target_rate


def test_per_batch_gamma_gives_every_free_row_the_same_gamma():
    machine = costs(draft=0.05, verify_base=1.0, verify_per_token=0.01)
    rows = [RowView(alpha=a) for a in (0.9, 0.5, 0.1, 0.7)]
    decision = choose_gammas(rows, machine, 8)
    assert len(set(decision.gammas)) == 1 and decision.gammas[0] > 0
    per_row = choose_gammas(rows, machine, 8, per_row=True)
    assert per_row.expected_rate >= decision.expected_rate


def test_catch_up_is_priced_per_column_of_one_batched_pass():
    """Rows catch up side by side: k idle rows add one column of a k-row catch-up pass, not k of
    them, and drafting rows pay for the row furthest behind, not the sum (this once priced the
    plain step at batch 16 a third too dear, so the policy speculated where it lost)."""
    machine = costs(draft=0.4, verify_base=1.0, verify_per_token=0.01)
    machine.set_baseline(PassKind.CATCHUP, 16, 8, 8 * 0.3)  # 0.3 s per column at 16 rows
    machine.set_baseline(PassKind.CATCHUP, 4, 8, 8 * 0.2)
    rows = [RowView(alpha=0.5) for _ in range(16)]
    plain = 1.0 + 0.01 * 16 * 1  # one target pass of width 1
    assert step_rate(rows, (0,) * 16, machine) == pytest.approx(16 / (plain + 0.3))
    behind = [RowView(alpha=0.5, behind=b) for b in (2, 5, 9, 3)]
    verify = 1.0 + 0.01 * 4 * 3
    seconds = verify + 2 * machine.draft_cost(4) + 0.2 * (9 - 1)  # widest debt: all but 1 of 9
    tokens = 4 * expected_tokens(0.5, 2)
    assert step_rate(behind, (2,) * 4, machine) == pytest.approx(tokens / seconds)


def test_without_warm_up_the_width_shape_is_learned_from_the_passes():
    """EngineConfig(warmup=False): once two widths have been seen at a batch size, a wider verify
    is priced dearer (not as free as width 1, which would drift the policy to γmax)."""
    model = CostModel()
    model.observe_verify(4, 1, 1.0)
    model.observe_verify(4, 5, 3.0)
    assert model.verify_cost(4, 1) == pytest.approx(1.0)
    assert model.verify_cost(4, 3) == pytest.approx(2.0)
    assert model.verify_cost(4, 9) > model.verify_cost(4, 5)


def test_a_convex_warm_up_never_prices_a_verify_at_zero():
    model = CostModel()
    model.set_verify_baseline(2, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 10.0})
    assert model.verify_cost(2, 1) >= 1.0
    model.observe_verify(2, 1, 1.2)  # and real passes still move the level normally
    assert model.verify_cost(2, 1) == pytest.approx(0.8 * 1.0 + 0.2 * 1.2)


@pytest.mark.parametrize("seed", range(20))
def test_one_gamma_per_batch_is_the_best_single_gamma(seed):
    """The default policy (one γ for the free rows) equals trying every γ with `step_rate`, rows
    behind by different amounts, forced and target-only rows mixed in."""
    import random

    rnd = random.Random(seed)
    machine = costs(draft=rnd.uniform(0.01, 0.5), verify_base=1.0, verify_per_token=rnd.uniform(0.0, 0.3))
    rows = [
        RowView(alpha=rnd.random(), behind=rnd.choice([1, 2, 3, 9]), fixed=rnd.choice([None, None, None, 3]))
        for _ in range(rnd.randint(1, 12))
    ] + [RowView(0.0, fixed=0, model_drafts=False)] * rnd.randint(0, 2)
    draft_only = rnd.choice([0, 0, 1])
    decision = choose_gammas(rows, machine, 6, draft_only)
    free = [i for i, r in enumerate(rows) if r.fixed is None]
    by_g = []
    for g in range(7):
        gammas = [g if i in free else (r.fixed or 0) for i, r in enumerate(rows)]
        by_g.append(step_rate(rows, gammas, machine, draft_only))
    assert decision.expected_rate == pytest.approx(max(by_g) if free else by_g[0])
    assert decision.expected_rate == pytest.approx(step_rate(rows, decision.gammas, machine, draft_only))
