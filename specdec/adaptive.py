"""Adaptive speculation length: choose γ per step from measured costs and acceptance estimates.

Estimator (per row). Acceptance is tracked per drafted position: a verify with γ drafts of which a
were accepted observes min(a + 1, γ) positions (those after the first rejection were never tested)
and a successes. Each row keeps exponentially decayed sums S (successes) and N (observations),
decayed by `decay` per observed position, and estimates

    α = (S + n0 · α_global) / (N + n0)

so a new row starts at the engine-wide estimate α_global (itself the same kind of decayed ratio
over all rows) and moves to its own evidence as it accumulates.

Costs (per engine). A draft pass at draft batch k costs d(k); a target pass at batch B and width w
costs v(B, w) = level(B) · shape_B(w); a catch-up pass over k rows costs c(k) per column (one
token of every row: the rows catch up side by side, so the pass is as wide as the row furthest
behind); the rest of a step (batching, the sync, commit) costs o(B), measured apart for steps with
and without drafts. Warm-up passes at start-up give the shape of v in width and first estimates;
every real step then updates the estimates (an outlier-damped moving average), interpolated
between measured batch sizes.

Policy (per step, pure). A step's cost is set by its longest draft G (all drafting rows run G draft
passes; the verify is G + 1 wide) and by how many rows draft (k). By default one γ serves the whole
batch (k = 0 or all rows); with per-row γ, for given (G, k) the rows that draft are the k with the
highest acceptance - the best choice when the rows lag the draft equally, a heuristic when their
catch-up debts differ. The policy evaluates these (G, k), G ∈ {0..γmax}, and picks the one that
maximises

    expected tokens / expected seconds
    = (Σ_drafting (1 - α^(G+1)) / (1 - α) + #non-drafting) / (G · d(k) + catch-up + v(B, G + 1) + o(B)).

G = 0 is a plain target step; its price includes the catch-up debt it adds (one more column of
the catch-up pass that feeds the draft its missing tokens when speculation resumes). Speculation
must beat it by a small margin (EngineConfig.speculation_margin): where the expected gain is
within the estimates' error, the plain step is the safe choice. Forced rows
(num_speculative_tokens) always draft their own γ. Exploration: a row that has not drafted for
`explore_every` steps drafts γ = 1 once, so its α does not go stale while the policy keeps it out.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from specdec.timing import PassKind


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[tokens emitted by one verify with γ drafts] at per-token acceptance α: (1 - α^(γ+1)) / (1 - α)."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


# ----------------------------------------------------------------------------------------- estimates


@dataclass(slots=True)
class AcceptanceEstimate:
    """Decayed acceptance evidence of one row (or of the whole engine)."""

    successes: float = 0.0
    trials: float = 0.0

    def observe(self, gamma: int, accepted: int, decay: float) -> None:
        if gamma <= 0:
            return
        trials = min(accepted + 1, gamma)
        weight = decay**trials
        self.successes = self.successes * weight + accepted
        self.trials = self.trials * weight + trials

    def value(self, prior: float, prior_weight: float) -> float:
        return (self.successes + prior_weight * prior) / (self.trials + prior_weight)


# ----------------------------------------------------------------------------------------- costs


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
    to width 1 - is a least-squares line through the warm-up measurements; the level follows every
    pass actually run, at whatever width. So widths the policy stops choosing do not keep stale
    prices while the ones it uses get dearer as sequences grow: all stay comparable."""

    smoothing: float = 0.2  # weight of a new measurement
    outlier: float = 2.5
    outlier_weight: float = 0.02
    draft: dict[int, float] = field(default_factory=dict)  # k -> one draft pass
    verify_level: dict[int, float] = field(default_factory=dict)  # B -> one target pass at width 1
    verify_shape: dict[int, tuple[float, float]] = field(default_factory=dict)  # B -> (1, slope) per width
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
        """Warm-up: the shape in width (a line, relative to width 1) and the starting level."""
        self.warmed_up = True
        self._fit_verify(batch, by_width)

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
        if not self.verify_shape:
            return 1.0
        shape = self.verify_shape.get(batch)
        if shape is None:
            shape = self.verify_shape[min(self.verify_shape, key=lambda b: abs(b - batch))]
        _, slope = shape
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

    def observe_overhead(self, batch: int, seconds: float, speculative: bool = False) -> None:
        self._blend(self.overhead_speculative if speculative else self.overhead, batch, max(seconds, 0.0))

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


