"""The eval report's numbers on crafted answers, each against a value computed by hand here."""

from __future__ import annotations

import itertools
import math

import pytest

from specdec.eval import analysis
from specdec.eval.data import Example
from specdec.eval.run import TierAnswer
from specdec.router.routes import parse_routes


def _route(*rules, primary="draft", escalate_to="target", **more):
    data = {"routes": [{"name": "r", "primary": primary, "escalate_to": escalate_to, "confidence": "mean_prob",
                        "escalate_if": list(rules), **more}]}  # fmt: skip
    return parse_routes(data, "test").routes["r"]


def _answer(example, tier, score, confidence=None, **kw):
    fields = dict(text="", schema_valid=None, schema_error=None, tool_calls=None, prompt_tokens=10,
                  completion_tokens=5, seconds=1.0)  # fmt: skip
    fields.update(kw)
    conf = (
        None
        if confidence is None
        else {m: confidence for m in ("quantile", "mean_prob", "min_prob", "geometric_mean")}
    )
    return TierAnswer(example=example, tier=tier, variant="", score=score, confidence=conf, **fields)


# Six examples: the draft right on a, b, c, e (confidences 0.9, 0.8, 0.3, 0.6), wrong on d, f
# (0.4, 0.2); the target right on all but c.
EXAMPLES = [Example(id=i, line=n, messages=[{"role": "user", "content": i}], expected="", slice=s)
            for n, (i, s) in enumerate(zip("abcdef", ["x", "x", "y", "y", "y", "x"]), start=1)]  # fmt: skip
DRAFT = {"a": (1, 0.9), "b": (1, 0.8), "c": (1, 0.3), "d": (0, 0.4), "e": (1, 0.6), "f": (0, 0.2)}
TARGET = {"a": 1, "b": 1, "c": 0, "d": 1, "e": 1, "f": 1}


def _answers():
    out = {}
    for e, (score, conf) in DRAFT.items():
        out[(e, "draft")] = _answer(e, "draft", float(score), conf, seconds=0.5)
    for e, score in TARGET.items():
        out[(e, "target")] = _answer(
            e, "target", float(score), None, seconds=2.0, prompt_tokens=12, completion_tokens=6
        )
    return out


def test_replay_escalates_where_the_rules_fire_and_charges_every_tier_run():
    route = _route({"confidence_below": 0.5})
    outcomes = analysis.replay(route, EXAMPLES, _answers(), None, None, {"target": analysis.Price(1e6, 2e6)})
    # Below 0.5: c (0.3), d (0.4), f (0.2) escalate; the target answers c wrong, d and f right.
    assert [o.tier for o in outcomes] == ["draft", "draft", "target", "target", "draft", "target"]
    assert [o.score for o in outcomes] == [1, 1, 0, 1, 1, 1]
    assert outcomes[2].reasons == ("confidence 0.300 < 0.5",)
    # Escalated: the draft's 15 tokens and the target's 18; the target priced at $1 and $2 per token.
    assert outcomes[2].tokens == 33 and outcomes[2].cost == pytest.approx(12 * 1 + 6 * 2)
    assert outcomes[0].cost == 0 and outcomes[2].seconds == pytest.approx(2.5)


def test_the_sweep_the_auc_and_the_chosen_threshold_by_hand():
    route = _route({"confidence_below": 0.5})
    points = analysis.sweep(route, EXAMPLES, _answers(), None, {})
    by_t = {p.threshold: (p.quality, p.escalation_rate) for p in points}
    # Candidates: 0, each confidence, 1. At T the examples with confidence < T escalate.
    assert sorted(by_t) == [0.0, 0.2, 0.3, 0.4, 0.6, 0.8, 0.9, 1.0]
    assert by_t[0.0] == (4 / 6, 0.0)  # nothing escalates: the draft's 4 of 6
    assert by_t[0.3] == pytest.approx((5 / 6, 1 / 6))  # f escalates and is fixed
    assert by_t[0.4] == pytest.approx((4 / 6, 2 / 6))  # c too, and the target breaks it
    assert by_t[0.6] == pytest.approx((5 / 6, 3 / 6))  # d too, fixed
    assert by_t[1.0] == pytest.approx((5 / 6, 1.0))  # everything: the target's 5 of 6
    # AUC: the best quality at each rate, trapezoids between, flat to 1.
    curve = [
        (0, 4 / 6),
        (1 / 6, 5 / 6),
        (2 / 6, 4 / 6),
        (3 / 6, 5 / 6),
        (4 / 6, 5 / 6),
        (5 / 6, 5 / 6),
        (1, 5 / 6),
    ]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(curve))
    assert analysis.auc(points) == pytest.approx(area)
    # The target's quality (5/6, the default goal) is first reached at T = 0.3, escalating 1 of 6.
    chosen, why = analysis.choose(points, 5 / 6, None)
    assert chosen.threshold == 0.3 and why == "quality >= 0.833333 with the fewest escalations"
    assert analysis.choose(points, 0.8, None)[0].threshold == 0.3
    assert analysis.choose(points, 0.9, None) == (None, "no threshold reaches quality 0.9")
    # Within 0.4 escalations: 5/6 at T = 0.3 (rate 1/6) beats 4/6 at T = 0.4.
    assert analysis.choose(points, None, 0.4)[0].threshold == 0.3
    assert analysis.choose(points, None, 0.0)[0].threshold == 0.0


