"""`specdec bench`: tokens/s of target, draft, speculative at each γ and adaptive, and Hugging Face
generation (alone and assisted), side by side in one process on the same prompts.

Every configuration runs once as warm-up (excluded), then `repeats` times; tokens/s is generated
tokens over the time all slots are busy, and the report gives the median. Our engine runs batch
size × `waves` requests per run with batch size in flight (continuous batching, as served), their
output lengths spread around `new_tokens` (`length_spread`, the same draws for every
configuration); Hugging Face `generate()` runs one static batch of `new_tokens`-long outputs, which
is already its steady state. Alongside: the measured acceptance α (per tested draft position), the
cost ratio c = draft step / target step from the engine's own pass timings, the theoretical speedup
(1 - α^(γ+1)) / ((1 - α)(γc + 1)) next to the measured one, and for target-alone decode the
achieved memory bandwidth (weights + KV read per step) against a copy bandwidth measured on the
same device.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from specdec.config import EngineConfig
from specdec.engine import Engine
from specdec.models.kv_cache import bytes_per_token
from specdec.models.loader import LoadedModel
from specdec.request import Mode, Request
from specdec.sampling import SamplingParams


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
    hf: bool = True
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


@dataclass
class Row:
    """One configuration's measurements."""

    mode: str  # target | draft | speculative | hf-target | hf-assisted
    gamma: int | str | None
    batch_size: int
    tokens_per_second: float  # median over repeats
    samples: list[float]
    acceptance: float | None = None  # per tested draft position
    mean_accepted_length: float | None = None
    accepted_by_position: list[float] = field(default_factory=list)  # rate per position
    gamma_histogram: dict[int, int] = field(default_factory=dict)  # adaptive: γ chosen per row-step
    extra: dict[str, Any] = field(default_factory=dict)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def _per_position_alpha(accepted_by_position: list[int], verify_steps: int, gamma: int) -> float:
    """Per-token acceptance from fixed-γ counts: position i was tested in the verifies that accepted
    all of 0..i-1, and passed in accepted_by_position[i] of them."""
    trials = verify_steps + sum(accepted_by_position[: max(gamma - 1, 0)])
    return sum(accepted_by_position[:gamma]) / trials if trials else 0.0


def theoretical_speedup(alpha: float, gamma: int, c: float) -> float:
    if gamma == 0:
        return 1.0
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def output_lengths(settings: BenchSettings, count: int) -> list[int]:
    """The output length of each of `count` requests: new_tokens, or with a spread, seeded uniform
    draws around it (mean new_tokens)."""
    n, spread = settings.new_tokens, settings.length_spread
    if spread <= 0:
        return [n] * count
    rnd = random.Random(settings.seed)
    return [max(1, round(n * (1 + spread * rnd.uniform(-1.0, 1.0)))) for _ in range(count)]