def _line(points: dict[int, float], x: int) -> float:
    """Least-squares line through (width, seconds), slope clamped at >= 0, evaluated at x."""
    if len(points) == 1:
        return next(iter(points.values()))
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((a - mean_x) ** 2 for a in xs)
    slope = max(sum((a - mean_x) * (b - mean_y) for a, b in zip(xs, ys)) / var, 0.0) if var else 0.0
    return max(mean_y + slope * (x - mean_x), 0.0)


# ----------------------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class RowView:
    """What the policy knows of one row of the step."""

    alpha: float
    fixed: int | None = (
        None  # γ decided outside the policy: forced by the request, an external draft's length, 0 for target rows
    )
    model_drafts: bool = True  # drafting costs draft-model passes (False: target-only rows, external drafts)
    behind: int = 0  # tokens its draft cache lacks (see catchup_columns)
    explore: bool = False  # has not drafted for too long: drafts γ = 1 this step


@dataclass(frozen=True, slots=True)
class Decision:
    gammas: tuple[int, ...]  # per row
    expected_rate: float  # expected tokens per second of the chosen step
    target_rate: float  # expected tokens per second with no row drafting by the policy's choice
    curve: tuple[float, ...]  # for each G in 0..γmax, the best expected rate with longest draft G


def catchup_columns(behind: int) -> int:
    """Width of the catch-up pass a row `behind` tokens behind needs before drafting: all but its
    last token (SpeculativeStep._draft), and none when pass 0 can take them all (up to 2)."""
    return behind - 1 if behind > 2 else 0


def step_rate(rows: Seq[RowView], gammas: Seq[int], costs: CostModel, draft_only: int = 0) -> float:
    """Expected emitted tokens per second of one step with these per-row γ."""
    if not rows and not draft_only:
        return 0.0
    drafting = [i for i, (r, g) in enumerate(zip(rows, gammas)) if g > 0 and r.model_drafts]
    idle = [i for i, (r, g) in enumerate(zip(rows, gammas)) if g == 0 and r.model_drafts]
    passes = max((gammas[i] for i in drafting), default=0)
    if draft_only:
        passes = max(passes, 1)
    k = len(drafting) + draft_only
    seconds = costs.overhead_cost(
        len(rows) + draft_only, speculative=max(gammas, default=0) > 0 or draft_only > 0
    )
    seconds += costs.verify_cost(len(rows), max(gammas, default=0) + 1) if rows else 0.0
    if passes:
        seconds += passes * costs.draft_cost(k)
    debt = max((catchup_columns(rows[i].behind) for i in drafting), default=0)
    if debt:
        seconds += costs.catchup_cost(len(drafting)) * debt
    if idle:
        # Speculative rows that skip drafting fall one more token behind: the catch-up column
        # they will need when they draft again is part of this step's price.
        seconds += costs.catchup_cost(len(idle))
    tokens = sum(expected_tokens(r.alpha, g) for r, g in zip(rows, gammas)) + draft_only * passes
    return tokens / seconds if seconds > 0 else 0.0


