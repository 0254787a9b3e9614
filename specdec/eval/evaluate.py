"""`specdec eval` end to end: the eval set through every tier of a route (`run`), the numbers
(`analysis`), the files (`report`). `evaluate` is the whole of it for a caller that has a backend
already (the CLI builds one; the tests pass tiny pairs)."""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdec.errors import SpecdecError
from specdec.eval import analysis
from specdec.eval.data import Example
from specdec.eval.report import write_report
from specdec.eval.run import LocalTiers, Recorder, ServerTiers, TierAnswer, Variant, run_eval
from specdec.router.routes import LOCAL_MODES, Drift, Route
from specdec.sampling import SamplingParams


@dataclass(frozen=True)
class EvalSettings:
    data: str  # the eval set's path (named in the report)
    route_name: str
    route: Route
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128))
    default_scorer: str | None = None
    prices: dict[str, analysis.Price] | None = None
    variants: tuple[Variant, ...] = ()
    target_quality: float | None = None
    max_escalation_rate: float | None = None
    holdout: float = 0.3
    machine: str = ""
    # The routes file's endpoint entries (as written), for the snippet to carry the route's own.
    endpoints: dict[str, Any] = field(default_factory=dict)


def evaluate(
    examples: list[Example],
    backend: LocalTiers | ServerTiers,
    settings: EvalSettings,
    out: Path,
    progress=None,
) -> dict[str, Any]:
    """Run, analyse and write; returns the report (report.json's contents)."""
    route = settings.route
    prices = settings.prices or {}
    unknown = sorted(set(prices) - set(route.tiers))
    if unknown:
        raise SpecdecError(
            f"--price {unknown[0]}: not a tier of route {settings.route_name!r} ({', '.join(route.tiers)})"
        )
    out.mkdir(parents=True, exist_ok=True)
    params = settings.params
    recorder = Recorder(out / "records.jsonl", {
        "route": settings.route_name, "tiers": list(route.tiers), "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
        "variants": {v.name: v.template for v in settings.variants},
        "q": route.confidence.q, "models": backend.describe(),
    })  # fmt: skip
    answers = run_eval(
        examples, route.tiers, backend, settings.route_name, route, settings.params, recorder,
        settings.default_scorer, settings.variants, route.primary if route.primary in LOCAL_MODES else None, progress,
    )  # fmt: skip
    report = build_report(examples, answers, settings)
    report["files"] = [str(p.name) for p in write_report(out, report)]
    return report


def build_report(
    examples: list[Example], answers: list[TierAnswer], settings: EvalSettings
) -> dict[str, Any]:
    route = settings.route
    prices = settings.prices or {}
    plain = {(a.example, a.tier): a for a in answers if not a.variant}
    calibration, calibration_report, reliability = _calibrate(examples, plain, route, settings.holdout)
    points = analysis.sweep(route, examples, plain, calibration, prices)
    target_quality = settings.target_quality
    default_goal = target_quality is None and settings.max_escalation_rate is None
    if default_goal:  # as good as the last tier alone, with the fewest escalations
        last = route.tiers[-1]
        target_quality = sum(plain[(e.id, last)].score for e in examples) / len(examples)
    chosen, why = analysis.choose(points, target_quality, settings.max_escalation_rate)
    if default_goal:
        why = f"the {route.tiers[-1]} tier's own quality ({target_quality:.3f}) with the fewest escalations"
    written = _written_threshold(points, chosen) if route.primary in LOCAL_MODES else None
    # Without a chosen threshold the route's own stands, and it was set for raw confidence.
    snippet_route = _snippet(settings, written, calibration is not None and chosen is not None)
    return {
        "data": settings.data,
        "route": settings.route_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": settings.machine or platform.platform(),
        "examples": len(examples),
        "tiers": list(route.tiers),
        "variants": [v.name for v in settings.variants],
        "priced": bool(prices),
        "tiers_table": analysis.tier_table(answers, examples, prices),
        "routing": {
            "confidence": str(route.confidence),
            "calibrated": calibration is not None,
            "curve": [asdict(p) for p in points],
            "auc": analysis.auc(points),
            "chosen": asdict(chosen) if chosen else None,
            "why": why,
        },
        "calibration": calibration_report,
        "reliability": reliability,
        "route_snippet": snippet_route,
        "sizing": _sizing(examples, plain, route, points, chosen),
    }


