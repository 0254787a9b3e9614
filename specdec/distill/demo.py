"""`specdec train-demo`: the embedded default pair, trained from scratch on the Python stdlib.

1. Check this machine's standard library against the pinned manifest (refuse if it differs).
2. Train a byte-level BPE tokenizer (4096 entries) on the training files.
3. Pretrain the target (8 layers, hidden 256) on next-token prediction.
4. Distil the draft (1 layer, same width, initialised from the target) on KL(target || draft).
5. Export both in bf16 to the package's assets, with held-out prompts, and measure the shipped pair:
   held-out loss of both, top-1 agreement, acceptance and mean accepted length on held-out prompts,
   tokens/s of target alone vs speculative on this machine, in the same run.

Everything is seeded; batches depend only on (seed, step). Intermediate fp32 checkpoints and
training states live in --work, so an interrupted run continues with --resume.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.distill.corpus import MANIFEST, load_corpus
from specdec.distill.data import Document, TokenStream
from specdec.distill.distill import DraftShape, heldout_prompts, run_distill
from specdec.distill.trainer import TrainConfig, heldout_agreement, heldout_lm_loss, lm_loss, train_loop
from specdec.tokenization import train_byte_bpe

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


@dataclass(frozen=True)
class DemoRecipe:
    vocab_size: int = 4096
    hidden: int = 256
    target_layers: int = 8
    draft_layers: int = 1
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 704
    max_positions: int = 1024
    target_steps: int = 1600
    draft_steps: int = 900
    batch_size: int = 16
    seq_len: int = 256
    target_lr: float = 3e-3
    draft_lr: float = 2e-3
    seed: int = 0


def _target_config(recipe: DemoRecipe, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.target_layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def train_target(
    recipe: DemoRecipe,
    tokenizer: Any,
    train: TokenStream,
    heldout: TokenStream,
    work: Path,
    device: str,
    resume: bool,
):
    from transformers import AutoModelForCausalLM

    config = TrainConfig(
        steps=recipe.target_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len, lr=recipe.target_lr,
        warmup=100, eval_every=200, seed=recipe.seed, device=device,
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_target_config(recipe, tokenizer), dtype=torch.float32).to(
        device
    )
    eval_batches = heldout.eval_batches(recipe.batch_size, recipe.seq_len, max_batches=4)

    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    result = train_loop(
        model,
        config,
        work / "target",
        lambda step: lm_loss(
            model, train.batch(config.seed, step, config.batch_size, config.seq_len).to(device)
        ),
        lambda: {"heldout_loss": round(heldout_lm_loss(model, eval_batches, device), 4)},
        save,
        resume,
        label="target",
    )
    return result


def export_bf16(src: Path, dst: Path) -> int:
    """Copy a checkpoint with its weights in bf16; returns the weights' size in bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dst.exists():
        shutil.rmtree(dst)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    return (dst / "model.safetensors").stat().st_size


def measure_pair(
    target: Path, draft: Path, heldout_docs: list[Document], tokenizer: Any, seq_len: int, batch: int
) -> dict[str, Any]:
    """What the shipped (bf16) pair achieves: quality on held-out text and speed on this machine."""
    from transformers import AutoModelForCausalLM

    from specdec.config import EngineConfig
    from specdec.engine import Engine
    from specdec.request import Mode
    from specdec.sampling import SamplingParams

    vocab = len(tokenizer)
    heldout = TokenStream(heldout_docs, tokenizer)
    batches = heldout.eval_batches(batch, seq_len, max_batches=8)
    t_model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    d_model = AutoModelForCausalLM.from_pretrained(str(draft), dtype=torch.float32).eval()
    with torch.no_grad():
        metrics: dict[str, Any] = {
            "target_heldout_loss": round(heldout_lm_loss(t_model, batches, "cpu"), 4),
            "draft_heldout_loss": round(heldout_lm_loss(d_model, batches, "cpu"), 4),
            **heldout_agreement(t_model, d_model, batches, vocab, "cpu"),
        }
    prompts = heldout_prompts(heldout_docs, tokenizer, count=32, length=64)
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=16, max_context=512, dtype="float32")
    )
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)
    for gamma in (2, 3, 4, 5):
        results = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=gamma)
        drafted = sum(r.stats.drafted_tokens for r in results)
        accepted = sum(r.stats.accepted_tokens for r in results)
        emitted = sum(r.stats.emitted_by_verify for r in results)
        steps = sum(r.stats.verify_steps for r in results)
        metrics[f"greedy_gamma{gamma}"] = {
            "acceptance_rate": round(accepted / drafted, 4),
            "mean_accepted_length": round(emitted / steps, 4),
        }
    # Speed at batch size 1, greedy, in this one run: medians over the prompts.
    speed: dict[str, float] = {}
    for label, mode, gamma in (
        ("target", Mode.TARGET, 0),
        *((f"speculative_gamma{g}", Mode.SPECULATIVE, g) for g in (2, 3, 4, 5)),
    ):
        rates = []
        engine.generate(prompts[:2], params, mode=mode, num_speculative_tokens=gamma)  # warm-up
        for prompt in prompts[:12]:
            t0 = time.perf_counter()
            [r] = engine.generate([prompt], params, mode=mode, num_speculative_tokens=gamma)
            rates.append(len(r.token_ids) / (time.perf_counter() - t0))
        speed[label] = round(statistics.median(rates), 1)
    metrics["tokens_per_second_batch1"] = speed
    best = max((k for k in speed if k != "target"), key=lambda k: speed[k])
    metrics["best_speculative"] = best
    metrics["speedup_vs_target"] = round(speed[best] / speed["target"], 3)
    return metrics


def train_demo(out: Path, work: Path, recipe: DemoRecipe, device: str, resume: bool) -> dict[str, Any]:
    started = time.monotonic()
    torch.use_deterministic_algorithms(True, warn_only=True)
    train_docs, heldout_docs = load_corpus()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    if resume and (tokenizer_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = train_byte_bpe((d.text for d in train_docs), vocab_size=recipe.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    train = TokenStream(train_docs, tokenizer)
    heldout = TokenStream(heldout_docs, tokenizer)
    target_result = train_target(recipe, tokenizer, train, heldout, work, device, resume)
    draft_config = TrainConfig(
        steps=recipe.draft_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len, lr=recipe.draft_lr,
        warmup=50, eval_every=300, seed=recipe.seed, device=device,
    )  # fmt: skip
    draft_result = run_distill(
        work / "target",
        work / "draft",
        [],
        DraftShape(layers=recipe.draft_layers),
        draft_config,
        resume=resume,
        split=(train_docs, heldout_docs),
    )
    sizes = {name: export_bf16(work / name, out / name) for name in ("target", "draft")}
    prompts = heldout_prompts(heldout_docs, tokenizer, count=32, length=64)
    (out / "heldout_prompts.json").write_text(json.dumps([tokenizer.decode(p) for p in prompts], indent=1))
    metrics = measure_pair(
        out / "target", out / "draft", heldout_docs, tokenizer, recipe.seq_len, recipe.batch_size
    )
    record = {
        "recipe": asdict(recipe),
        "python": platform.python_version(),
        "corpus_manifest": MANIFEST.name,
        "train_files": len(train_docs),
        "heldout_files": len(heldout_docs),
        "train_tokens": len(train),
        "heldout_tokens": len(heldout),
        "weights_bytes_bf16": sizes,
        "target_training": {"seconds": round(target_result.seconds, 1), "history": target_result.history},
        "draft_training": {"seconds": round(draft_result.seconds, 1), "history": draft_result.history},
        "shipped_pair": metrics,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": device,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    return record
