"""Constrained (JSON Schema) against free decoding on the default pair, SmolLM2-135M-Instruct and
its distilled draft: tokens/s of the target alone and of speculation (adaptive γ and γ = 4), the
draft's acceptance under the constraint, the share of answers that parse and validate, and the
time of a decode step (one without a prompt in it) - side by side, repeats interleaved, on an extraction workload written here.

    python benches/structured_output.py [--batch-sizes 1,4] [--repeats 3] [--quantize none]

Each run sends every prompt (a closed loop of `batch` in flight) with greedy decoding and at most
64 new tokens; a free answer ends at the model's end of sequence like a constrained one. Free and
constrained answers differ in length (the constrained are shorter), so tok/s also differ by how
much prompt each output token carries; the decode-step time compares the steps themselves.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import jsonschema
import torch

from specdec import Engine, SamplingParams
from specdec.assets import default_draft, default_target
from specdec.bench.workloads import EXTRACTION_SCHEMA, EXTRACTION_TEXTS, extraction_instructions
from specdec.config import EngineConfig, Quantization
from specdec.grammar import Constraint, ConstraintKind
from specdec.models import load_checkpoint
from specdec.models.quantize import quantize_pair
from specdec.request import Mode

SCHEMA = EXTRACTION_SCHEMA
TEXTS = EXTRACTION_TEXTS
CONSTRAINT = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
CONFIGS = [  # label, mode, γ (0 = adaptive for speculative), constrained
    ("target free", Mode.TARGET, 0, False),
    ("target json", Mode.TARGET, 0, True),
    ("speculative adaptive free", Mode.SPECULATIVE, 0, False),
    ("speculative adaptive json", Mode.SPECULATIVE, 0, True),
    ("speculative γ=4 free", Mode.SPECULATIVE, 4, False),
    ("speculative γ=4 json", Mode.SPECULATIVE, 4, True),
    # The same, the drafts proposed without the grammar (EngineConfig.mask_constrained_drafts off).
    ("speculative adaptive json unmasked", Mode.SPECULATIVE, 0, True),
    ("speculative γ=4 json unmasked", Mode.SPECULATIVE, 4, True),
]


def once(engine: Engine, prompts, batch: int, mode: Mode, gamma: int, constrained: bool) -> dict:
    requests = [
        engine.make_request(
            p, SamplingParams(max_new_tokens=64), mode, gamma, constraint=CONSTRAINT if constrained else None
        )
        for p in prompts
    ]
    steps: list[float] = []
    gammas: dict[int, int] = {}  # γ of each verified row, over the run

    def observe(report) -> None:
        if not report.prefill_tokens:
            steps.append(report.seconds)
        for g in report.gammas:
            gammas[g] = gammas.get(g, 0) + 1

    t0 = time.perf_counter()
    # Decode steps only (no prompt in them): the per-step cost the constraint adds, apart from the
    # prefills, whose share differs when constrained answers are shorter than free ones.
    results = engine.generate(requests, max_concurrency=batch, on_step=observe)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    valid = 0
    for r in results:
        try:
            jsonschema.validate(json.loads(r.text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    drafted = sum(r.stats.drafted_tokens for r in results)
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "acceptance": sum(r.stats.accepted_tokens for r in results) / drafted if drafted else None,
        "valid": valid / len(results),
        "step_ms": 1e3 * statistics.mean(steps),
        "token_ids": [r.token_ids for r in results],
        "gammas": gammas,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", default="none", choices=[q.value for q in Quantization])
    ap.add_argument("--prompts", type=int, default=len(TEXTS), help=f"how many of the {len(TEXTS)} prompts")
    args = ap.parse_args()
    target = load_checkpoint(default_target())
    draft = load_checkpoint(default_draft(), borrow_from=target)
    target, draft = quantize_pair(target, draft, Quantization(args.quantize), Quantization(args.quantize))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    base = dict(max_batch_size=max(batches), max_context=256, max_queue=len(TEXTS))
    engines = {
        (label, gamma): Engine(
            target=target,
            draft=draft,
            config=EngineConfig(**base, warmup=gamma == 0, mask_constrained_drafts="unmasked" not in label),
        )
        for label, _, gamma, _ in CONFIGS
    }
    any_engine = next(iter(engines.values()))
    prompts = [
        any_engine.render_chat([{"role": "user", "content": instruction}])
        for instruction in extraction_instructions()[: args.prompts]
    ]
    print(
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, quantize {args.quantize}; "
        f"{len(prompts)} extraction prompts, greedy, at most 64 new tokens"
    )
    for batch in batches:
        runs: dict[str, list[dict]] = {label: [] for label, *_ in CONFIGS}
        for label, mode, gamma, constrained in CONFIGS:  # warm-up (compiles the grammar), untimed
            once(engines[(label, gamma)], prompts[:batch], batch, mode, gamma, constrained)
        for _ in range(args.repeats):
            for label, mode, gamma, constrained in CONFIGS:
                runs[label].append(once(engines[(label, gamma)], prompts, batch, mode, gamma, constrained))
        print(f"\nbatch size {batch}: medians of {args.repeats} interleaved repeats")
        print(
            "| configuration | tok/s | × target free | × same-constraint target | acceptance | valid JSON | decode step ms |"
        )
        print("|---|---|---|---|---|---|---|")
        median = {label: statistics.median(r["tokens_per_second"] for r in rs) for label, rs in runs.items()}
        for label, _, _, constrained in CONFIGS:
            last = runs[label][-1]
            same = median["target json" if constrained else "target free"]
            acceptance = "" if last["acceptance"] is None else f"{last['acceptance']:.3f}"
            step = statistics.median(r["step_ms"] for r in runs[label])
            print(
                f"| {label} | {median[label]:.1f} | {median[label] / median['target free']:.2f} | "
                f"{median[label] / same:.2f} | {acceptance} | {last['valid']:.2f} | {step:.1f} |"
            )
        for label, mode, _, _ in CONFIGS:
            if mode is Mode.SPECULATIVE:
                hist: dict[int, int] = {}
                for r in runs[label]:
                    for g, n in r["gammas"].items():
                        hist[g] = hist.get(g, 0) + n
                print(f"γ of verified rows, {label}: {dict(sorted(hist.items()))}")
        for constrained in (False, True):  # exactness, checked on the bench's own outputs
            kind = "json" if constrained else "free"
            alone = runs[f"target {kind}"][-1]["token_ids"]
            labels = [label for label, mode, _, c in CONFIGS if mode is Mode.SPECULATIVE and c == constrained]
            for label in labels:
                assert runs[label][-1]["token_ids"] == alone, f"{label} differs from the target alone"
        print("speculative outputs equal the target alone's, free and constrained")


if __name__ == "__main__":
    main()
