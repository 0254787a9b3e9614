"""Adaptive speculation length: choose γ per step from measured costs and acceptance estimates.

Estimator (per row). Acceptance is tracked per drafted position: a verify with γ drafts of which a
were accepted observes min(a + 1, γ) positions (those after the first rejection were never tested)
and a successes. Each row keeps exponentially decayed sums S (successes) and N (observations),
decayed by `decay` per observed position, and estimates

    α = (S + n0 · α_global) / (N + n0)

so a new row starts at the engine-wide estimate α_global (itself the same kind of decayed ratio
over all rows) and moves to its own evidence as it accumulates.

Costs (per engine): `specdec.costs` - d(k) a draft pass over k rows, v(B, w) a target pass, c(k)
a catch-up column, o(B) the rest of a step - and a correction of the predicted rate per longest
draft G from realised throughput.

Policy (per step, pure). A step's cost is set by its longest draft G (all drafting rows run G draft
passes; the verify is G + 1 wide) and by how many rows draft (k). By default one γ serves the whole
batch (k = 0 or all rows); with per-row γ, for given (G, k) the rows that draft are the k with the
highest acceptance - the best choice when the rows lag the draft equally, a heuristic when their
catch-up debts differ. The policy evaluates these (G, k), G ∈ {0..γmax}, and picks the one that
maximises

    expected tokens / expected seconds
    = (Σ_drafting (1 - α^(G+1)) / (1 - α) + #non-drafting) / (G · d(k) + catch-up + v(B, G + 1) + o(B))

times the correction for G (1 until realised steps at G have been seen).

G = 0 is a plain target step; its price includes the catch-up debt it adds (one more column of
the catch-up pass that feeds the draft its missing tokens when speculation resumes). Speculation
must beat it by a small margin (EngineConfig.speculation_margin): where the expected gain is
within the estimates' error, the plain step is the safe choice. Forced rows
(num_speculative_tokens) always draft their own γ. Exploration: a row that has not drafted for
`explore_every` steps drafts γ = 1 once, so its α does not go stale while the policy keeps it out -
unless speculating could not pay even at an optimistic α (the estimate plus two standard errors,
its evidence discounted by how long the row has been idle; `GammaPlanner._hopeless`): then the
exploration, and a probe of a longer draft, would only cost (at batch 16 on a CPU, where
verification grows with its width, they cost 5-15%: the catch-up of every row's missed tokens).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from specdec.costs import CostModel


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

    def upper(self, prior: float, prior_weight: float, staleness: float = 1.0, z: float = 2.0) -> float:
        """An optimistic α: the estimate plus z standard errors of a ratio, over the evidence
        discounted by `staleness` (in (0, 1]): old evidence says less, so the estimate of a row kept
        idle relaxes to `prior` and its spread widens, and in time it looks worth a look again."""
        trials = self.trials * staleness + prior_weight
        alpha = (self.successes * staleness + prior_weight * prior) / trials
        return min(1.0, alpha + z * (alpha * (1.0 - alpha) / trials) ** 0.5)


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
    expected_rate: float  # expected tokens per second of the chosen step (corrected)
    target_rate: float  # expected tokens per second with no row drafting by the policy's choice (corrected)
    curve: tuple[float, ...]  # for each G in 0..γmax, the best expected rate with longest draft G (corrected)
    longest: int = 0  # the chosen step's longest draft G (forced and external rows included)
    policy_gamma: int = 0  # the γ the policy itself gave its rows (0: it kept them from drafting)
    # The cost model's seconds for the chosen step as it will be timed: the catch-up column its
    # idle rows add is priced in, but paid by a later step, so it is not in these.
    predicted_seconds: float = 0.0


def catchup_columns(behind: int) -> int:
    """Width of the catch-up pass a row `behind` tokens behind needs before drafting: all but its
    last token (SpeculativeStep._draft), and none when pass 0 can take them all (up to 2)."""
    return behind - 1 if behind > 2 else 0


def step_rate(rows: Seq[RowView], gammas: Seq[int], costs: CostModel, draft_only: int = 0) -> float:
    """Expected emitted tokens per second of one step with these per-row γ, as the policy prices
    it (the catch-up its idle rows add included)."""
    tokens, timed, deferred = step_cost(rows, gammas, costs, draft_only)
    seconds = timed + deferred
    return tokens / seconds if seconds > 0 else 0.0


def step_cost(
    rows: Seq[RowView], gammas: Seq[int], costs: CostModel, draft_only: int = 0
) -> tuple[float, float, float]:
    """(expected tokens, seconds the step takes, seconds it defers): speculative rows that skip
    drafting fall one more token behind, and the catch-up column they will need when they draft
    again is part of this step's price, but paid by a later step."""
    if not rows and not draft_only:
        return 0.0, 0.0, 0.0
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
    deferred = costs.catchup_cost(len(idle)) if idle else 0.0
    tokens = sum(expected_tokens(r.alpha, g) for r, g in zip(rows, gammas)) + draft_only * passes
    return tokens, seconds, deferred