class Bench:
    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel,
        settings: BenchSettings,
        prompts: list[list[int]],
        progress: Any = None,
    ):
        self.settings = settings
        self.prompts = prompts
        self.progress = progress
        max_batch = max(settings.batch_sizes)
        self.output_lengths = output_lengths(settings, max(settings.batch_sizes) * settings.waves)
        context = settings.prompt_len + max(self.output_lengths) + 1
        self.engine = Engine(
            target=target,
            draft=draft,
            config=EngineConfig(
                max_batch_size=max_batch,
                max_queue=max_batch,
                max_context=context,
                max_gamma=max([8, *[g for g in settings.gammas if isinstance(g, int)]]),
                device=settings.device,
                dtype=settings.dtype,
            ),
        )
        self.rows: list[Row] = []

    # --------------------------------------------------------------------------- our engine

    def _requests(self, count: int, mode: Mode, gamma: int | str) -> list[Request]:
        forced = gamma if isinstance(gamma, int) else 0  # 0: the adaptive policy decides
        return [
            self.engine.make_request(
                self.prompts[i % len(self.prompts)],
                SamplingParams(max_new_tokens=self.output_lengths[i], ignore_eos=True),
                mode,
                forced,
            )
            for i in range(count)
        ]

    def _engine_once(
        self, batch: int, mode: Mode, gamma: int | str
    ) -> tuple[float, float, list, dict[int, int]]:
        """One timed run: tokens/s while all `batch` slots are busy, tokens/s of the whole run, the
        results, and the γ each verified row ran with.

        The first is the reported figure: once the last request has started, rows finish one by
        one and the batch drains; with speculation they finish at different steps, and that
        draining tail belongs to the finite workload, not to a server that keeps its slots full."""
        decisions: dict[int, int] = {}
        scheduler = self.engine.scheduler
        run, step = scheduler.step_runner.run, scheduler.step
        config = scheduler.config
        busy = [0.0, 0]  # seconds and tokens of the steps that began with every slot occupied
        draining = False

        def recording(plans, draft_only):
            for p in plans:
                decisions[p.gamma] = decisions.get(p.gamma, 0) + 1
            return run(plans, draft_only)

        def timed_step():
            nonlocal draining
            draining = draining or scheduler.num_running + scheduler.num_waiting < batch
            started = time.perf_counter()
            outputs = step()
            if not draining:
                busy[0] += time.perf_counter() - started
                busy[1] += sum(len(o.new_token_ids) for o in outputs)
            return outputs

        requests = self._requests(batch * self.settings.waves, mode, gamma)
        scheduler.step_runner.run, scheduler.step = recording, timed_step
        scheduler.config = dataclasses.replace(config, per_row_gamma=gamma == "adaptive-per-row")
        try:
            t0 = time.perf_counter()
            out = self.engine.generate(requests, max_concurrency=batch)
            elapsed = time.perf_counter() - t0
        finally:
            scheduler.step_runner.run, scheduler.step = run, step
            scheduler.config = config
        whole = sum(len(r.token_ids) for r in out) / elapsed
        return (busy[1] / busy[0] if busy[0] > 0 else whole), whole, out, decisions

    def _hf_once(self, hf_target: Any, hf_draft: Any | None, batch: int) -> float:
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

    def run_batch(
        self, batch: int, configs: list[tuple[str, Mode, int | str]], hf: list[tuple[str, Any, Any]]
    ) -> None:
        """Every configuration at this batch size, repeats interleaved (one run of each, then the
        next round), so a drift of the machine during the run hits all of them alike. Round 0 is
        warm-up and excluded."""
        rates: dict[str, list[float]] = {}
        whole_rates: dict[str, list[float]] = {}
        results: dict[str, list] = {}
        decisions: dict[str, dict[int, int]] = {}
        for repeat in range(self.settings.repeats + 1):
            for label, mode, gamma in configs:
                key = f"{label}:{gamma}"
                rate, whole, out, seen = self._engine_once(batch, mode, gamma)
                if repeat:
                    rates.setdefault(key, []).append(rate)
                    whole_rates.setdefault(key, []).append(whole)
                    results.setdefault(key, []).extend(out)
                    for g, count in seen.items():
                        decisions.setdefault(key, {})[g] = decisions.setdefault(key, {}).get(g, 0) + count
                self._tick()
            for label, hf_target, hf_draft in hf:
                rate = self._hf_once(hf_target, hf_draft, batch)
                if repeat:
                    rates.setdefault(label, []).append(rate)
                self._tick()
        for label, mode, gamma in configs:
            key = f"{label}:{gamma}"
            self._add_engine_row(batch, label, mode, gamma, rates[key], results[key], decisions.get(key, {}))
            self.rows[-1].extra["whole_run_tokens_per_second"] = round(statistics.median(whole_rates[key]), 2)
        for label, _, _ in hf:
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
        row = Row(mode=label, gamma=gamma if label == "speculative" else None, batch_size=batch,
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
                row.acceptance = round(_per_position_alpha(acc, steps, gamma), 4)
            else:
                tested = sum(r.stats.drafted_tokens for r in results)
                row.acceptance = round(sum(acc) / tested, 4) if tested else None
                row.gamma_histogram = dict(sorted(decisions.items()))
        self.rows.append(row)

    def cost_ratio(self, batch: int) -> float:
        costs = self.engine.scheduler.costs
        return costs.draft_cost(batch) / costs.verify_cost(batch, 1)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


def plans(settings: BenchSettings, with_hf: bool, with_assisted: bool) -> int:
    """Number of timed runs (for the progress bar)."""
    per_batch = 2 + sum(1 for g in settings.gammas if g != 0) + (1 if with_hf else 0)
    return (settings.repeats + 1) * (per_batch * len(settings.batch_sizes) + (1 if with_assisted else 0))


def report(
    bench: Bench, target: LoadedModel, draft: LoadedModel, settings: BenchSettings, extra: dict[str, Any]
) -> dict[str, Any]:
    rows = bench.rows
    device = target.device

    def find(mode: str, batch: int, gamma: Any = None) -> Row | None:
        return next(
            (
                r
                for r in rows
                if r.mode == mode and r.batch_size == batch and (gamma is None or r.gamma == gamma)
            ),
            None,
        )

    weights = sum(p.numel() * p.element_size() for p in target.model.parameters())
    kv_per_token = bytes_per_token(target.config, target.dtype)
    copy_bw = copy_bandwidth(device, 2048 if device.type == "cuda" else 256)
    summary = []
    for batch in settings.batch_sizes:
        base = find("target", batch)
        assisted = find("hf-assisted", batch)
        c = bench.cost_ratio(batch)
        mean_context = settings.prompt_len + settings.new_tokens / 2
        bandwidth = (
            (weights + batch * mean_context * kv_per_token) * base.tokens_per_second / batch if base else 0.0
        )
        entry: dict[str, Any] = {
            "batch_size": batch,
            "cost_ratio_c": round(c, 4),
            "target_tokens_per_second": base.tokens_per_second if base else None,
            "target_bandwidth_GBps": round(bandwidth / 1e9, 3),
            "copy_bandwidth_GBps": round(copy_bw / 1e9, 3),
            "bandwidth_fraction": round(bandwidth / copy_bw, 4),
            "modes": {},
        }
        for row in rows:
            if row.batch_size != batch:
                continue
            key = (
                row.mode
                if row.gamma in (None, 0)
                else f"{row.mode}-{row.gamma if isinstance(row.gamma, str) else f'gamma{row.gamma}'}"
            )
            item: dict[str, Any] = {"tokens_per_second": round(row.tokens_per_second, 2)}
            if base:
                item["speedup_vs_target"] = round(row.tokens_per_second / base.tokens_per_second, 3)
            if assisted:
                item["speedup_vs_hf_assisted"] = round(row.tokens_per_second / assisted.tokens_per_second, 3)
            if row.acceptance is not None:
                item["acceptance"] = row.acceptance
                item["mean_accepted_length"] = row.mean_accepted_length
                if isinstance(row.gamma, int) and row.gamma > 0:
                    item["theoretical_speedup"] = round(theoretical_speedup(row.acceptance, row.gamma, c), 3)
            if row.gamma_histogram:
                item["gamma_histogram"] = row.gamma_histogram
            entry["modes"][key] = item
        summary.append(entry)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "target": {"name": target.name, "layers": target.config.num_layers, "hidden": target.config.hidden_size,
                   "parameters": sum(p.numel() for p in target.model.parameters()), "weight_bytes": weights},
        "draft": {"name": draft.name, "layers": draft.config.num_layers, "hidden": draft.config.hidden_size,
                  "parameters": sum(p.numel() for p in draft.model.parameters())},
        "settings": asdict(settings),
        **extra,
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }  # fmt: skip


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = sorted({(r["mode"], str(r["gamma"])) for r in rows})
    for mode, gamma in labels:
        pts = sorted(
            (r["batch_size"], r["tokens_per_second"])
            for r in rows
            if r["mode"] == mode and str(r["gamma"]) == gamma
        )
        name = mode if gamma in ("None", "0") else f"{mode} γ={gamma}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s", title="Throughput by mode")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "tokens_per_second.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in result["summary"]:
        pts = []
        for key, item in entry["modes"].items():
            if key.startswith("speculative-gamma"):
                pts.append(
                    (
                        int(key.removeprefix("speculative-gamma")),
                        item.get("speedup_vs_target", 0),
                        item.get("theoretical_speedup"),
                    )
                )
        pts.sort()
        if pts:
            line = ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=f"measured, batch {entry['batch_size']}",
            )
            ax.plot(
                [p[0] for p in pts],
                [p[2] for p in pts],
                linestyle="--",
                color=line[0].get_color(),
                label=f"theory, batch {entry['batch_size']}",
            )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xlabel="γ", ylabel="speedup vs target alone", title="Speedup against γ")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "speedup_vs_gamma.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if (
            r["mode"] == "speculative"
            and r["accepted_by_position"]
            and r["batch_size"] == min(x["batch_size"] for x in rows)
        ):
            ax.plot(
                range(1, len(r["accepted_by_position"]) + 1),
                r["accepted_by_position"],
                marker="o",
                label=f"γ={r['gamma']}",
            )
    ax.set(
        xlabel="draft position",
        ylabel="accepted / drafted",
        ylim=(0, 1),
        title="Acceptance by draft position",
    )
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "acceptance_by_position.png"))
    return paths


def save(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    return [out / "bench.json", *write_plots(result, out)]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