def test_a_three_tier_cascade_is_swept_at_its_middle_tiers_confidences_too():
    examples = EXAMPLES[:1]
    answers = {
        ("a", "draft"): _answer("a", "draft", 0.0, 0.2),
        ("a", "speculative"): _answer("a", "speculative", 1.0, 0.5),
        ("a", "target"): _answer("a", "target", 0.0),
    }
    route = _route({"confidence_below": 0.3}, escalate_to=["speculative", "target"])
    points = {p.threshold: p.quality for p in analysis.sweep(route, examples, answers, None, {})}
    # At T = 0.5 the draft (0.2) escalates and the middle tier (0.5) stands: the only right answer.
    assert points[0.5] == 1.0 and points[0.2] == 0.0 and points[1.0] == 0.0


def test_every_rule_is_replayed_not_only_confidence():
    answers = _answers()
    answers[("a", "draft")] = _answer("a", "draft", 1.0, 0.9, schema_valid=False, schema_error="not JSON")
    answers[("b", "draft")] = _answer("b", "draft", 1.0, 0.8, tool_calls=[
        {"name": "w", "valid": True, "error": None}, {"name": "w", "valid": True, "error": None}])  # fmt: skip
    answers[("e", "draft")] = _answer("e", "draft", 1.0, 0.6, prompt_tokens=5000)
    route = _route({"schema_invalid": True}, {"tools_needed": "> 1"}, {"input_tokens_above": 100})
    outcomes = {o.example: o for o in analysis.replay(route, EXAMPLES, answers, None, None, {})}
    assert outcomes["a"].reasons == ("schema_invalid: not JSON",) and outcomes["a"].tier == "target"
    assert outcomes["b"].reasons == ("tool calls 2 > 1",)
    # Past the input limit the tiers before the last never run: only the target's 18 tokens, 2 s.
    assert outcomes["e"].reasons == ("input_tokens 5000 > 100",)
    assert outcomes["e"].tokens == 18 and outcomes["e"].seconds == 2.0
    assert outcomes["c"].tier == "draft"  # no rule fires on it


def test_tier_table_accuracy_intervals_latency_and_slices():
    answers = list(_answers().values())
    rows = {
        (r["tier"], r["slice"]): r
        for r in analysis.tier_table(answers, EXAMPLES, {"draft": analysis.Price(per_hour=3600)})
    }
    draft = rows[("draft", "all")]
    assert draft["n"] == 6 and draft["accuracy"] == pytest.approx(4 / 6)
    # Wilson at 4 of 6.
    p, n, z = 4 / 6, 6, 1.959964
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n),
    )
    assert draft["accuracy_low"] == pytest.approx(centre - half) and draft["accuracy_high"] == pytest.approx(
        centre + half
    )
    assert draft["cost_per_example"] == pytest.approx(0.5)  # $3600/h for 0.5 s
    # Slices are separate: x = a, b, f (2 of 3 right), y = c, d, e (2 of 3).
    assert rows[("draft", "x")]["n"] == 3 and rows[("draft", "x")]["accuracy"] == pytest.approx(2 / 3)
    assert rows[("target", "y")]["accuracy"] == pytest.approx(2 / 3)
    assert analysis.percentile([1, 2, 3, 4], 50) == 2.5 and analysis.percentile(
        [1, 2, 3, 4], 95
    ) == pytest.approx(3.85)
    assert math.isnan(analysis.interval([0.5])[1])  # one fractional score: no interval
    mean, _low, high = analysis.interval([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and high - mean == pytest.approx(1.959964 * 0.2 / math.sqrt(3))


def test_isotonic_calibration_and_ece_by_hand():
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ys = [0, 1, 0, 1, 1, 1]
    cal = analysis.isotonic(xs, ys)
    # PAV pools (0.2, 0.3) -> 0.5: the map is 0 at 0.1, 0.5 over [0.2, 0.3], 1 from 0.4.
    assert cal(0.1) == 0 and cal(0.25) == 0.5 and cal(0.4) == 1 and cal(0.0) == 0 and cal(1.0) == 1
    assert cal(0.35) == pytest.approx(0.75)  # linear between the blocks
    assert list(cal.raw) == sorted(set(cal.raw)) and all(
        b >= a for a, b in zip(cal.calibrated, cal.calibrated[1:])
    )
    # ECE: bins [0.1,0.2) {0.1: 0}, [0.2,0.3) {0.2: 1}, [0.3,0.4) {0.3: 0}, [0.4,0.5) {0.4: 1}, ...
    conf, score = [0.15, 0.15, 0.95, 0.95], [0, 1, 1, 1]
    assert analysis.ece(conf, score) == pytest.approx(0.5 * abs(0.15 - 0.5) + 0.5 * abs(0.95 - 1))
    # 1.0 falls in the last bin, with 0.95: |0.975 - 0.5| (0.525 if it had a bin of its own).
    assert analysis.ece([1.0, 0.95], [0, 1]) == pytest.approx(0.475)
    # Ties are one point: 0.2 (both wrong) -> 0, 1.0 (2 of 3 right) -> 2/3.
    tied = analysis.isotonic([0.2, 0.2, 1, 1, 1], [0, 0, 0, 1, 1])
    assert tied(0.2) == 0 and tied(1.0) == pytest.approx(2 / 3)
    assert analysis.isotonic([0.5, 0.5, 0.5], [0, 1, 1])(0.5) == pytest.approx(2 / 3)
    assert analysis.held_out("x", 0.0) is False and analysis.held_out("x", 1.0) is True
    ids = [f"e{i}" for i in range(1000)]
    assert 250 < sum(analysis.held_out(i, 0.3) for i in ids) < 350  # about the share asked
