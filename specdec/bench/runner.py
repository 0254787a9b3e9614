"""`specdec bench`: tokens/s of target, draft, speculative at each γ and adaptive, and Hugging Face
generation (alone and assisted), side by side in one process on the same prompts.

Every configuration has an Engine of its own (the models are loaded once and shared) and is
observed through the step reports `Engine.generate` hands to `on_step`. Every configuration runs
once as warm-up (excluded), then `repeats` times; tokens/s is generated tokens over the time all
slots are busy, and the report gives the median. Our engine runs batch size × `waves` requests per
run with batch size in flight (continuous batching, as served), their output lengths spread around
`new_tokens` (`length_spread`, the same draws for every configuration); Hugging Face `generate()`
runs one static batch of `new_tokens`-long outputs, which is already its steady state. What is
derived from the measurements - acceptance, cost ratio, theoretical speedup, bandwidth - is in
`specdec.bench.report`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from specdec.config import EngineConfig
from specdec.engine import Engine
from specdec.grammar import Constraint
from specdec.models.loader import LoadedModel
from specdec.request import Mode, Request
from specdec.sampling import SamplingParams
from specdec.scheduler import StepReport
from specdec.timing import PassKind

# One engine configuration of the bench: (label, mode of its requests, γ: an int or "adaptive...",
# the quantization of its pair: a key of Bench's `pairs`, "none" for the models as loaded). A label
# starting with CONSTRAINED ("json target", "json speculative") runs its requests under the Bench's
# constraint (`specdec bench --json-schema`).
Config = tuple[str, Mode, "int | str", str]
CONSTRAINED = "json "


def constrained(label: str) -> bool:
    return label.startswith(CONSTRAINED)


# A baseline outside our engine (Hugging Face generate(), llama.cpp): its label, and one timed run
# at a batch size returning tokens/s.
Anchor = tuple[str, Callable[[int], float]]


@dataclass
class BenchSettings:
    batch_sizes: list[int]
    gammas: list[int | str]  # ints (0 = target alone), "adaptive" and "adaptive-per-row"
    prompt_len: int = 64
    new_tokens: int = 128
    repeats: int = 3
    # Requests per run = batch size × waves, `batch size` in flight at a time (a closed loop): a
    # finished row's slot is refilled at once, as a busy server's would be. One wave would be a
    # static batch, whose rows finish at different steps under speculation and leave a tail of
    # under-filled steps that no server with continuous batching has.
    waves: int = 2
    # Each request's output length is drawn from new_tokens × [1 - spread, 1 + spread] (seeded, the
    # same draws for every configuration). 0: every output is new_tokens long, and then target-alone
    # rows run in lockstep - finishing together, prefilled as one batch, all at one position - which
    # no server with real traffic sees and speculation (rows advance unevenly) cannot match.
    length_spread: float = 0.5
    # Answers end at their end of sequence (at most their drawn length), as a chat server's do:
    # the acceptance then is that of real answers, not of text past the end of turn, which no
    # draft is trained on. Off by default: fixed lengths keep the configurations' work equal.
    respect_eos: bool = False
    hf: bool = True
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


@dataclass
class Row:
    """One configuration's measurements."""

    mode: str  # target | draft | speculative | hf-target | hf-assisted, "int8 target" when quantized
    gamma: int | str | None
    batch_size: int
    tokens_per_second: float  # median over repeats
    samples: list[float]
    acceptance: float | None = None  # per tested draft position
    mean_accepted_length: float | None = None
    accepted_by_position: list[float] = field(default_factory=list)  # rate per position
    gamma_histogram: dict[int, int] = field(default_factory=dict)  # adaptive: γ chosen per row-step
    extra: dict[str, Any] = field(default_factory=dict)
    quantization: str = "none"  # of the pair: "int8", or "int8:none" (target:draft) when they differ


def per_position_alpha(accepted_by_position: list[int], verify_steps: int, gamma: int) -> float:
    """Per-token acceptance from fixed-γ counts: position i was tested in the verifies that accepted
    all of 0..i-1, and passed in accepted_by_position[i] of them."""
    trials = verify_steps + sum(accepted_by_position[: max(gamma - 1, 0)])
    return sum(accepted_by_position[:gamma]) / trials if trials else 0.0