def _calibrate(examples, plain, route: Route, holdout: float):
    """The isotonic map of the primary's raw confidence to its score, fitted on the training
    split, with ECE before and after on the held-out split; (None, None, None) when the primary
    gives no confidence or a split would be empty."""
    if route.primary not in LOCAL_MODES:
        return None, None, None
    method = route.confidence.method
    train, test = [], []
    for e in examples:
        a = plain[(e.id, route.primary)]
        (test if analysis.held_out(e.id, holdout) else train).append((a.confidence[method], a.score))
    if len(train) < 2 or not test:
        return None, None, None
    fitted = analysis.isotonic([c for c, _ in train], [s for _, s in train])
    raw_c, scores = [c for c, _ in test], [s for _, s in test]
    calibrated_c = [fitted(c) for c in raw_c]
    report = {
        "method": "isotonic",
        "train": len(train),
        "held_out": len(test),
        "ece_raw": analysis.ece(raw_c, scores),
        "ece_calibrated": analysis.ece(calibrated_c, scores),
        "map": fitted.to_dict(),
    }
    reliability = {"raw": _bins(raw_c, scores), "calibrated": _bins(calibrated_c, scores)}
    return fitted, report, reliability


def _bins(confidences: list[float], scores: list[float]) -> list[dict[str, float]]:
    groups: dict[int, list[tuple[float, float]]] = {}
    for c, s in zip(confidences, scores):
        groups.setdefault(min(int(c * 10), 9), []).append((c, s))
    return [
        {
            "bin": b,
            "n": len(g),
            "confidence": sum(c for c, _ in g) / len(g),
            "accuracy": sum(s for _, s in g) / len(g),
        }
        for b, g in sorted(groups.items())
    ]


def _written_threshold(points, chosen) -> float | None:
    """The threshold to write for the chosen candidate: the midpoint between it and the candidate
    below - the same policy (`confidence_below` fires below it), away from any recorded value, so
    neither rounding nor a tie flips an answer; None when none was chosen."""
    if chosen is None:
        return None
    below = [p.threshold for p in points if p.threshold < chosen.threshold]
    return (max(below) + chosen.threshold) / 2 if below else chosen.threshold


def _snippet(settings: EvalSettings, threshold: float | None, calibrated: bool) -> dict[str, Any]:
    """The route as the routes file writes it, with the threshold to write (None: the route's
    own) and the calibration when one was fitted and a threshold chosen for it."""
    route = settings.route
    rules: list[dict[str, Any]] = []
    threshold = threshold if threshold is not None else route.rules.confidence_below
    if threshold is not None:
        rules.append({"confidence_below": float(threshold)})
    if route.rules.schema_invalid:
        rules.append({"schema_invalid": True})
    if route.rules.tools_needed is not None:
        rules.append({"tools_needed": str(route.rules.tools_needed)})
    if route.rules.input_tokens_above is not None:
        rules.append({"input_tokens_above": route.rules.input_tokens_above})
    entry: dict[str, Any] = {"name": settings.route_name, "primary": route.primary}
    if route.escalate_to:
        entry["escalate_to"] = list(route.escalate_to) if len(route.escalate_to) > 1 else route.escalate_to[0]
    entry["confidence"] = route.confidence.method
    if route.confidence.q is not None:
        entry["q"] = route.confidence.q
    if rules and route.escalate_to:
        entry["escalate_if"] = rules
    if calibrated:
        entry["calibration"] = "calibration.json"
    if route.on_endpoint_failure != "error":
        entry["on_endpoint_failure"] = route.on_endpoint_failure
    if route.drift != Drift():
        entry["drift"] = {k: v for k, v in asdict(route.drift).items() if v is not None}
    snippet: dict[str, Any] = {"routes": [entry]}
    used = {name: settings.endpoints[name] for name in route.tiers if name in settings.endpoints}
    if used:
        snippet["endpoints"] = used
    return snippet


def _sizing(examples, plain, route: Route, points, chosen) -> str:
    """Which tier to use for this task and why, in numbers."""
    n = len(examples)
    quality = {t: sum(plain[(e.id, t)].score for e in examples) / n for t in route.tiers}
    small, big = route.primary, route.tiers[-1]
    parts = [f"Alone, {small} scores {quality[small]:.3f} and {big} {quality[big]:.3f}."]
    if len(route.tiers) < 2:
        return parts[0]
    if chosen is None:
        parts.append("No threshold meets the target: use the bigger tier for this task.")
    elif chosen.escalation_rate == 0:
        parts.append(
            f"The route never needs to escalate (quality {chosen.quality:.3f}): {small} alone is enough for this task."
        )
    elif chosen.escalation_rate >= 1:
        parts.append(
            f"Meeting the target means escalating every request (quality {chosen.quality:.3f}): use {big} for this task."
        )
    else:
        parts.append(
            f"Routed at threshold {chosen.threshold:.3f}, {100 * (1 - chosen.escalation_rate):.0f}% of requests stay on "
            f"{small} and quality is {chosen.quality:.3f} ({chosen.quality - quality[big]:+.3f} against {big} alone): "
            f"route this task, {small} first."
        )
    return " ".join(parts)
