"""Adaptive γ when its pass timings lie: a simulated machine whose true costs the planner never
sees - only timings scaled by a bias (another process on the cores, a pass that runs faster alone
than in traffic) and multiplicative noise - while the realised step times follow the truth.

The planner must still run at least as fast as target alone and within 10% of the best fixed γ at
batch 1, 4 and 16, by correcting its predictions from realised step times; with that correction
switched off, the same biases make it miss (the negative control: the test can fail). A sweep of
honest machines checks the same bounds, up to the one-off cost of learning that no γ pays."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest

from specdec.adaptive import RowView, catchup_columns, step_cost
from specdec.config import EngineConfig
from specdec.planner import GammaPlanner
from specdec.request import Mode, Request
from specdec.sampling import SamplingParams
from specdec.sequence import Sequence
from specdec.testing import synthetic_costs
from specdec.timing import PassKind, PassTiming

CONFIG = EngineConfig(max_batch_size=16, max_gamma=6, warmup=False)
STEPS = 1500


class Machine:
    """The true costs (synthetic_costs), what the planner is shown of them, and per-row acceptance."""

    def __init__(self, costs, alphas, draft_bias=1.0, verify_bias=1.0, noise=0.0, seed=0):
        self.costs, self.alphas = costs, alphas
        self.draft_bias, self.verify_bias, self.noise = draft_bias, verify_bias, noise
        self.rng = random.Random(seed)

    def _shown(self, seconds: float, bias: float) -> float:
        return seconds * bias * self.rng.lognormvariate(0.0, self.noise)

    def warm_up(self) -> list[PassTiming]:
        """As ModelRunner.warm_up reports: the fastest of three runs of every pass."""
        best: dict[tuple, PassTiming] = {}
        for _ in range(3):
            for t in self._warm_up_once():
                key = (t.kind, t.batch, t.width)
                if key not in best or t.seconds < best[key].seconds:
                    best[key] = t
        return list(best.values())

    def _warm_up_once(self) -> list[PassTiming]:
        out = []
        for b in (1, 2, 4, 8, 16):
            out.append(
                PassTiming(PassKind.DRAFT, b, 1, self._shown(self.costs.draft_cost(b), self.draft_bias))
            )
            for w in range(1, CONFIG.max_gamma + 2):
                out.append(
                    PassTiming(
                        PassKind.VERIFY, b, w, self._shown(self.costs.verify_cost(b, w), self.verify_bias)
                    )
                )
        return out

    def run(self, planner: GammaPlanner, seqs: list[Sequence], steps: int = STEPS) -> float:
        """Tokens per true second over `steps` steps."""
        tokens = seconds = 0.0
        for _ in range(steps):
            plan = planner.plan(seqs)
            gammas = [p.gamma for p in plan.rows]
            # The truth pays catch-up when a row drafts again (its `behind`), not ahead of time.
            truth = [
                RowView(a, behind=len(s.tokens) - s.draft_len, model_drafts=g > 0)
                for a, s, g in zip(self.alphas, seqs, gammas)
            ]
            _tokens, step_seconds, _deferred = step_cost(truth, gammas, self.costs)  # as the step takes
            longest, drafting = max(gammas), sum(g > 0 for g in gammas)
            timings = [
                PassTiming(
                    PassKind.VERIFY,
                    len(seqs),
                    longest + 1,
                    self._shown(self.costs.verify_cost(len(seqs), longest + 1), self.verify_bias),
                )
            ]
            timings += [
                PassTiming(
                    PassKind.DRAFT, drafting, 1, self._shown(self.costs.draft_cost(drafting), self.draft_bias)
                )
            ] * longest
            debt = max((catchup_columns(r.behind) for r, g in zip(truth, gammas) if g), default=0)
            if debt:  # the catch-up pass, timed as the engine times it
                shown = self._shown(self.costs.catchup_cost(drafting) * debt, self.draft_bias)
                timings.append(PassTiming(PassKind.CATCHUP, drafting, debt, shown))
            emitted = 0
            for seq, alpha, g in zip(seqs, self.alphas, gammas):
                accepted = 0
                while accepted < g and self.rng.random() < alpha:
                    accepted += 1
                emitted += accepted + 1
                seq.tokens.extend([7] * (accepted + 1))
                if g:  # the draft has all but the last one or two tokens (see speculative.py)
                    seq.draft_len = len(seq.tokens) - (2 if accepted == g else 1)
                planner.observe_acceptance(seq, g, accepted, external=False)
            planner.observe_costs(plan, timings, step_seconds * self.rng.lognormvariate(0.0, 0.05))
            tokens += emitted
            seconds += step_seconds
        return tokens / seconds


def _rows(batch: int) -> list[Sequence]:
    request = Request(prompt_ids=[1], params=SamplingParams(max_new_tokens=10**9))
    stopper = SimpleNamespace(max_total_tokens=10**9)
    return [
        Sequence(
            request=request,
            handle=i,
            request_id=str(i),
            mode=Mode.SPECULATIVE,
            slot=i,
            seed=i,
            stopper=stopper,
            tokens=[1],
            num_prompt=1,
            timing=None,
            draft_len=1,
        )
        for i in range(batch)
    ]


def _throughput(machine_args: dict, batch: int, gamma: int | None, config=CONFIG, steps=STEPS) -> float:
    machine = Machine(**machine_args)
    fixed = None if gamma is None else (lambda seq: gamma)
    planner = GammaPlanner(config, gamma_override=fixed)
    planner.calibrate(machine.warm_up())
    return machine.run(planner, _rows(batch), steps)


# name -> (batch, true machine and what the planner is shown of it)
SCENARIOS = {
    # Drafts look 5x cheaper than they are: the model overrates long drafts. (At 3x, the measured
    # verify curve alone keeps the uncorrected model within 10% of the best γ: no negative control.)
    "b1-draft-looks-cheap": (1, dict(draft_bias=0.2, noise=0.3,
        costs=synthetic_costs(draft=0.25, verify_base=1.0, verify_per_token=0.05), alphas=[0.7])),
    # Drafts look 3x dearer: the model keeps speculation off where γ = 1-2 pays (the B = 4).
    "b4-draft-looks-dear": (4, dict(draft_bias=3.0, noise=0.3,
        costs=synthetic_costs(draft=0.1, verify_base=1.0, verify_per_token=0.03), alphas=[0.75, 0.7, 0.65, 0.8])),
    # Verification looks cheap at width: the model overrates long drafts at a big batch.
    "b16-verify-looks-flat": (16, dict(verify_bias=0.5, draft_bias=1.5, noise=0.5,
        costs=synthetic_costs(draft=0.15, verify_base=1.0, verify_per_token=0.02), alphas=[0.6] * 16)),
    # Pure noise, no bias: σ = 0.7 on every timing.
    "b4-noise": (4, dict(noise=0.7,
        costs=synthetic_costs(draft=0.2, verify_base=1.0, verify_per_token=0.04), alphas=[0.7] * 4)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_adaptive_beats_target_alone_and_nears_the_best_fixed_gamma_whatever_the_timings(name):
    batch, machine = SCENARIOS[name]
    fixed = {g: _throughput(machine, batch, g) for g in range(CONFIG.max_gamma + 1)}
    adaptive = _throughput(machine, batch, None)
    best = max(fixed.values())
    report = f"adaptive {adaptive:.3f}, fixed " + ", ".join(f"{g}: {r:.3f}" for g, r in fixed.items())
    assert adaptive >= fixed[0], report
    assert adaptive >= 0.9 * best, report


def test_without_the_correction_the_same_biases_mislead_it():
    """The negative control: trusting the biased timings alone misses the mark."""
    uncorrected = dataclasses.replace(CONFIG, probe_every=0)
    missed = []
    for name in ("b1-draft-looks-cheap", "b4-draft-looks-dear"):
        batch, machine = SCENARIOS[name]
        best = max(_throughput(machine, batch, g) for g in range(CONFIG.max_gamma + 1))
        missed.append(_throughput(machine, batch, None, uncorrected) < 0.9 * best)
    assert all(missed)


# Machines from where speculation pays well to where no γ can (a draft that costs half a target
# pass and accepts half its tokens; any draft at batch 16 when verification grows with width).
SWEEP = [
    (batch, draft, per_token, alpha)
    for batch in (1, 4, 16)
    for draft in (0.05, 0.2, 0.5)
    for per_token in ((0.01, 0.05) if batch < 16 else (0.05,))
    for alpha in (0.5, 0.8)
]
# Where no γ pays, adaptive γ still explores at first, to learn so (the prior says α = 0.5); over
# 600 steps that costs up to 1.5% of target alone (0.996 after 2000 steps: it does not recur).
LEARNING = 0.985


def _honest(batch, draft, per_token, alpha):
    return dict(noise=0.1, costs=synthetic_costs(draft=draft, verify_base=1.0, verify_per_token=per_token),
                alphas=[alpha] * batch)  # fmt: skip


@pytest.mark.parametrize("batch,draft,per_token,alpha", SWEEP)
def test_with_honest_timings_adaptive_is_never_below_target_alone(batch, draft, per_token, alpha):
    """No bias, mild noise (the reviewer's counter-example to the scenarios above: honest timings,
    expensive draft)."""
    machine = _honest(batch, draft, per_token, alpha)
    fixed = {g: _throughput(machine, batch, g, steps=600) for g in range(CONFIG.max_gamma + 1)}
    adaptive = _throughput(machine, batch, None, steps=600)
    report = f"adaptive {adaptive:.3f}, fixed " + ", ".join(f"{g}: {r:.3f}" for g, r in fixed.items())
    assert adaptive >= LEARNING * fixed[0] and adaptive >= 0.9 * max(fixed.values()), report


def test_without_the_hopeless_gate_exploration_costs_where_no_gamma_pays(monkeypatch):
    """The negative control of the gate (GammaPlanner._hopeless): rows that explore and probes that
    measure where speculation cannot pay, even at optimistic acceptance, cost 5-15% here."""
    machine = _honest(16, 0.5, 0.05, 0.5)
    target_alone = _throughput(machine, 16, 0, steps=600)
    assert _throughput(machine, 16, None, steps=600) >= LEARNING * target_alone
    monkeypatch.setattr(GammaPlanner, "_hopeless", lambda self, *args: False)
    assert _throughput(machine, 16, None, steps=600) < 0.95 * target_alone
