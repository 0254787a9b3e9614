"""The numbers of an eval report, from recorded tier answers (`run.TierAnswer`): per tier and per
slice accuracy with a 95% interval, latency, tokens and cost; the route replayed offline over the
recorded answers at every candidate threshold - every `escalate_if` rule applied through the
router's own `rules_fired` - with the area under its quality/escalation curve and the chosen
threshold; and the confidence calibration with its error before and after.

Definitions (the tests compute them by hand):
- accuracy: the mean score; its interval is Wilson's for right/wrong scores, else mean ± 1.96 s/√n.
- escalation rate at threshold T: the share of examples the replayed route answers past its
  primary; quality: the mean score of the answers it returns.
- candidate thresholds: 0, every distinct (calibrated, when calibrated) confidence of every tier
  but the last, and 1: `confidence_below: T` fires below T, so these are every distinct policy.
  The threshold written is the midpoint between the chosen candidate and the one below it (the
  same policy, away from the recorded values).
- AUC: the area under quality against escalation rate over [0, 1], the curve held flat to its
  left of its first point and right of its last (1 = perfect quality at no escalation).
- the chosen threshold: with a target quality, the lowest escalation rate that reaches it (ties:
  the higher quality, then the lower threshold); with a cap on the rate, the best quality within it
  (ties: the lower rate, then the lower threshold). Neither given: the target is the last tier's
  own quality (`specdec eval`'s default).
- ECE: 10 equal-width bins over [0, 1] (the last closed), each |mean confidence - mean score|
  weighted by its share of the examples.
- calibration split: an example is held out when the first 8 bytes of sha256(id), as a big-endian
  integer, mod 1000 are below 1000 x holdout.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from specdec.eval.data import Example
from specdec.eval.run import TierAnswer
from specdec.router.calibration import Calibration
from specdec.router.router import AnswerFacts, input_too_long, rules_fired
from specdec.router.routes import Route
from specdec.router.tools import ToolCall


@dataclass(frozen=True)
class Price:
    """What a tier costs: per million input and output tokens, or per machine-hour."""

    per_million_in: float = 0.0
    per_million_out: float = 0.0
    per_hour: float = 0.0

    def of(self, answer: TierAnswer) -> float:
        return (
            answer.prompt_tokens * self.per_million_in / 1e6
            + answer.completion_tokens * self.per_million_out / 1e6
            + answer.seconds * self.per_hour / 3600
        )


def interval(scores: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) at 95%."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(scores) / n
    z = 1.959964
    if all(s in (0.0, 1.0) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (mean, max(0.0, centre - half), min(1.0, centre + half))
    if n < 2:
        return (mean, math.nan, math.nan)  # one fractional score: no interval to speak of
    sd = statistics.stdev(scores)
    half = z * sd / math.sqrt(n)
    return (mean, max(0.0, mean - half), min(1.0, mean + half))


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def tier_table(
    answers: list[TierAnswer], examples: list[Example], prices: dict[str, Price]
) -> list[dict[str, Any]]:
    """One row per (tier, variant, slice), the slice "all" first for each."""
    slice_of = {e.id: e.slice for e in examples}
    groups: dict[tuple[str, str, str], list[TierAnswer]] = {}
    for a in answers:
        for s in ("all", slice_of[a.example]) if slice_of[a.example] != "all" else ("all",):
            groups.setdefault((a.tier, a.variant, s), []).append(a)
    rows = []
    for (tier, variant, s), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "all", kv[0][2])
    ):
        mean, low, high = interval([a.score for a in group])
        price = prices.get(tier, Price())
        tokens = sum(a.prompt_tokens + a.completion_tokens for a in group)
        cost = sum(price.of(a) for a in group)
        rows.append({
            "tier": tier, "variant": variant, "slice": s, "n": len(group),
            "accuracy": mean, "accuracy_low": low, "accuracy_high": high,
            "latency_p50_s": percentile([a.seconds for a in group], 50),
            "latency_p95_s": percentile([a.seconds for a in group], 95),
            "prompt_tokens_mean": sum(a.prompt_tokens for a in group) / len(group),
            "completion_tokens_mean": sum(a.completion_tokens for a in group) / len(group),
            "cost_per_example": cost / len(group),
            "cost_per_million_tokens": cost / tokens * 1e6 if tokens else 0.0,
        })  # fmt: skip
    return rows


def judged(answer: TierAnswer, route: Route, calibration: Calibration | None) -> float | None:
    """The confidence the route's threshold applies to: the route's method, calibrated if so."""
    if answer.confidence is None:
        return None
    raw = answer.confidence[route.confidence.method]
    return calibration(raw) if calibration is not None else raw


@dataclass(frozen=True)
class Outcome:
    example: str
    tier: str  # the tier whose answer the replayed route returns
    score: float
    escalated: bool
    cost: float
    tokens: int
    seconds: float
    reasons: tuple[str, ...]


def replay(
    route: Route,
    examples: list[Example],
    answers: dict[tuple[str, str], TierAnswer],
    threshold: float | None,
    calibration: Calibration | None,
    prices: dict[str, Price],
) -> list[Outcome]:
    """The route over the recorded answers, with `confidence_below` at `threshold` (None: the
    route's own); every tier it would run is charged."""
    rules = route.rules if threshold is None else replace(route.rules, confidence_below=threshold)
    outcomes = []
    for example in examples:
        tiers = list(route.tiers)
        first = answers[(example.id, tiers[0])]
        reasons: list[str] = []
        too_long = input_too_long(rules, first.prompt_tokens)
        if too_long is not None and len(tiers) > 1:
            reasons.append(too_long)
            tiers = tiers[-1:]
        ran = []
        for i, tier in enumerate(tiers):
            answer = answers[(example.id, tier)]
            ran.append(answer)
            if i == len(tiers) - 1:
                break
            conf = answer.confidence[route.confidence.method] if answer.confidence else None
            calls = None
            if answer.tool_calls is not None:
                calls = tuple(ToolCall(c["name"], "", c["valid"], c["error"]) for c in answer.tool_calls)
            facts = AnswerFacts(
                conf, calibration(conf) if calibration is not None and conf is not None else None,
                answer.schema_valid, answer.schema_error, calls,
            )  # fmt: skip
            why, _rules = rules_fired(rules, facts)
            if not why:
                break
            reasons.extend(why)
        final = ran[-1]
        outcomes.append(
            Outcome(
                example.id, final.tier, final.score, final.tier != route.primary,
                sum(prices.get(a.tier, Price()).of(a) for a in ran),
                sum(a.prompt_tokens + a.completion_tokens for a in ran), sum(a.seconds for a in ran),
                tuple(reasons),
            )
        )  # fmt: skip
    return outcomes


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    quality: float
    escalation_rate: float
    cost_per_example: float
    tokens_per_example: float


def sweep(
    route: Route,
    examples: list[Example],
    answers: dict[tuple[str, str], TierAnswer],
    calibration: Calibration | None,
    prices: dict[str, Price],
) -> list[SweepPoint]:
    # Every tier but the last is judged by the threshold: each confidence any of them gave is a
    # point where the policy changes.
    values = {judged(answers[(e.id, t)], route, calibration) for e in examples for t in route.tiers[:-1]}
    candidates = sorted({0.0, 1.0} | {v for v in values if v is not None and not math.isnan(v)})
    points = []
    for t in candidates:
        outcomes = replay(route, examples, answers, t, calibration, prices)
        n = len(outcomes)
        points.append(SweepPoint(
            t, sum(o.score for o in outcomes) / n, sum(o.escalated for o in outcomes) / n,
            sum(o.cost for o in outcomes) / n, sum(o.tokens for o in outcomes) / n,
        ))  # fmt: skip
    return points


def auc(points: list[SweepPoint]) -> float:
    """Area under quality against escalation rate over [0, 1] (flat beyond the curve's ends)."""
    curve: dict[float, float] = {}
    for p in points:  # at one rate, the best quality any threshold gives
        curve[p.escalation_rate] = max(curve.get(p.escalation_rate, -1.0), p.quality)
    xs = sorted(curve)
    ys = [curve[x] for x in xs]
    area = xs[0] * ys[0] + (1 - xs[-1]) * ys[-1]
    for i in range(1, len(xs)):
        area += (xs[i] - xs[i - 1]) * (ys[i] + ys[i - 1]) / 2
    return area


def choose(
    points: list[SweepPoint], target_quality: float | None, max_escalation_rate: float | None
) -> tuple[SweepPoint | None, str]:
    """The chosen threshold's point (None: none qualifies) and why, in words."""
    if target_quality is not None and max_escalation_rate is not None:
        raise ValueError("give a target quality or a maximum escalation rate, not both")
    if max_escalation_rate is not None:
        within = [p for p in points if p.escalation_rate <= max_escalation_rate + 1e-12]
        if not within:
            return None, f"no threshold keeps escalation at or below {max_escalation_rate:g}"
        best = min(within, key=lambda p: (-p.quality, p.escalation_rate, p.threshold))
        return best, f"the best quality with escalation rate <= {max_escalation_rate:g}"
    if target_quality is None:
        raise ValueError("give a target quality or a maximum escalation rate")
    why = f"quality >= {target_quality:g} with the fewest escalations"
    reaching = [p for p in points if p.quality >= target_quality - 1e-12]
    if not reaching:
        return None, f"no threshold reaches quality {target_quality:g}"
    return min(reaching, key=lambda p: (p.escalation_rate, -p.quality, p.threshold)), why


# ---------------------------------------------------------------------------------- calibration


def held_out(example_id: str, holdout: float) -> bool:
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < 1000 * holdout


def isotonic(xs: Sequence[float], ys: Sequence[float]) -> Calibration:
    """The isotonic (pool-adjacent-violators) fit of ys on xs, as a calibration map: each pooled
    block's value from its smallest to its largest x, linear between blocks, flat beyond."""
    if len(xs) < 2:
        raise ValueError("a calibration needs at least two labelled answers")
    merged: dict[float, list[float]] = {}  # equal confidences are one point: [sum of y, count]
    for x, y in zip(xs, ys):
        entry = merged.setdefault(x, [0.0, 0])
        entry[0] += y
        entry[1] += 1
    blocks: list[list[float]] = []  # [sum of y, count, min x, max x]
    for x in sorted(merged):
        total, count = merged[x]
        blocks.append([total, count, x, x])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            y2, n2, _, hi = blocks.pop()
            blocks[-1][0] += y2
            blocks[-1][1] += n2
            blocks[-1][3] = hi
    raw: list[float] = []
    cal: list[float] = []
    for total, n, lo, hi in blocks:
        for x in (lo, hi):
            if not raw or x > raw[-1]:
                raw.append(x)
                cal.append(total / n)
    if raw[0] > 0:
        raw.insert(0, 0.0)
        cal.insert(0, cal[0])
    if raw[-1] < 1:
        raw.append(1.0)
        cal.append(cal[-1])
    return Calibration(tuple(raw), tuple(cal), "isotonic fit")


def ece(confidences: Sequence[float], scores: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-width bins, count-weighted."""
    n = len(confidences)
    if n == 0:
        return math.nan
    groups: dict[int, list[tuple[float, float]]] = {}
    for c, s in zip(confidences, scores):
        if math.isnan(c):
            raise ValueError("a confidence is NaN")
        groups.setdefault(min(int(c * bins), bins - 1), []).append((c, s))
    return sum(
        len(g) / n * abs(sum(c for c, _ in g) / len(g) - sum(s for _, s in g) / len(g))
        for g in groups.values()
    )