def choose_gammas(
    rows: Seq[RowView],
    costs: CostModel,
    max_gamma: int,
    draft_only: int = 0,
    margin: float = 0.0,
    per_row: bool = False,
    correction: Seq[float] | None = None,
    probe: int | None = None,
) -> Decision:
    """The per-row γ that maximise expected tokens per second (see the module docstring). Rows the
    policy may choose for draft only when that beats the no-draft step by more than `margin`
    (relative): a hedge against errors in the estimates where speculation gains almost nothing.
    per_row=False chooses one γ for every row the policy decides (k = all of them); per_row=True
    also chooses how many of them draft (the k with the highest α). `correction[G]` scales the
    predicted rate of every step whose longest draft is G. `probe`: take the best option whose
    longest draft is this G, whatever the others promise (the planner measures neighbours so).

    Equivalent to evaluating `step_rate` for every (G, k) - the tests hold it to that and, for rows
    that lag the draft equally, to a brute-force search over all per-row assignments - but
    incremental in k, so a step costs O(γmax · B) arithmetic, not O(γmax · B²)."""
    n = len(rows)
    base = [r.fixed if r.fixed is not None else (1 if r.explore and r.model_drafts else 0) for r in rows]
    free = sorted(
        (i for i, r in enumerate(rows) if r.fixed is None and r.model_drafts and not r.explore),
        key=lambda i: -rows[i].alpha,
    )
    fixed_width = max(base, default=0)

    def factor(longest: int) -> float:
        # Steps longer than γmax (a long external draft beside) are not corrected.
        return correction[longest] if correction is not None and longest < len(correction) else 1.0

    t_tokens, t_timed, t_deferred = step_cost(rows, base, costs, draft_only)
    target_rate = (t_tokens / (t_timed + t_deferred) if t_timed + t_deferred > 0 else 0.0) * factor(
        fixed_width
    )
    # (corrected rate, G, k, seconds the step will take, longest) of the best option so far: no
    # free row drafting.
    target = (target_rate, 0, 0, t_timed, fixed_width)
    best = target
    probing = probe is not None and probe > 0 and bool(free)
    if probing:
        best = (0.0, 0, 0, 0.0, fixed_width)
    curve = [target_rate]
    if free:
        free_set = set(free)
        fixed = [i for i in range(n) if i not in free_set]
        fixed_tokens = sum(expected_tokens(rows[i].alpha, base[i]) for i in fixed)
        fixed_drafting = [i for i in fixed if base[i] > 0 and rows[i].model_drafts]
        fixed_passes = max((base[i] for i in fixed_drafting), default=0)
        fixed_debt = max((catchup_columns(rows[i].behind) for i in fixed_drafting), default=0)
        fixed_idle = sum(1 for i in fixed if base[i] == 0 and rows[i].model_drafts)
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
            longest = max(fixed_width, g)
            verify = costs.verify_cost(n, longest + 1) + overhead
            # Free rows at γ = 0 emit one token each; the first k drafting emit `extra` more.
            tokens_at = list(itertools.accumulate(extra, initial=fixed_tokens + len(free)))
            best_for_g = 0.0
            for k in choices:
                tokens = tokens_at[k]
                timed = verify + passes * draft_at[k] + catchup_debt_at[k]
                rate = (tokens + draft_only * passes) / (timed + catchup_idle_at[k]) * factor(longest)
                best_for_g = max(best_for_g, rate)
                if (not probing or g == probe) and rate > best[0] * (1 + 1e-9):
                    best = (rate, g, k, timed, longest)
            curve.append(best_for_g)
    else:
        curve.extend([0.0] * max_gamma)
    if probe == 0 or (not probing and best[0] < target_rate * (1 + margin)):
        best = target
    rate, best_g, best_k, timed, longest = best
    gammas = list(base)
    for i in free[:best_k]:
        gammas[i] = best_g
    return Decision(tuple(gammas), rate, target_rate, tuple(curve), longest, best_g if best_k else 0, timed)
