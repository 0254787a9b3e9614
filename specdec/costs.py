"""What the γ policy knows of the machine: the measured cost of each pass, and how far realised
throughput has been from the policy's own predictions.

Costs. A draft pass at draft batch k costs d(k); a target pass at batch B and width w costs
v(B, w) = level(B) · shape_B(w); a catch-up pass over k rows costs c(k) per column (one token of
every row: the rows catch up side by side, so the pass is as wide as the row furthest behind); the
rest of a step (batching, the sync, commit) costs o(B), measured apart for steps with and without
drafts. Warm-up passes at start-up give the shape of v in width and first estimates; every real
step then updates the estimates (an outlier-damped moving average), interpolated between measured
batch sizes.

Correction. Pass timings can mislead: another process on the same cores, a cache that behaves
differently under real traffic, costs outside the timed passes. So the planner also compares how
long each step really took with what the policy predicted for it, per batch size and longest
draft, and the policy scales its predicted rates by that ratio (`RateCorrection`). A choice that keeps
disappointing is priced down until another wins; the planner probes the neighbours of its choice
now and then so the ratios of options it stopped choosing stay current.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from specdec.timing import PassKind


def _interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear in x through measured points; linear extrapolation past the ends."""
    exact = points.get(x)
    if exact is not None:  # the common case, and the policy's lookups run every step
        return exact
    xs = sorted(points)
    if not xs:
        raise ValueError("no measurements")
    if len(xs) == 1:
        return points[xs[0]] * max(x, 1) / max(xs[0], 1) if x > xs[0] else points[xs[0]]
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return points[x]
    lo, hi = (xs[0], xs[1]) if i == 0 else (xs[-2], xs[-1]) if i == len(xs) else (xs[i - 1], xs[i])
    slope = (points[hi] - points[lo]) / (hi - lo)
    return max(points[lo] + slope * (x - lo), 0.0)


