"""The eval's outputs in `--out`: `report.json` (every number), `report.md` (the tables and the
sizing rationale), `quality_cost.png` and `reliability.png`, `calibration.json` (the map a route's
`calibration:` key names) and `route.yaml` (the route with the chosen threshold, loadable as is).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(out: Path, report: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report.get("calibration") is not None:
        path = out / "calibration.json"
        path.write_text(json.dumps(report["calibration"]["map"], indent=2) + "\n")
        written.append(path)
    snippet = out / "route.yaml"
    snippet.write_text(yaml.safe_dump(report["route_snippet"], sort_keys=False))
    written.append(snippet)
    plots = _plots(out, report)
    written += plots
    report["plots"] = [p.name for p in plots]
    md = out / "report.md"
    md.write_text(markdown(report))
    written.append(md)
    return written


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Eval of route `{report['route']}` on `{report['data']}`", ""]
    lines += [f"{report['examples']} examples; tiers: {', '.join(report['tiers'])}; "
              f"run {report['date']} on {report['machine']}.", ""]  # fmt: skip
    lines += ["## Tiers, by slice", "",
              "| tier | variant | slice | n | accuracy (95% CI) | p50 / p95 latency (s) | tokens in / out | cost per example |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["tiers_table"]:
        lines.append(
            f"| {r['tier']} | {r['variant'] or '-'} | {r['slice']} | {r['n']} | "
            f"{_fmt(r['accuracy'])} ({_fmt(r['accuracy_low'])}-{_fmt(r['accuracy_high'])}) | "
            f"{_fmt(r['latency_p50_s'], 2)} / {_fmt(r['latency_p95_s'], 2)} | "
            f"{_fmt(r['prompt_tokens_mean'], 1)} / {_fmt(r['completion_tokens_mean'], 1)} | "
            f"{_fmt(r['cost_per_example'], 6)} |"
        )
    route = report["routing"]
    lines += ["", "## The route, replayed", "",
              f"Confidence: {route['confidence']}{' (calibrated)' if route['calibrated'] else ' (raw)'}; "
              f"AUC (quality over escalation rate): {_fmt(route['auc'])}.", "",
              "| threshold | quality | escalation rate | cost per example |", "|---|---|---|---|"]  # fmt: skip
    for p in route["curve"]:
        mark = " **chosen**" if route["chosen"] and p["threshold"] == route["chosen"]["threshold"] else ""
        lines.append(f"| {_fmt(p['threshold'])}{mark} | {_fmt(p['quality'])} | {_fmt(p['escalation_rate'])} | "
                     f"{_fmt(p['cost_per_example'], 6)} |")  # fmt: skip
    lines += ["", f"Chosen: {route['why']}: " + (
        f"threshold {_fmt(route['chosen']['threshold'])}, quality {_fmt(route['chosen']['quality'])}, "
        f"escalation rate {_fmt(route['chosen']['escalation_rate'])}." if route["chosen"] else "none."
    )]  # fmt: skip
    calibration = report.get("calibration")
    if calibration is not None:
        lines += ["", "## Calibration", "",
                  f"Isotonic, fitted on {calibration['train']} examples; on {calibration['held_out']} held out "
                  f"the ECE (10 bins) is {_fmt(calibration['ece_raw'])} raw and "
                  f"{_fmt(calibration['ece_calibrated'])} calibrated. The threshold above and in "
                  f"route.yaml applies to the calibrated confidence."]  # fmt: skip
    if not report.get("plots"):
        lines += ["", "No plots: matplotlib is not installed (pip install 'specdec[eval]')."]
    lines += ["", "## Sizing", "", report["sizing"], ""]
    return "\n".join(lines)


def _plots(out: Path, report: dict[str, Any]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []  # report.md says so
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    alone = [r for r in report["tiers_table"] if r["slice"] == "all" and not r["variant"]]
    for r in alone:
        ax.scatter(r["cost_per_example"], r["accuracy"], s=40)
        ax.annotate(
            r["tier"], (r["cost_per_example"], r["accuracy"]), textcoords="offset points", xytext=(5, 5)
        )
    curve = report["routing"]["curve"]
    ax.plot(
        [p["cost_per_example"] for p in curve],
        [p["quality"] for p in curve],
        "-",
        alpha=0.6,
        label="route over thresholds",
    )
    chosen = report["routing"]["chosen"]
    if chosen:
        ax.scatter(
            [chosen["cost_per_example"]], [chosen["quality"]], marker="*", s=160, label="chosen threshold"
        )
    ax.set_xlabel("cost per example" if report["priced"] else "cost per example (no --price given: 0)")
    ax.set_ylabel("quality")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "quality_cost.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    reliability = report.get("reliability")
    if reliability:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], ":", color="grey")
        for name, bins in reliability.items():
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=name)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = out / "reliability.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
