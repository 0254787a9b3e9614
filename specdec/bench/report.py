"""What `specdec bench` derives from its measurements, and how it writes them: the measured
acceptance α (per tested draft position), the cost ratio c = draft step / target step from the
engines' own pass timings, the theoretical speedup (1 - α^(γ+1)) / ((1 - α)(γc + 1)) next to the
measured one, and for target-alone decode the achieved memory bandwidth (weights + KV read per
step) against a copy bandwidth measured on the same device; then bench.json and the plots.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from specdec.bench.runner import CONSTRAINED, Bench, BenchSettings, Row, constrained, mode_label
from specdec.models.kv_cache import bytes_per_token
from specdec.models.loader import LoadedModel
from specdec.models.quantize import stored_bytes


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


def theoretical_speedup(alpha: float, gamma: int, c: float) -> float:
    if gamma == 0:
        return 1.0
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


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

    weights = stored_bytes(target.model)
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
            # Against the target alone as this row's models are quantized and its requests constrained.
            is_constrained = constrained(row.mode.removeprefix(f"{row.quantization} "))
            same = find(
                mode_label((CONSTRAINED if is_constrained else "") + "target", row.quantization), batch
            )
            if (row.quantization != "none" or is_constrained) and same:
                item["speedup_vs_same_target"] = round(row.tokens_per_second / same.tokens_per_second, 3)
            if llama_cpp := find("llama.cpp", batch):
                item["ratio_to_llama_cpp"] = round(row.tokens_per_second / llama_cpp.tokens_per_second, 3)
            if assisted:
                item["speedup_vs_hf_assisted"] = round(row.tokens_per_second / assisted.tokens_per_second, 3)
            if row.acceptance is not None:
                item["acceptance"] = row.acceptance
                item["mean_accepted_length"] = row.mean_accepted_length
                if isinstance(row.gamma, int) and row.gamma > 0:
                    item["theoretical_speedup"] = round(theoretical_speedup(row.acceptance, row.gamma, c), 3)
            if row.gamma_histogram:
                item["gamma_histogram"] = row.gamma_histogram
            for name in ("constraint_complete", "schema_valid", "mean_output_tokens"):
                if name in row.extra:
                    item[name] = row.extra[name]
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