@dataclass
class CostModel:
    """Measured seconds of the step's parts, smoothed; the policy's view of the machine.

    Smoothing is an exponential moving average that damps outliers: a measurement more than
    `outlier` times the current estimate (a GC pause, another process on the same cores) moves it
    by `outlier_weight` instead of `smoothing`, so one spike cannot steer γ while a lasting change
    still comes through.

    A target pass costs level(B) × shape_B(w). The shape - how the cost grows with width, relative
    to width 1 - is the warm-up's measurement of every width (a running median of three), taken
    from the nearest measured batch size
    (without a warm-up, a least-squares line through the widths seen live); the level follows
    every pass actually run, at whatever width. So widths the policy stops choosing do not keep
    stale prices while the ones it uses get dearer as sequences grow: all stay comparable.

    The shape is the measured curve, not a line through it, because real curves are not straight:
    on the CPU a pass of 2-8 rows takes another matmul kernel than one of 1 or of 12
    (`models.linear`), so at batch size 1 widths 1-3 cost about the same and at batch size 4 width
    3 costs nearly twice width 1. A line through such points prices width 1 too high, and
    speculation too cheaply next to it."""

    smoothing: float = 0.2  # weight of a new measurement
    outlier: float = 2.5
    outlier_weight: float = 0.02
    draft: dict[int, float] = field(default_factory=dict)  # k -> one draft pass
    verify_level: dict[int, float] = field(default_factory=dict)  # B -> one target pass at width 1
    verify_shape: dict[int, tuple[float, float]] = field(default_factory=dict)  # B -> (1, slope) per width
    verify_curve: dict[int, dict[int, float]] = field(default_factory=dict)  # B -> width -> cost / width 1
    catchup: dict[int, float] = field(default_factory=dict)  # k -> per column of a k-row catch-up pass
    # B -> per step, outside the timed passes; a step with drafts (more to batch, accept, commit)
    # measured apart from a plain one, since mixing them would price speculation too cheaply.
    overhead: dict[int, float] = field(default_factory=dict)
    overhead_speculative: dict[int, float] = field(default_factory=dict)
    warmed_up: bool = False  # a warm-up gave the verify shapes; else they are fitted live
    verify_seen: dict[int, dict[int, float]] = field(default_factory=dict)  # B -> width -> s (no warm-up)

    def _blend(self, table: dict[int, float], key: int, seconds: float) -> None:
        old = table.get(key)
        if old is None or old <= 0:  # no estimate yet (or a degenerate one): take the measurement
            table[key] = seconds
            return
        weight = self.outlier_weight if seconds > self.outlier * old else self.smoothing
        table[key] = (1 - weight) * old + weight * seconds

    def set_verify_baseline(self, batch: int, by_width: dict[int, float]) -> None:
        """Warm-up: the shape in width (the measured widths, relative to width 1) and the level."""
        self.warmed_up = True
        at_one = by_width.get(1) or min(by_width.values())
        if at_one <= 0:
            self._fit_verify(batch, by_width)
            return
        widths = sorted(by_width)
        raw = [by_width[w] for w in widths]
        # A running median of three widths: one timing disturbed at warm-up cannot bend the curve,
        # and a real step in it (the matmul kernel changing) survives.
        smooth = [raw[0]] + [sorted(raw[i - 1 : i + 2])[1] for i in range(1, len(raw) - 1)] + raw[1:][-1:]
        self.verify_level[batch] = at_one
        self.verify_curve[batch] = {w: s / at_one for w, s in zip(widths, smooth)}

    def _fit_verify(self, batch: int, by_width: dict[int, float]) -> None:
        # Floored at the cheapest measurement: a convex set of points can put the line's value at
        # width 1 at or below zero, which would make every verify look free.
        line_at_one = _line(by_width, 1)
        at_one = max(line_at_one, min(by_width.values()))
        slope = (_line(by_width, 2) - line_at_one) if len(by_width) > 1 else 0.0
        self.verify_level[batch] = at_one
        self.verify_shape[batch] = (1.0, slope / at_one if at_one > 0 else 0.0)

    def set_baseline(self, kind: PassKind, batch: int, width: int, seconds: float) -> None:
        """A warm-up measurement of a draft or catch-up pass: replaces the estimate outright."""
        if kind is PassKind.DRAFT:
            self.draft[batch] = seconds
        elif kind is PassKind.CATCHUP:
            self.catchup[batch] = seconds / max(width, 1)

    def _shape(self, batch: int, width: int) -> float:
        if self.verify_curve:
            curve = _nearest(self.verify_curve, batch)
            first, last = min(curve), max(curve)
            if width <= last:
                return _interpolate(curve, width)
            # Wider than the warm-up measured (a long external draft): the curve's mean slope goes
            # on - never down, and not the last step's, which one kernel change can make flat.
            slope = max((curve[last] - curve[first]) / max(last - first, 1), 0.0)
            return curve[last] + slope * (width - last)
        if not self.verify_shape:
            return 1.0
        _, slope = _nearest(self.verify_shape, batch)
        return 1.0 + slope * (width - 1)

    def observe_draft(self, batch: int, seconds: float) -> None:
        self._blend(self.draft, batch, seconds)

    def observe_verify(self, batch: int, width: int, seconds: float) -> None:
        if not self.warmed_up:
            # No warm-up (EngineConfig.warmup=False): the shape in width is learned from the
            # passes themselves, once two widths have been seen at this batch size.
            seen = self.verify_seen.setdefault(batch, {})
            self._blend(seen, width, seconds)
            if len(seen) > 1:
                self._fit_verify(batch, seen)
                return
        self._blend(self.verify_level, batch, seconds / self._shape(batch, width))

    def observe_catchup(self, batch: int, tokens: int, seconds: float) -> None:
        self._blend(self.catchup, batch, seconds / max(tokens, 1))

    def observe_overhead(
        self, batch: int, seconds: float, speculative: bool = False, step_seconds: float | None = None
    ) -> None:
        """What a step took beyond its timed passes. It is a small difference of two big, noisy
        numbers (a step with a long catch-up pass jitters by more than the whole overhead), so it
        is learnt from zero, never taken whole from one step, and a sample beyond 2.5x the larger of
        the estimate and 10% of its step moves it only a little."""
        table = self.overhead_speculative if speculative else self.overhead
        sample = max(seconds, 0.0)
        old = table.get(batch, 0.0)
        scale = max(old, 0.1 * (step_seconds or 0.0))
        weight = self.outlier_weight if scale > 0 and sample > self.outlier * scale else self.smoothing
        table[batch] = (1 - weight) * old + weight * sample

    @property
    def ready(self) -> bool:
        return bool(self.draft) and bool(self.verify_level)

    def draft_cost(self, batch: int) -> float:
        return _interpolate(self.draft, batch) if batch > 0 else 0.0

    def verify_cost(self, batch: int, width: int) -> float:
        return _interpolate(self.verify_level, batch) * self._shape(batch, width)

    def catchup_cost(self, batch: int) -> float:
        """Seconds per column of a catch-up pass over `batch` rows (defaults to a quarter of a
        draft pass)."""
        if batch <= 0:
            return 0.0
        if self.catchup:
            return _interpolate(self.catchup, batch)
        return 0.25 * self.draft_cost(batch)

    def overhead_cost(self, batch: int, speculative: bool = False) -> float:
        """Per-step seconds outside the timed passes (batching, the sync, commit, detokenising), for
        a step with drafts or a plain one; each falls back on the other until it is measured."""
        own, other = (
            (self.overhead_speculative, self.overhead)
            if speculative
            else (self.overhead, self.overhead_speculative)
        )
        table = own or other
        return _interpolate(table, batch) if table and batch > 0 else 0.0