def choose_gammas(
    rows: Seq[RowView],
    costs: CostModel,
    max_gamma: int,
    draft_only: int = 0,
    margin: float = 0.0,
    per_row: bool = False,
) -> Decision:
    """The per-row γ that maximise expected tokens per second (see the module docstring). Rows the
    policy may choose for draft only when that beats the no-draft step by more than `margin`
    (relative): a hedge against errors in the estimates where speculation gains almost nothing.
    per_row=False chooses one γ for every row the policy decides (k = all of them); per_row=True
    also chooses how many of them draft (the k with the highest α).

    Equivalent to evaluating `step_rate` for every (G, k) - the tests hold it to that and, for rows
    that lag the draft equally, to a brute-force search over all per-row assignments - but
    incremental in k, so a step costs O(γmax · B) arithmetic, not O(γmax · B²)."""
    n = len(rows)
    base = [r.fixed if r.fixed is not None else (1 if r.explore and r.model_drafts else 0) for r in rows]
    free = sorted(
        (i for i, r in enumerate(rows) if r.fixed is None and r.model_drafts and not r.explore),
        key=lambda i: -rows[i].alpha,
    )
    target_rate = step_rate(rows, base, costs, draft_only)
    best_rate, best_g, best_k = target_rate, 0, 0
    curve = [target_rate]
    if free:
        free_set = set(free)
        fixed = [i for i in range(n) if i not in free_set]
        fixed_tokens = sum(expected_tokens(rows[i].alpha, base[i]) for i in fixed)
        fixed_drafting = [i for i in fixed if base[i] > 0 and rows[i].model_drafts]
        fixed_passes = max((base[i] for i in fixed_drafting), default=0)
        fixed_debt = max((catchup_columns(rows[i].behind) for i in fixed_drafting), default=0)
        fixed_idle = sum(1 for i in fixed if base[i] == 0 and rows[i].model_drafts)
        fixed_width = max((base[i] for i in fixed), default=0)
        # The k that are choices: every one with per-row γ, only k = all free rows without.
        choices = range(1, len(free) + 1) if per_row else range(len(free), len(free) + 1)
        # Independent of G, so computed once: the widest catch-up debt and the idle rows when the
        # first k free rows draft, and the cost lookups (they interpolate) at those sizes.
        debt_at, debt = [fixed_debt], fixed_debt
        for i in free:
            debt = max(debt, catchup_columns(rows[i].behind))
            debt_at.append(debt)
        drafting_at = {k: len(fixed_drafting) + k for k in choices}
        draft_at = {k: costs.draft_cost(drafting_at[k] + draft_only) for k in choices}
        catchup_debt_at = {k: costs.catchup_cost(drafting_at[k]) * debt_at[k] for k in choices}
        idle_at = {k: fixed_idle + len(free) - k for k in choices}
        catchup_idle_at = {k: costs.catchup_cost(idle_at[k]) for k in choices}
        overhead = costs.overhead_cost(n + draft_only, speculative=True)
        # expected_tokens(α, G) = Σ_{j<=G} α^j, grown one power per G instead of recomputed.
        alphas = [rows[i].alpha for i in free]
        powers, extra = alphas, alphas  # α^G and expected_tokens(α, G) - 1 per free row, at G = 1
        for g in range(1, max_gamma + 1):
            if g > 1:
                powers = [p * a for p, a in zip(powers, alphas)]
                extra = [e + p for e, p in zip(extra, powers)]
            passes = max(fixed_passes, g)
            verify = costs.verify_cost(n, max(fixed_width, g) + 1) + overhead
            # Free rows at γ = 0 emit one token each; the first k drafting emit `extra` more.
            tokens_at = list(itertools.accumulate(extra, initial=fixed_tokens + len(free)))
            best_for_g = 0.0
            for k in choices:
                tokens = tokens_at[k]
                seconds = verify + passes * draft_at[k] + catchup_debt_at[k] + catchup_idle_at[k]
                rate = (tokens + draft_only * passes) / seconds
                best_for_g = max(best_for_g, rate)
                if rate > best_rate * (1 + 1e-9):
                    best_rate, best_g, best_k = rate, g, k
            curve.append(best_for_g)
    else:
        curve.extend([0.0] * max_gamma)
    if best_rate < target_rate * (1 + margin):
        best_rate, best_g, best_k = target_rate, 0, 0
    gammas = list(base)
    for i in free[:best_k]:
        gammas[i] = best_g
    return Decision(tuple(gammas), best_rate, target_rate, tuple(curve))
