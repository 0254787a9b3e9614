"""The γ planner: every running row's γ for the next step, and what it learns from each step.

It gathers what the pure policy (`adaptive.choose_gammas`) needs - each row's acceptance estimate,
its catch-up debt, whether the request or an external draft fixes its γ - and keeps the two kinds
of evidence the policy weighs: acceptance (per row and engine-wide) and the measured cost of every
pass (`adaptive.CostModel`). It never touches a model or a cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from specdec.adaptive import AcceptanceEstimate, Decision, RowView, choose_gammas, step_cost
from specdec.config import EngineConfig
from specdec.costs import CostModel, RateCorrection
from specdec.request import Mode
from specdec.sequence import Sequence
from specdec.speculative import RowPlan
from specdec.timing import PassKind, PassTiming


@dataclass(frozen=True, slots=True)
class StepPlan:
    rows: list[RowPlan]  # the target-verified rows, in slot order
    draft_only: list[Sequence]  # rows of draft mode: they ride along in the draft passes
    decision: Decision | None  # the adaptive policy's, when it chose any row's γ
    probe: bool = False  # the policy measured a neighbour of its choice this step

    @property
    def speculative(self) -> bool:
        """Whether the step runs the draft model at all."""
        return bool(self.draft_only) or any(p.gamma > 0 for p in self.rows)


class GammaPlanner:
    def __init__(
        self,
        config: EngineConfig,
        costs: CostModel | None = None,
        gamma_override: Callable[[Sequence], int] | None = None,
        learn_costs: bool = True,
    ):
        """`costs`: a cost model to start from (tests inject a synthetic machine). `gamma_override`:
        fixes the γ of rows the request leaves to the engine (tests use it to force γ schedules).
        `learn_costs=False` keeps the cost model as given instead of updating it from real passes."""
        self.config = config
        self.costs = costs or CostModel()
        self.gamma_override = gamma_override
        self.learn_costs = learn_costs
        self.global_acceptance = AcceptanceEstimate()
        # Realised vs predicted throughput: learnt like the costs (config.probe_every = 0, or
        # learn_costs=False: the cost model alone decides).
        self.correction = RateCorrection() if config.probe_every and learn_costs else None
        self._decided = 0  # steps the policy decided, for the probe schedule
        self._last_choice = 0  # the γ the policy last chose itself (not a probe)

    @property
    def adaptive(self) -> bool:
        """Whether the policy decides γ now: asked for, and the costs are measured."""
        return self.config.adaptive and self.costs.ready

    # ------------------------------------------------------------------------- planning

    def plan(self, running: list[Sequence], external_budget: int | None = None) -> StepPlan:
        """Every running row's γ for this step: fixed by the request, an external draft or the row's
        mode where they say so; chosen by the adaptive policy (or the default) otherwise.
        `external_budget`: external draft tokens the step may verify in all (None: no limit
        beyond max_external_draft per row); rows past it run as if they had none this step."""
        config = self.config
        budget = external_budget if external_budget is not None else float("inf")
        draft_only = [s for s in running if s.mode is Mode.DRAFT]
        # In slot order: consecutive slots make the batch's cache reads views (batching.make_batch).
        rows = sorted((s for s in running if s.mode is not Mode.DRAFT), key=lambda s: s.slot)
        # The verify pass pads every row to its widest, so one row's chunk costs its width in every
        # row: a chunk is held to the budget's share per row, the bound a prefill pass keeps too.
        share = budget // max(len(rows), 1) - 1
        views, chunks = [], []
        for seq in rows:
            room = seq.remaining - 1  # a step emits up to γ + 1 tokens
            take = max(int(min(config.max_external_draft, room, budget, share)), 0) if room > 0 else 0
            chunk = seq.external_pending[:take]
            budget -= len(chunk)
            chunks.append(chunk)
            if room <= 0 or (seq.mode is Mode.TARGET and not chunk):
                views.append(RowView(0.0, fixed=0, model_drafts=False))
            elif chunk:
                views.append(RowView(0.0, fixed=len(chunk), model_drafts=False))
            else:
                fixed = seq.request.num_speculative_tokens or None
                if fixed is None and self.gamma_override is not None:
                    fixed = self.gamma_override(seq)
                if fixed is None and not self.adaptive:
                    fixed = config.default_gamma
                views.append(
                    RowView(
                        alpha=self._alpha(seq),
                        fixed=None if fixed is None else min(fixed, room),
                        behind=len(seq.tokens) - seq.draft_len,
                        explore=seq.steps_idle >= config.explore_every,
                    )
                )
        decision, probe = None, None
        if any(v.fixed is None for v in views):
            batch = len(rows) + len(draft_only)
            correction = self.correction.factors(batch, config.max_gamma) if self.correction else None
            probe = self._probe()
            if (probe or any(v.explore for v in views)) and self._hopeless(
                views, rows, draft_only, correction
            ):
                # Exploring and probing keep the option of speculating open; where it could not pay
                # even at optimistic acceptance, they only cost, so this step runs without them.
                views = [replace(v, explore=False) for v in views]
                probe = None
            decision = self._choose(views, len(draft_only), correction, probe)
            gammas = decision.gammas
        else:
            gammas = tuple(v.fixed or 0 for v in views)
        plans = []
        for seq, gamma, chunk in zip(rows, gammas, chunks):
            room = max(seq.remaining - 1, 0)
            if chunk:
                params = seq.request.params
                scored = seq.request.external_draft_from_draft and not params.greedy
                plans.append(RowPlan(seq, len(chunk), chunk, external_q=scored))
            else:
                plans.append(RowPlan(seq, min(gamma, room)))
        return StepPlan(plans, draft_only, decision, probe is not None)

    def _hopeless(
        self,
        views: list[RowView],
        rows: list[Sequence],
        draft_only: list[Sequence],
        correction: tuple[float, ...] | None,
    ) -> bool:
        """Whether the policy would keep every free row from drafting even if each accepted at its
        optimistic α (`AcceptanceEstimate.upper`): then nothing exploration or a probe could learn
        would change the choice at this batch size."""
        # Old evidence relaxes toward the engine-wide estimate, or the configured prior where that
        # is higher: a row of a draft found poor everywhere is not judged by that estimate alone.
        prior = max(
            self.config.acceptance_prior, self.global_acceptance.value(self.config.acceptance_prior, 4.0)
        )
        optimistic = [
            # The catch-up debt stays in the price: exploring pays it, so the longer a row has been
            # idle the better its prospects must be to be looked at again - in a long request it
            # may never be (the price of never paying catch-ups where speculation cannot pay).
            replace(
                v,
                explore=False,
                alpha=seq.acceptance.upper(prior, 4.0, self.config.acceptance_decay**seq.steps_idle),
            )
            if v.fixed is None and v.model_drafts
            else v
            for v, seq in zip(views, rows)
        ]
        decision = self._choose(optimistic, len(draft_only), correction)
        if decision.policy_gamma == 0:
            return True
        # The policy prices a plain step with the catch-up its idle rows would owe on drafting
        # again; were the gate shut they never would, so here the plain step costs what it takes.
        base = [v.fixed or 0 for v in optimistic]
        tokens, seconds, _deferred = step_cost(optimistic, base, self.costs, len(draft_only))
        longest = max(base, default=0)
        factor = correction[longest] if correction is not None and longest < len(correction) else 1.0
        plain = tokens / seconds * factor if seconds > 0 else 0.0
        return decision.expected_rate <= plain * (1 + self.config.speculation_margin)

    def _choose(
        self,
        views: list[RowView],
        draft_only: int,
        correction: tuple[float, ...] | None,
        probe: int | None = None,
    ) -> Decision:
        config = self.config
        return choose_gammas(
            views,
            self.costs,
            config.max_gamma,
            draft_only,
            config.speculation_margin,
            config.per_row_gamma,
            correction,
            probe,
        )

    def _probe(self) -> int | None:
        """The longest draft to measure this step instead of choosing, or None (most steps)."""
        if self.correction is None:
            return None
        self._decided += 1
        if self._decided % self.config.probe_every:
            return None
        # Alternately one above and one below the last choice (within 0..γmax).
        up = (self._decided // self.config.probe_every) % 2 == 0
        g = self._last_choice + (1 if up else -1)
        if not 0 <= g <= self.config.max_gamma:
            g = self._last_choice - (1 if up else -1)
        return min(max(g, 0), self.config.max_gamma)

    def _alpha(self, seq: Sequence) -> float:
        prior = self.global_acceptance.value(self.config.acceptance_prior, prior_weight=4.0)
        return seq.acceptance.value(prior, prior_weight=4.0)

    # ------------------------------------------------------------------------- learning

    def observe_acceptance(self, seq: Sequence, gamma: int, accepted: int, external: bool) -> None:
        """A speculative row's verify: `accepted` of `gamma` drafts (external drafts say nothing
        about the draft model, and a row that did not draft counts an idle step)."""
        if seq.mode is not Mode.SPECULATIVE:
            return
        if gamma > 0 and not external:
            seq.acceptance.observe(gamma, accepted, self.config.acceptance_decay)
            self.global_acceptance.observe(gamma, accepted, 0.99)
            seq.steps_idle = 0
        else:
            seq.steps_idle += 1

    def observe_costs(self, plan: StepPlan, timings: list[PassTiming], step_seconds: float) -> None:
        """A step's pass timings, and what the rest of the step (planning, batching, the sync,
        commit, detokenising) cost: part of every option's price, it favours amortising it over
        longer drafts. And how long the step took against what the policy predicted for it."""
        decision = plan.decision
        if decision is not None:
            if not plan.probe:
                self._last_choice = decision.policy_gamma
            # What ran is what was predicted unless rows near their end had γ cut to their room;
            # only then, and within 0..γmax, does the step say something about its option.
            ran = max((p.gamma for p in plan.rows), default=0)
            if self.correction is not None and ran == decision.longest <= self.config.max_gamma:
                batch = len(plan.rows) + len(plan.draft_only)
                self.correction.observe(batch, ran, decision.predicted_seconds, step_seconds)
        if not self.learn_costs:
            return
        for t in timings:
            if t.kind is PassKind.VERIFY:
                # The policy chooses among widths up to γmax + 1; a pass over a long external draft
                # or a deferred prompt chunk would only pull that curve's level about.
                if t.width <= self.config.max_gamma + 1:
                    self.costs.observe_verify(t.batch, t.width, t.seconds)
            elif t.kind is PassKind.DRAFT:
                self.costs.observe_draft(t.batch, t.seconds)
            elif t.kind is PassKind.CATCHUP:
                self.costs.observe_catchup(t.batch, t.width, t.seconds)
        passes = sum(t.seconds for t in timings)
        self.costs.observe_overhead(
            len(plan.rows) + len(plan.draft_only), step_seconds - passes, plan.speculative, step_seconds
        )

    def calibrate(self, timings: list[PassTiming]) -> None:
        """Start-up measurements (`ModelRunner.warm_up`) as the cost model's baselines."""
        verify: dict[int, dict[int, float]] = {}
        for t in timings:
            if t.kind is PassKind.VERIFY:
                verify.setdefault(t.batch, {})[t.width] = t.seconds
            else:
                self.costs.set_baseline(t.kind, t.batch, t.width, t.seconds)
        for batch, by_width in verify.items():
            self.costs.set_verify_baseline(batch, by_width)