def _nearest(table: dict[int, Any], batch: int) -> Any:
    """The entry for `batch`, or for the measured batch size nearest to it."""
    found = table.get(batch)
    return found if found is not None else table[min(table, key=lambda b: abs(b - batch))]


def _line(points: dict[int, float], x: int) -> float:
    """Least-squares line through (width, seconds), slope clamped at >= 0, evaluated at x."""
    if len(points) == 1:
        return next(iter(points.values()))
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((a - mean_x) ** 2 for a in xs)
    slope = max(sum((a - mean_x) * (b - mean_y) for a, b in zip(xs, ys)) / var, 0.0) if var else 0.0
    return max(mean_y + slope * (x - mean_x), 0.0)


@dataclass
class RateCorrection:
    """How long steps really take against the cost model's prediction, per (batch size, longest
    draft G): moving averages of the predicted and the realised seconds of the steps run there,
    and their ratio, by which the policy scales its predicted rate there. Only time is corrected:
    the tokens a step yields are the acceptance estimates' business, and their step-to-step
    randomness (1..G+1) would drown the signal. A step far slower than its prediction (a GC pause)
    moves the averages less; few observations count for little (shrunk towards 1); the factor is
    clamped to [floor, ceiling] so that a run of freak steps cannot rule an option out for good."""

    smoothing: float = 0.05
    outlier: float = 2.5  # a step this many times slower than the estimate counts less
    outlier_weight: float = 0.01
    prior_steps: float = 5.0  # observations before a factor is trusted halfway
    floor: float = 0.25
    ceiling: float = 4.0
    # (batch, G) -> [predicted seconds, realised seconds, observations]
    totals: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    def observe(self, batch: int, longest: int, predicted_seconds: float, seconds: float) -> None:
        if predicted_seconds <= 0 or seconds <= 0:
            return
        key = (batch, longest)
        old = self.totals.get(key)
        if old is None:
            self.totals[key] = [predicted_seconds, seconds, 1.0]
            return
        slow = seconds / predicted_seconds > self.outlier * old[1] / old[0]
        weight = self.outlier_weight if slow else self.smoothing
        old[0] = (1 - weight) * old[0] + weight * predicted_seconds
        old[1] = (1 - weight) * old[1] + weight * seconds
        old[2] += 1

    def factor(self, batch: int, longest: int) -> float:
        t = self.totals.get((batch, longest))
        if t is None:
            return 1.0
        trust = t[2] / (t[2] + self.prior_steps)
        ratio = 1.0 + trust * (t[0] / t[1] - 1.0)  # predicted / realised seconds: > 1 if faster
        return min(max(ratio, self.floor), self.ceiling)

    def factors(self, batch: int, max_gamma: int) -> tuple[float, ...]:
        """The factor for each longest draft G in 0..max_gamma at this batch size."""
        return tuple(self.factor(batch, g) for g in range(max_gamma + 1))