def output_lengths(settings: BenchSettings, count: int) -> list[int]:
    """The output length of each of `count` requests: new_tokens, or with a spread, seeded uniform
    draws around it (mean new_tokens)."""
    n, spread = settings.new_tokens, settings.length_spread
    if spread <= 0:
        return [n] * count
    rnd = random.Random(settings.seed)
    return [max(1, round(n * (1 + spread * rnd.uniform(-1.0, 1.0)))) for _ in range(count)]


def config_key(label: str, gamma: int | str, quantization: str = "none") -> str:
    return f"{label}:{gamma}" if quantization == "none" else f"{quantization} {label}:{gamma}"


def mode_label(label: str, quantization: str) -> str:
    """The row's mode: the label, prefixed by the quantization when the models are quantized."""
    return label if quantization == "none" else f"{quantization} {label}"


class Bench:
    def __init__(
        self,
        pairs: dict[str, tuple[LoadedModel, LoadedModel]],
        settings: BenchSettings,
        prompts: list[list[int]],
        configs: list[Config],
        progress: Any = None,
        constraint: Constraint | None = None,  # the "json ..." configurations' (and a validator of it)
        validator: Any = None,
    ):
        self.settings = settings
        self.constraint = constraint
        self.validator = validator
        self.prompts = prompts
        self.configs = configs
        self.progress = progress
        max_batch = max(settings.batch_sizes)
        self.output_lengths = output_lengths(settings, max(settings.batch_sizes) * settings.waves)
        base = EngineConfig(
            max_batch_size=max_batch,
            max_queue=max_batch,
            max_context=max(len(p) for p in self.prompts) + max(self.output_lengths) + 1,
            max_gamma=max([8, *[g for g in settings.gammas if isinstance(g, int)]]),
            device=settings.device,
            dtype=settings.dtype,
        )
        # One engine per configuration, as each would be served; only the adaptive ones consult
        # the cost model, so only they pay for the start-up measurement of it.
        self.engines: dict[str, Engine] = {}
        for label, _, gamma, quant in configs:
            adaptive = isinstance(gamma, str)
            config = EngineConfig(
                **{**_fields(base), "warmup": adaptive, "per_row_gamma": gamma == "adaptive-per-row"}
            )
            target, draft = pairs[quant]
            self.engines[config_key(label, gamma, quant)] = Engine(target=target, draft=draft, config=config)
        self.rows: list[Row] = []

    # --------------------------------------------------------------------------- our engine

    def _requests(
        self, engine: Engine, count: int, mode: Mode, gamma: int | str, label: str
    ) -> list[Request]:
        """Free requests run to their drawn lengths (ignore_eos) unless `respect_eos`; constrained
        ones end where the grammar does (it ends on the end-of-sequence token), at most at their
        drawn lengths."""
        forced = gamma if isinstance(gamma, int) else 0  # 0: the adaptive policy decides
        constraint = self.constraint if constrained(label) else None
        return [
            engine.make_request(
                self.prompts[i % len(self.prompts)],
                SamplingParams(
                    max_new_tokens=self.output_lengths[i],
                    ignore_eos=constraint is None and not self.settings.respect_eos,
                ),
                mode,
                forced,
                constraint=constraint,
            )
            for i in range(count)
        ]

    def _engine_once(
        self, engine: Engine, batch: int, mode: Mode, gamma: int | str, label: str
    ) -> tuple[float, float, list, dict[int, int]]:
        """One timed run: tokens/s while all `batch` slots are busy, tokens/s of the whole run, the
        results, and the γ each verified row ran with.

        The first is the reported figure: once the last request has started, rows finish one by
        one and the batch drains; with speculation they finish at different steps, and that
        draining tail belongs to the finite workload, not to a server that keeps its slots full."""
        decisions: dict[int, int] = {}
        busy = [0.0, 0]  # seconds and tokens of the steps that began with every slot occupied
        draining = False

        def observe(report: StepReport) -> None:
            nonlocal draining
            for g in report.gammas:
                decisions[g] = decisions.get(g, 0) + 1
            draining = draining or report.in_flight < batch
            if not draining:
                busy[0] += report.seconds
                busy[1] += sum(len(o.new_token_ids) for o in report.outputs)

        requests = self._requests(engine, batch * self.settings.waves, mode, gamma, label)
        t0 = time.perf_counter()
        out = engine.generate(requests, max_concurrency=batch, on_step=observe)
        elapsed = time.perf_counter() - t0
        whole = sum(len(r.token_ids) for r in out) / elapsed
        return (busy[1] / busy[0] if busy[0] > 0 else whole), whole, out, decisions

    def hf_once(self, hf_target: Any, hf_draft: Any | None, batch: int) -> float:
        """One timed transformers generate(): the target alone, or (batch 1) assisted by the draft."""
        device = next(hf_target.parameters()).device
        n = self.settings.new_tokens
        ids = torch.tensor([self.prompts[i % len(self.prompts)] for i in range(batch)], device=device)
        kwargs: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if hf_draft is not None:
            kwargs["assistant_model"] = hf_draft
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - t0)

    def llama_cpp_once(self, anchor: Any, batch: int) -> float:
        """One timed llama.cpp run (batch size 1 only; see bench.llama_cpp) on the first prompt."""
        assert batch == 1, "llama-cpp-python decodes one sequence at a time"
        return anchor.tokens_per_second(self.prompts[0], self.settings.new_tokens)

    def run_batch(self, batch: int, anchors: list[Anchor]) -> None:
        """Every configuration and anchor at this batch size, repeats interleaved (one run of each,
        then the next round), so a drift of the machine during the run hits all of them alike.
        Round 0 is warm-up and excluded."""
        rates: dict[str, list[float]] = {}
        whole_rates: dict[str, list[float]] = {}
        results: dict[str, list] = {}
        decisions: dict[str, dict[int, int]] = {}
        for repeat in range(self.settings.repeats + 1):
            for label, mode, gamma, quant in self.configs:
                key = config_key(label, gamma, quant)
                rate, whole, out, seen = self._engine_once(self.engines[key], batch, mode, gamma, label)
                if repeat:
                    rates.setdefault(key, []).append(rate)
                    whole_rates.setdefault(key, []).append(whole)
                    results.setdefault(key, []).extend(out)
                    for g, count in seen.items():
                        decisions.setdefault(key, {})[g] = decisions.setdefault(key, {}).get(g, 0) + count
                self._tick()
            for label, run_once in anchors:
                rate = run_once(batch)
                if repeat:
                    rates.setdefault(label, []).append(rate)
                self._tick()
        for label, mode, gamma, quant in self.configs:
            key = config_key(label, gamma, quant)
            self._add_engine_row(batch, label, mode, gamma, rates[key], results[key], decisions.get(key, {}))
            self.rows[-1].mode, self.rows[-1].quantization = mode_label(label, quant), quant
            self.rows[-1].extra["whole_run_tokens_per_second"] = round(statistics.median(whole_rates[key]), 2)
            if constrained(label):
                self.rows[-1].extra.update(self._constrained_outcomes(results[key]))
        for label, _ in anchors:
            self.rows.append(
                Row(mode=label, gamma=None, batch_size=batch, tokens_per_second=statistics.median(rates[label]),
                    samples=[round(r, 2) for r in rates[label]])
            )  # fmt: skip

    def _add_engine_row(
        self,
        batch: int,
        label: str,
        mode: Mode,
        gamma: int | str,
        rates: list[float],
        results: list,
        decisions: dict[int, int],
    ) -> None:
        row = Row(mode=label, gamma=gamma if mode is Mode.SPECULATIVE else None, batch_size=batch,
                  tokens_per_second=statistics.median(rates), samples=[round(r, 2) for r in rates])  # fmt: skip
        if mode is Mode.SPECULATIVE:
            steps = sum(r.stats.verify_steps for r in results)
            emitted = sum(r.stats.emitted_by_verify for r in results)
            positions = max((len(r.stats.drafted_by_position) for r in results), default=0)
            acc = [
                sum(
                    r.stats.accepted_by_position[i] if i < len(r.stats.accepted_by_position) else 0
                    for r in results
                )
                for i in range(positions)
            ]
            drafted = [
                sum(
                    r.stats.drafted_by_position[i] if i < len(r.stats.drafted_by_position) else 0
                    for r in results
                )
                for i in range(positions)
            ]
            row.mean_accepted_length = round(emitted / steps, 4) if steps else None
            row.accepted_by_position = [round(a / d, 4) if d else 0.0 for a, d in zip(acc, drafted)]
            if isinstance(gamma, int):
                row.acceptance = round(per_position_alpha(acc, steps, gamma), 4)
            else:
                tested = sum(r.stats.drafted_tokens for r in results)
                row.acceptance = round(sum(acc) / tested, 4) if tested else None
                row.gamma_histogram = dict(sorted(decisions.items()))
        self.rows.append(row)

    def _constrained_outcomes(self, results: list) -> dict[str, Any]:
        """How the constrained answers stand: the share whose constraint is complete and (a JSON
        Schema's) the share that validates, and their mean length - shorter than the free rows'
        drawn lengths, which tokens/s alone does not show."""
        from specdec.router.validators import check_json

        complete = sum(1 for r in results if r.constraint is not None and r.constraint.complete)
        out = {
            "constraint_complete": round(complete / len(results), 4),
            "mean_output_tokens": round(statistics.mean(len(r.token_ids) for r in results), 2),
        }
        if self.validator is not None:
            valid = sum(1 for r in results if check_json(r.text, self.validator).valid)
            out["schema_valid"] = round(valid / len(results), 4)
        return out

    def pass_costs(self, max_gamma: int = 4, rounds: int = 5) -> dict[str, dict[str, float]]:
        """Milliseconds of one pass at batch size 1 for each quantization: the target at width 1
        (a decode) and at every verify width up to γ + 1, and the draft. The quantizations are
        measured in turn, `rounds` times, and the fastest of each kept: a side-by-side figure."""
        best: dict[str, dict[str, float]] = {}
        position = self.settings.prompt_len
        for _ in range(rounds):
            for label, _, gamma, quant in self.configs:
                if label != "target":
                    continue
                engine = self.engines[config_key(label, gamma, quant)]
                for t in engine.runner.measure_pass_costs([1], max_gamma, position, repeats=1):
                    if t.kind is PassKind.CATCHUP:
                        continue
                    name = "draft" if t.kind is PassKind.DRAFT else f"target_width{t.width}"
                    ms = t.seconds * 1e3
                    best.setdefault(quant, {})[name] = round(min(ms, best.get(quant, {}).get(name, ms)), 3)
        return best

    def cost_ratio(self, batch: int, quantization: str | None = None) -> float:
        """c = one draft pass / one width-1 target pass at this batch size, each as measured live by
        the configuration that runs that pass alone (draft alone, target alone), of the pair
        quantized so (default: the first configured). A draft that only speculates (a subset head:
        no draft-alone configuration) is timed by the first speculative configuration, whose draft
        passes are the same passes."""
        quant = quantization or self.configs[0][3]
        ours = [(label, gamma) for label, _, gamma, q in self.configs if q == quant]
        drafting = [c for c in ours if c[0] == "draft"] + [c for c in ours if c[0] == "speculative"]
        draft = self.engines[config_key(*drafting[0], quant)].planner.costs
        target = self.engines[config_key("target", 0, quant)].planner.costs
        return draft.draft_cost(batch) / target.verify_cost(batch, 1)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def plans(
    settings: BenchSettings,
    engine_configs: int,
    with_hf: bool,
    with_assisted: bool,
    with_llama_cpp: bool = False,
) -> int:
    """Number of timed runs (for the progress bar). Assisted generation and llama.cpp run at batch
    size 1 only."""
    per_batch = engine_configs + (1 if with_hf else 0)
    at_one = (int(with_assisted) + int(with_llama_cpp)) if 1 in settings.batch_sizes else 0
    return (settings.repeats + 1) * (per_batch * len(settings.batch_sizes) + at_one)


def _fields(config: EngineConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
