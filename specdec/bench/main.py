"""Wiring of `specdec bench`: models, prompts, the run order, the report."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.assets import resolve_pair
from specdec.bench.llama_cpp import anchor_for
from specdec.bench.report import report, save, theoretical_speedup
from specdec.bench.runner import CONSTRAINED, Anchor, Bench, BenchSettings, Config, plans
from specdec.bench.shapes import DEFAULT_DRAFT, SHAPES, hf_model, random_model, synthetic_tokenizer
from specdec.bench.workloads import EXTRACTION_SCHEMA, extraction_instructions
from specdec.config import Quantization
from specdec.engine import resolve_device, resolve_dtype
from specdec.errors import SpecdecError
from specdec.grammar import Constraint, ConstraintKind
from specdec.models.loader import LoadedModel, load_checkpoint
from specdec.models.quantize import describe_weights, quantize_pair, stored_bytes
from specdec.request import Mode
from specdec.tokenization import emittable_vocab_size

# Adaptive γ as served (one γ per batch), and per row (EngineConfig.per_row_gamma), to compare.
ADAPTIVE = ("adaptive", "adaptive-per-row")


def parse_gammas(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part in ADAPTIVE:
            out.append(part)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise SpecdecError(f"--gamma: {part!r} is neither an integer nor one of {', '.join(ADAPTIVE)}")
    return out


def prompts_from_text(tokenizer: Any, texts: list[str], length: int, count: int) -> list[list[int]]:
    """`count` windows of exactly `length` tokens from the texts, joined end to end."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) < length:
        raise SpecdecError(f"the prompt texts hold {len(ids)} tokens, fewer than --prompt-len {length}")
    step = max(1, (len(ids) - length) // max(count, 1))
    return [ids[i * step : i * step + length] for i in range(count)]


def chat_prompts(tokenizer: Any, instructions: list[str], count: int) -> list[list[int]]:
    """`count` chat prompts (the instructions as user turns, rendered by the chat template), all cut
    from the left to the shortest one's length: the batches of the Hugging Face baselines need equal
    lengths, and what the answer depends on most - the user turn and the assistant marker - stays."""
    from specdec.chat import encode_chat

    rendered = [encode_chat(tokenizer, [{"role": "user", "content": i}]) for i in instructions[:count]]
    if not rendered:
        raise SpecdecError("no held-out chat instructions to make prompts from")
    while len(rendered) < count:
        rendered.extend(rendered[: count - len(rendered)])
    shortest = min(len(r) for r in rendered)
    return [r[len(r) - shortest :] for r in rendered]


def _held_out_prompts(target_dir: Path, draft_dir: Path) -> Any:
    """A shipped pair's held-out prompts (beside the draft, or the demo pair's beside its target):
    a list of texts, or {"chat": [instructions]}; None if there are none."""
    for candidate in (
        Path(draft_dir) / "heldout_prompts.json",
        Path(target_dir).parent / "heldout_prompts.json",
    ):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


@dataclass(frozen=True)
class JsonWorkload:
    """`--json-schema`: the schema every "json ..." configuration's answers are constrained to."""

    schema: Any
    source: str  # "extraction" (built in) or the file
    constraint: Constraint
    validator: Any


def json_workload(spec: str) -> JsonWorkload:
    """`extraction`: the built-in workload (`bench.workloads`); else a JSON Schema file, whose
    prompts are --prompts' lines (as user turns) or the extraction instructions."""
    from specdec.router.validators import compile_schema

    if spec == "extraction":
        schema: Any = EXTRACTION_SCHEMA
    else:
        try:
            schema = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise SpecdecError(f"--json-schema {spec}: not a readable JSON Schema file ({e})") from None
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
    constraint.check()
    return JsonWorkload(schema, spec, constraint, compile_schema(schema, "--json-schema"))


def _hf_loadable(model: Any) -> bool:
    """Whether transformers can load the checkpoint (not a subset head or borrowed tensors)."""
    config = model.config
    return config.answers_alone and not config.shared_embeddings and not config.shared_layers


def quantized_pairs(
    target: LoadedModel, draft: LoadedModel, spec: str
) -> dict[str, tuple[LoadedModel, LoadedModel]]:
    """The pairs `--quantize` asks for, by name: a comma list of none / int8 / int4, each for both
    models, or TARGET:DRAFT (e.g. int8:none) for a pair quantized differently."""
    pairs: dict[str, tuple[LoadedModel, LoadedModel]] = {}
    for part in spec.split(","):
        name = part.strip()
        target_scheme, _, draft_scheme = name.partition(":")
        try:
            schemes = Quantization(target_scheme), Quantization(draft_scheme or target_scheme)
        except ValueError:
            raise SpecdecError(
                f"--quantize: {name!r} is not none, int8, int4 or TARGET:DRAFT of them (e.g. int8:none)"
            ) from None
        if schemes[0] is schemes[1]:
            name = schemes[0].value
        if name not in pairs:
            pairs[name] = quantize_pair(target, draft, *schemes)
    return pairs


def _random_prompts(vocab: int, length: int, count: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(1, vocab) for _ in range(length)] for _ in range(count)]


