"""What quantization costs in quality, measured (docs/QUANTIZATION.md): for a pair, every scheme
against the float32 target -

- KL(float32 || quantized) of the next-token distributions and top-1 agreement, teacher-forced
  over held-out text;
- greedy-output agreement on held-out chat prompts (identical outputs, and the mean share of an
  output before the first differing token);
- the draft's acceptance at γ = 4 for each (target, draft) combination;
- the weights' size in memory.

    python scripts/quant_quality.py                 # the default pair (SmolLM2-135M + its draft)
    python scripts/quant_quality.py --demo          # the embedded stdlib demo pair

Writes out/quant-quality/<pair>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from specdec import Engine, SamplingParams
from specdec.assets import resolve_pair
from specdec.batching import Row, make_batch
from specdec.bench.runner import per_position_alpha
from specdec.chat import encode_chat
from specdec.config import EngineConfig, Quantization
from specdec.models import load_checkpoint
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.quantize import quantize_pair, quantized, stored_bytes
from specdec.request import Mode

NONE, INT8, INT4 = Quantization.NONE, Quantization.INT8, Quantization.INT4
COMBINATIONS = [(NONE, NONE), (NONE, INT8), (INT8, NONE), (INT8, INT8), (INT4, INT4), (INT4, INT8)]
WINDOW = 256


def window_logits(model, tokens: list[int]) -> torch.Tensor:
    """Our logits [len(tokens), vocab] for one window, in one pass through a fresh cache."""
    cache = KVCache(model.config, CacheLayout(1, len(tokens) + 8, 4), model.dtype, model.device)
    model.model.init_rope(cache.layout.capacity)
    batch = make_batch([Row(0, 0, tokens)], model.device, cache.layout.capacity)
    with torch.no_grad():
        return model.model(batch, cache)[0]


def text_windows(tokenizer, texts: list[str], count: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(min(count, len(ids) // WINDOW))]


def kl_and_top1(reference, model, windows) -> tuple[float, float]:
    kl_sum, agree, n = 0.0, 0, 0
    for tokens in windows:
        p = window_logits(reference, tokens).log_softmax(-1)
        q = window_logits(model, tokens).log_softmax(-1)
        kl_sum += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += len(tokens)
    return kl_sum / n, agree / n


def print_kl_only(target, windows) -> None:
    import specdec.models.quantize as quantize_module
    from specdec.models.quant_linear import Int8LinearWeightOnly

    rows = {"int8": quantized(target, INT8), "int4": quantized(target, INT4)}
    cpu_int8 = quantize_module.Int8LinearCPU
    # The same codes and scales through the weight-only module: activations left in float32.
    quantize_module.Int8LinearCPU = lambda codes, scale, bias: Int8LinearWeightOnly(
        codes, scale, bias, target.dtype
    )
    try:
        rows["int8 weight-only"] = quantized(target, INT8)
    finally:
        quantize_module.Int8LinearCPU = cpu_int8
    # How the weights themselves come back: the projections through int4 (a Q4_0 / Q4_1 file's
    # own blocks come back exactly), the embedding table through int4 and int8.
    from specdec.models.quant_linear import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    projections = [m.weight for n, m in target.model.named_modules() if n.endswith(("_proj",))]
    exact = sum(bool(torch.equal(dequantize_int4(*quantize_int4(w)), w)) for w in projections)
    table = target.model.embed_tokens.weight
    rel = lambda d: float((d - table).norm() / table.norm())  # noqa: E731
    print(f"projections exact through int4: {exact}/{len(projections)}")
    print(f"embedding table relative error: int4 {rel(dequantize_int4(*quantize_int4(table))):.4f}, "
          f"int8 {rel(dequantize_int8(*quantize_int8(table))):.4f}")  # fmt: skip
    print(f"{len(windows)} windows of {WINDOW} tokens\n| target | KL vs fp32 | top-1 |\n|---|---|---|")
    for name, model in rows.items():
        kl, top1 = kl_and_top1(target, model, windows)
        print(f"| {name} | {kl:.5f} | {top1:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--windows", type=int, default=12, help=f"held-out text windows of {WINDOW} tokens")
    ap.add_argument("--prompts", type=int, default=24, help="held-out chat prompts (or text prompts)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--combinations",
        default=",".join(f"{t.value}:{d.value}" for t, d in COMBINATIONS),
        help="TARGET:DRAFT schemes to measure, comma-separated (the first should be none:none)",
    )
    ap.add_argument("--out", type=Path, default=Path("out/quant-quality"))
    ap.add_argument(
        "--kl-only",
        action="store_true",
        help="only KL and top-1 of the target: int8, int8 with weight-only products (the CUDA "
        "path's module, run on the CPU: what int8 costs without quantizing activations), int4",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    target_dir, draft_dir = resolve_pair(None, None, args.demo)
    target = load_checkpoint(target_dir)
    draft = load_checkpoint(draft_dir, borrow_from=target)
    # Beside the draft (SmolLM2's), or beside both (the demo pair's).
    found = [d / "heldout_prompts.json" for d in (Path(draft_dir), Path(draft_dir).parent)]
    held_out = json.loads(next(f for f in found if f.is_file()).read_text())
    repo = Path(__file__).resolve().parent.parent
    if isinstance(held_out, dict):  # chat instructions; the held-out text is this project's docs
        texts = [p.read_text() for p in sorted((repo / "docs").glob("*.md"))]
        prompts = [encode_chat(target.tokenizer, [{"role": "user", "content": m}]) for m in held_out["chat"]]
    else:  # held-out source text: windows of it, and its lines' starts as prompts
        texts = held_out
        prompts = [target.tokenizer.encode(t, add_special_tokens=False)[:48] for t in held_out]
    windows = text_windows(target.tokenizer, texts, args.windows)
    prompts = prompts[: args.prompts]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    config = EngineConfig(
        max_batch_size=8, max_context=max(map(len, prompts)) + args.new_tokens + 16, warmup=False
    )

    results, reference_outputs = [], None
    if args.kl_only:
        print_kl_only(target, windows)
        return
    combinations = [tuple(Quantization(x) for x in c.split(":")) for c in args.combinations.split(",")]
    for target_scheme, draft_scheme in combinations:
        t0 = time.perf_counter()
        qt, qd = quantize_pair(target, draft, target_scheme, draft_scheme)
        engine = Engine(target=qt, draft=qd, config=config)
        entry = {
            "target": target_scheme.value,
            "draft": draft_scheme.value,
            "target_MB": round(stored_bytes(qt.model) / 1e6, 1),
            "draft_MB": round(stored_bytes(qd.model) / 1e6, 1),
            "pair_MB": round(stored_bytes(qt.model, qd.model) / 1e6, 1),
        }
        first_for_target = all(r["target"] != target_scheme.value for r in results)
        if first_for_target:
            outputs = [r.token_ids for r in engine.generate(prompts, params, mode=Mode.TARGET)]
            if reference_outputs is None:
                reference_outputs = outputs
            same = sum(a == b for a, b in zip(outputs, reference_outputs))
            shares = []
            for a, b in zip(outputs, reference_outputs):
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                shares.append(k / max(len(b), 1))
            kl, top1 = kl_and_top1(target, qt, windows) if target_scheme is not NONE else (0.0, 1.0)
            entry.update(
                kl=round(kl, 5),
                top1=round(top1, 4),
                greedy_identical=f"{same}/{len(prompts)}",
                greedy_prefix_share=round(sum(shares) / len(shares), 3),
            )
        spec = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=4)
        steps = sum(r.stats.verify_steps for r in spec)
        width = max(len(r.stats.accepted_by_position) for r in spec)
        accepted = [
            sum(r.stats.accepted_by_position[i] for r in spec if i < len(r.stats.accepted_by_position))
            for i in range(width)
        ]
        # Per tested draft position, as `specdec bench` reports it at a fixed γ.
        entry["acceptance_gamma4"] = round(per_position_alpha(accepted, steps, 4), 4)
        entry["mean_accepted_length"] = round(sum(r.stats.emitted_by_verify for r in spec) / steps, 3)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(entry)
        print(entry, flush=True)

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} CPU threads",
        "torch": torch.__version__,
        "command": "python scripts/quant_quality.py"
        + (" --demo" if args.demo else "")
        + f" --windows {args.windows} --prompts {args.prompts} --new-tokens {args.new_tokens}"
        + f" --combinations {args.combinations}",
        "pair": {"target": str(target_dir), "draft": str(draft_dir)},
        "held_out": {"windows": len(windows), "window_tokens": WINDOW, "prompts": len(prompts)},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "demo" if args.demo else "smollm2"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(
        "\n| target | draft | MB (target + draft; pair) | KL vs fp32 | top-1 | greedy identical | greedy prefix "
        "| acceptance γ=4 | mean accepted length |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['target']} | {r['draft']} | {r['target_MB']} + {r['draft_MB']}; {r['pair_MB']} | {r.get('kl', '')} | "
            f"{r.get('top1', '')} | {r.get('greedy_identical', '')} | {r.get('greedy_prefix_share', '')} | "
            f"{r['acceptance_gamma4']} | {r['mean_accepted_length']} |"
        )


if __name__ == "__main__":
    main()