def run(args: Any) -> dict[str, Any]:
    from tqdm import tqdm

    if args.waves < 1:
        raise SpecdecError(f"--waves must be >= 1, got {args.waves}")
    if not 0 <= args.length_spread < 1:
        raise SpecdecError(f"--length-spread must be in [0, 1), got {args.length_spread}")
    settings = BenchSettings(
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        gammas=parse_gammas(args.gamma),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        waves=args.waves,
        length_spread=args.length_spread,
        respect_eos=args.respect_eos,
        hf=not args.no_hf,
        device=args.device,
        dtype=args.dtype,
    )
    workload = json_workload(args.json_schema) if args.json_schema else None
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    count = max(settings.batch_sizes) * settings.waves
    hf_target = hf_draft = llama_cpp = None
    if args.random_weights:
        if workload is not None:
            raise SpecdecError("--json-schema needs a real pair's tokenizer; not with --random-weights")
        if args.shape not in SHAPES:
            raise SpecdecError(f"--shape {args.shape!r} is not one of {', '.join(SHAPES)}")
        draft_shape = args.draft_shape or DEFAULT_DRAFT.get(args.shape)
        if draft_shape is None:
            raise SpecdecError(f"--shape {args.shape} has no default draft; give --draft-shape")
        tokenizer = synthetic_tokenizer(max(SHAPES[args.shape].vocab_size, SHAPES[draft_shape].vocab_size))
        target = random_model(args.shape, device, dtype, tokenizer, seed=1)
        draft = random_model(draft_shape, device, dtype, tokenizer, seed=2)
        prompts = _random_prompts(
            emittable_vocab_size(target, draft), settings.prompt_len, count, settings.seed
        )
        if settings.hf:
            hf_target = hf_model(args.shape, device, dtype, seed=1)
            hf_draft = hf_model(draft_shape, device, dtype, seed=2)
        source = {"random_weights": {"target_shape": args.shape, "draft_shape": draft_shape}}
    else:
        target_dir, draft_dir = resolve_pair(args.target, args.draft, args.demo)
        if draft_dir is None:
            raise SpecdecError("bench needs a draft: give --draft with --target")
        target = load_checkpoint(target_dir, device=device, dtype=dtype)
        draft = load_checkpoint(draft_dir, device=device, dtype=dtype, borrow_from=target)
        texts = chat = None
        kind = "held-out instructions"
        if args.prompts:
            texts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
            if workload is not None:  # the constrained workload's user turns
                chat, texts, kind = texts, None, "--prompts, as user turns"
        elif workload is not None:
            chat, kind = extraction_instructions(), "the extraction instructions"
        else:
            held_out = _held_out_prompts(target.path, draft.path)
            if isinstance(held_out, dict):
                chat = held_out["chat"]
            elif held_out:
                texts = held_out
        prompts = (
            chat_prompts(target.tokenizer, chat, count)
            if chat
            else prompts_from_text(target.tokenizer, texts, settings.prompt_len, count)
            if texts
            else _random_prompts(
                emittable_vocab_size(target, draft),
                settings.prompt_len,
                count,
                settings.seed,
            )
        )
        if settings.hf:
            from transformers import AutoModelForCausalLM

            hf_target = AutoModelForCausalLM.from_pretrained(str(target.path), dtype=dtype).to(device).eval()
            if _hf_loadable(draft):
                hf_draft = (
                    AutoModelForCausalLM.from_pretrained(str(draft.path), dtype=dtype).to(device).eval()
                )
        source = {
            "checkpoints": {"target": str(target_dir), "draft": str(draft_dir)},
            "prompts": f"chat ({kind})" if chat else "text" if texts else "random ids",
        }
        if not args.no_llama_cpp and 1 in settings.batch_sizes:
            context = max(len(p) for p in prompts) + settings.new_tokens + 8
            llama_cpp = anchor_for(target_dir, context, torch.get_num_threads())
            if llama_cpp is not None:
                source["llama_cpp"] = {"gguf": str(target_dir), "version": llama_cpp.version,
                                       "threads": llama_cpp.threads, "batch_sizes": [1]}  # fmt: skip
    assisted = (
        hf_draft is not None
        and target.config.vocab_size == draft.config.vocab_size
        and 1 in settings.batch_sizes
    )
    if hf_draft is not None and not assisted:
        print(
            "note: HF assisted generation skipped (it needs batch size 1 and equal logits widths: "
            f"{target.config.vocab_size} vs {draft.config.vocab_size})",
            file=sys.stderr,
        )
    pairs = quantized_pairs(target, draft, args.quantize)
    configs: list[Config] = []
    for quant, (_, quant_draft) in pairs.items():
        for prefix in ("", CONSTRAINED) if workload is not None else ("",):  # free, then constrained
            configs.append((prefix + "target", Mode.TARGET, 0, quant))
            if quant_draft.config.answers_alone:  # else it only speculates (validation)
                configs.append((prefix + "draft", Mode.DRAFT, 0, quant))
            for gamma in settings.gammas:
                if gamma != 0:  # γ = 0 is the target alone, measured above
                    configs.append((prefix + "speculative", Mode.SPECULATIVE, gamma, quant))
    if workload is not None:
        source["json_schema"] = {"schema": workload.schema, "source": workload.source}
    source["quantizations"] = {
        quant: {"target": describe_weights(t), "draft": describe_weights(d),
                "target_bytes": stored_bytes(t.model), "draft_bytes": stored_bytes(d.model),
                "pair_bytes": stored_bytes(t.model, d.model)}
        for quant, (t, d) in pairs.items()
    }  # fmt: skip
    runs = plans(settings, len(configs), hf_target is not None, assisted, llama_cpp is not None)
    with tqdm(total=runs, desc="bench", unit="run") as bar:
        constraint, validator = (workload.constraint, workload.validator) if workload else (None, None)
        bench = Bench(
            pairs, settings, prompts, configs, progress=bar, constraint=constraint, validator=validator
        )
        for batch in settings.batch_sizes:
            anchors: list[Anchor] = []
            if hf_target is not None:
                anchors.append(("hf-target", lambda b: bench.hf_once(hf_target, None, b)))
            if assisted and batch == 1:
                anchors.append(("hf-assisted", lambda b: bench.hf_once(hf_target, hf_draft, b)))
            if llama_cpp is not None and batch == 1:
                anchors.append((llama_cpp.label, lambda b: bench.llama_cpp_once(llama_cpp, b)))
            bench.run_batch(batch, anchors)
    source["pass_ms_batch1"] = bench.pass_costs()
    result = report(bench, target, draft, settings, source)
    if args.random_weights:
        # A random pair accepts almost nothing: give the speedup the measured costs would yield at
        # realistic acceptance rates instead.
        for entry in result["summary"]:
            c = entry["cost_ratio_c"]
            entry["theoretical_at_alpha"] = {
                str(alpha): {str(g): round(theoretical_speedup(alpha, g, c), 3) for g in range(1, 9)}
                for alpha in (0.6, 0.7, 0.8)
            }
    files = save(result, Path(args.out))
    _print_table(result)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['machine']} | {result['device']} {result['dtype']} | target {result['target']['name']}, draft {result['draft']['name']}"
    )
    passes = result.get("pass_ms_batch1", {})
    if passes:
        print("\none pass at batch size 1, ms (fastest of 5):")
        for quant, costs in passes.items():
            print(f"  {quant:<10} " + "  ".join(f"{k}={v}" for k, v in costs.items()))
    for entry in result["summary"]:
        print(
            f"\nbatch {entry['batch_size']}: c = {entry['cost_ratio_c']}, target bandwidth {entry['target_bandwidth_GBps']} GB/s "
            f"({entry['bandwidth_fraction'] * 100:.1f}% of copy {entry['copy_bandwidth_GBps']} GB/s)"
        )
        for key, item in entry["modes"].items():
            extras = "  ".join(f"{k}={v}" for k, v in item.items() if k != "tokens_per_second")
            print(f"  {key:<26} {item['tokens_per_second']:>10.1f} tok/s  {extras}")
