"""`specdec distill`: train a small draft, with the target's tokenizer, to imitate the target.

The draft has the target's architecture family at a smaller shape (fewer layers, optionally
narrower). When the widths match it starts from the target's embeddings, final norm, output head
and first layers, which is most of what a 1-2 layer draft needs to know. It is trained on
KL(target || draft) over text from the given files, optionally mixed with text the target samples
itself, and evaluated on held-out files: KL, top-1 agreement, Σ min(p, q), and the acceptance rate
the speculative engine actually measures with the draft.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.distill.data import Document, TokenStream, read_documents, split_heldout
from specdec.distill.trainer import TrainConfig, TrainResult, distill_loss, heldout_agreement, train_loop
from specdec.errors import SpecdecError
from specdec.models.loader import load_tokenizer, read_hf_config
from specdec.tokenization import real_vocab_size


@dataclass(frozen=True)
class DraftShape:
    layers: int = 1
    hidden: int | None = None  # None: the target's
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab_size: int | None = None  # logits width; None: the target's
    # A small output head: the `head_tokens` most frequent tokens of the training text
    # (models.subset_head); None: the whole vocabulary.
    head_tokens: int | None = None
    share_embeddings: bool = False  # borrow the target's input embedding instead of storing one
    # Borrow the target's first layers, frozen, under the `layers` trained ones (the draft then has
    # shared_layers + layers layers, at the target's width): features the target itself computes,
    # which a draft trained on little text generalises from far better than from embeddings alone.
    shared_layers: int = 0
    # Read the target's features (EAGLE, distill.eagle): the draft's input is its token and the
    # target's final hidden state at the position before. Needs the target's hidden size.
    feature_input: bool = False


def draft_config(target_config: Any, shape: DraftShape, tokenizer: Any) -> Any:
    """The target's config at the draft's shape, checked against the tokenizer."""
    from transformers import AutoConfig

    values = target_config.to_dict()
    for key in (
        "layer_types",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
    ):
        values.pop(key, None)
    hidden = shape.hidden or target_config.hidden_size
    heads = shape.heads or (
        target_config.num_attention_heads if shape.hidden is None else max(1, hidden // 64)
    )
    kv_heads = shape.kv_heads or min(heads, getattr(target_config, "num_key_value_heads", heads) or heads)
    if hidden % heads:
        raise SpecdecError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    if heads % kv_heads:
        raise SpecdecError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    if shape.layers < 1:
        raise SpecdecError(f"--layers must be >= 1, got {shape.layers}")
    if shape.shared_layers:
        if shape.shared_layers < 0 or shape.shared_layers + shape.layers > target_config.num_hidden_layers:
            raise SpecdecError(
                f"--shared-layers {shape.shared_layers} + --layers {shape.layers} must be at most the target's "
                f"{target_config.num_hidden_layers} layers"
            )
        narrowed = [
            f for f in ("hidden", "heads", "kv_heads", "intermediate") if getattr(shape, f) is not None
        ]
        if narrowed:
            raise SpecdecError(
                f"--shared-layers borrows the target's layers, so the draft keeps the target's shape; "
                f"drop --{narrowed[0].replace('_', '-')}"
            )
    vocab = shape.vocab_size or target_config.vocab_size
    if vocab < real_vocab_size(tokenizer):
        raise SpecdecError(
            f"--vocab-size {vocab} is smaller than the target's tokenizer ({real_vocab_size(tokenizer)} entries): "
            "the draft must be able to produce every token the target can"
        )
    values.update(
        num_hidden_layers=shape.shared_layers + shape.layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=shape.intermediate
        or (target_config.intermediate_size * hidden // target_config.hidden_size),
        vocab_size=vocab,
    )
    if shape.head_tokens is not None:
        if not 0 < shape.head_tokens <= vocab:
            raise SpecdecError(f"--head-tokens must be in [1, {vocab}], got {shape.head_tokens}")
        values["tie_word_embeddings"] = False  # the head has its own (fewer) rows
    if shape.share_embeddings and hidden != target_config.hidden_size:
        raise SpecdecError(
            f"--share-embeddings needs the target's hidden size {target_config.hidden_size}, not --hidden {hidden}"
        )
    if shape.hidden is not None or "head_dim" in values:
        values["head_dim"] = hidden // heads if shape.hidden is not None else values.get("head_dim")
    return AutoConfig.for_model(
        target_config.model_type, **{k: v for k, v in values.items() if k != "model_type"}
    )


def init_from_target(draft: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy every draft parameter whose name and shape match the target's (embeddings, final
    norm, head, and the first layers). Returns the names copied."""
    target_state = target.state_dict()
    copied = []
    with torch.no_grad():
        for name, param in draft.state_dict().items():
            source = target_state.get(name)
            if source is not None and source.shape == param.shape:
                param.copy_(source)
                copied.append(name)
    return copied


def measure_acceptance(
    target_dir: Path, draft_dir: Path, prompts: list[list[int]], max_new_tokens: int, gamma: int, device: str
) -> dict[str, float]:
    """Greedy speculative generation on held-out prompts with the real engine."""
    from specdec.config import EngineConfig
    from specdec.engine import Engine
    from specdec.request import Mode
    from specdec.sampling import SamplingParams

    engine = Engine(
        target=target_dir,
        draft=draft_dir,
        config=EngineConfig(
            max_batch_size=min(16, len(prompts)),
            max_context=max(len(p) for p in prompts) + max_new_tokens + 1,
            device=device,
            dtype="float32",
        ),
    )
    results = engine.generate(
        prompts,
        SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        mode=Mode.SPECULATIVE,
        num_speculative_tokens=gamma,
    )
    drafted = sum(r.stats.drafted_tokens for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    steps = sum(r.stats.verify_steps for r in results)
    emitted = sum(r.stats.emitted_by_verify for r in results)
    return {
        "acceptance_rate": round(accepted / max(1, drafted), 4),
        "mean_accepted_length": round(emitted / max(1, steps), 4),
    }


def heldout_prompts(docs: list[Document], tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from held-out documents, at deterministic positions
    spread over them (shorter prompts when the held-out text is short)."""
    per_doc = [tokenizer.encode(doc.text, add_special_tokens=False) for doc in docs]
    total = sum(len(ids) for ids in per_doc)
    if total < 8:
        raise SpecdecError("the held-out documents are too short to make evaluation prompts")
    length = min(length, total // 2)
    prompts = []
    for ids in per_doc:
        for start in range(0, max(0, len(ids) - 2 * length), 4 * length):
            prompts.append(ids[start : start + length])
            if len(prompts) >= count:
                return prompts
    if not prompts:  # every document shorter than a prompt: use the start of their concatenation
        joined = [t for ids in per_doc for t in ids]
        prompts = [joined[:length]]
    return prompts


def run_distill(
    target_dir: Path,
    out_dir: Path,
    data: list[str | Path],
    shape: DraftShape,
    config: TrainConfig,
    heldout_fraction: float = 0.05,
    self_generated: float = 0.0,
    init_from: bool = True,
    resume: bool = False,
    split: tuple[list[Document], list[Document]] | None = None,
    teacher_top_k: int = 0,
    save_dtype: torch.dtype = torch.float32,
    feature_unroll: int = 2,
    feature_weight: float = 0.0,
) -> TrainResult:
    """Distil a draft for the checkpoint `target_dir` (a directory, GGUF file or hub id) into
    `out_dir`: a normal HF checkpoint, or specdec's own when the draft has a subset head or borrows
    the target's embeddings (models.subset_head).

    `split` gives (train, held-out) documents directly; otherwise `data` is read and every
    round(1 / heldout_fraction)-th document is held out. `teacher_top_k` > 0: the target runs once
    over the training text and its top-k is kept (distill.teacher) instead of running every step.
    `save_dtype`: what the checkpoint stores (training itself is fp32). A feature-reading draft
    (`shape.feature_input`) trains on the cached teacher's features, `feature_unroll` passes each
    step, with `feature_weight` x the feature regression (distill.eagle)."""
    from transformers import AutoModelForCausalLM

    from specdec.distill.teacher import TeacherCache, topk_distill_loss
    from specdec.models.sources import resolve_checkpoint
    from specdec.models.subset_head import frequency_ranked, save_draft

    out_dir = Path(out_dir)
    target_dir = resolve_checkpoint(target_dir).path
    hf_config = read_hf_config(target_dir)  # our checks and messages first
    tokenizer = load_tokenizer(target_dir)
    if not 0 <= self_generated < 1:
        raise SpecdecError(f"--self-generated must be in [0, 1), got {self_generated}")
    if shape.feature_input:
        if not teacher_top_k:
            raise SpecdecError("--feature-input trains on the target's cached features: give --teacher-top-k")
        if shape.hidden is not None or shape.shared_layers:
            raise SpecdecError(
                "--feature-input reads the target's features at its hidden size, on no borrowed layers: "
                f"drop --{'hidden' if shape.hidden is not None else 'shared-layers'}"
            )
        if feature_unroll < 1:
            raise SpecdecError(f"--feature-unroll must be >= 1, got {feature_unroll}")
    train_docs, heldout_docs = (
        split if split is not None else split_heldout(read_documents(data), heldout_fraction)
    )
    train = TokenStream(train_docs, tokenizer)
    heldout = TokenStream(heldout_docs, tokenizer)
    vocab = real_vocab_size(tokenizer)
    device = config.device

    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).to(device).eval()
    target.requires_grad_(False)
    torch.manual_seed(config.seed)
    draft = AutoModelForCausalLM.from_config(
        draft_config(hf_config, shape, tokenizer), dtype=torch.float32
    ).to(device)
    copied = init_from_target(draft, target) if init_from else []
    head_ids: list[int] | None = None
    if shape.head_tokens is not None:
        head_ids = frequency_ranked(train.ids.tolist(), shape.head_tokens, always=tokenizer.all_special_ids)
        rows = target.get_output_embeddings().weight
        head = torch.nn.Linear(draft.config.hidden_size, len(head_ids), bias=False).to(device)
        if init_from and rows.shape[1] == draft.config.hidden_size:
            with torch.no_grad():
                head.weight.copy_(rows[torch.tensor(head_ids, device=rows.device)])
        draft.set_output_embeddings(head)
    if shape.share_embeddings:
        draft.set_input_embeddings(target.get_input_embeddings())  # frozen: the target's, never trained
    for i in range(shape.shared_layers):
        draft.model.layers[i] = target.model.layers[i]  # frozen likewise
    if shape.feature_input:
        from specdec.distill.eagle import add_feature_input

        add_feature_input(draft)
    head = torch.tensor(head_ids if head_ids is not None else range(vocab), device=device)
    eval_batches = heldout.eval_batches(config.batch_size, config.seq_len, max_batches=4)
    prompts = heldout_prompts(heldout_docs, tokenizer, count=16, length=48)

    def batch_for(step: int) -> torch.Tensor:
        batch = train.batch(config.seed, step, config.batch_size, config.seq_len)
        if self_generated and np.random.default_rng([config.seed, step, 1]).random() < self_generated:
            torch.manual_seed(config.seed + step)
            prefix = batch[:, : config.seq_len // 8].to(device)
            batch = target.generate(
                prefix, max_new_tokens=config.seq_len - prefix.shape[1], min_new_tokens=config.seq_len - prefix.shape[1],
                do_sample=True, temperature=1.0, top_k=0, pad_token_id=tokenizer.eos_token_id,
            ).cpu()  # fmt: skip
        return batch.to(device)

    def save(directory: Path) -> None:
        if (
            head_ids is None
            and not shape.share_embeddings
            and not shape.shared_layers
            and not shape.feature_input
        ):
            draft.save_pretrained(
                directory, state_dict={k: v.to(save_dtype) for k, v in draft.state_dict().items()}
            )
        else:
            save_draft(
                directory,
                draft.config.to_dict(),
                draft.state_dict(),
                head_ids,
                shape.share_embeddings,
                save_dtype,
                shape.shared_layers,
            )
        if not shape.share_embeddings:  # a draft that borrows the embeddings borrows the tokenizer too
            tokenizer.save_pretrained(directory)

    def evaluate() -> dict[str, Any]:
        if shape.feature_input:
            from specdec.distill.eagle import eagle_agreement

            metrics = eagle_agreement(
                target, draft, eval_batches, vocab, device, head if head_ids is not None else None
            )
        else:
            metrics = heldout_agreement(
                target, draft, eval_batches, vocab, device, head if head_ids is not None else None
            )
        save(out_dir)
        metrics.update(
            measure_acceptance(target_dir, out_dir, prompts, max_new_tokens=32, gamma=4, device=device)
        )
        return metrics

    if teacher_top_k:
        if self_generated:
            raise SpecdecError(
                "--teacher-top-k caches the target over the given text; it excludes --self-generated"
            )
        cache = TeacherCache.build(
            target, train, config.seq_len, head, teacher_top_k, device, keep_features=shape.feature_input
        )

        def loss_fn(step: int) -> torch.Tensor:
            tokens, logp, index = cache.batch(config.seed, step, config.batch_size)
            tokens, logp, index = tokens.to(device), logp.to(device), index.to(device)
            if shape.feature_input:
                from specdec.distill.eagle import eagle_loss

                assert cache.features is not None
                features = cache.features[cache.pick(config.seed, step, config.batch_size)].to(device).float()
                return eagle_loss(
                    draft, tokens, features, logp, index, len(head), feature_unroll, feature_weight
                )
            logits = draft(input_ids=tokens).logits[..., : len(head)]
            return topk_distill_loss(logits, logp, index)
    else:

        def loss_fn(step: int) -> torch.Tensor:
            return distill_loss(target, draft, batch_for(step), head)

    result = train_loop(
        draft,
        config,
        out_dir,
        loss_fn,
        evaluate,
        save,
        resume,
        label="distill",
    )
    summary = {
        "target": str(target_dir),
        "draft_shape": asdict(shape),
        "initialised_from_target": len(copied),
        "head_tokens": len(head_ids) if head_ids is not None else None,
        "teacher_top_k": teacher_top_k,
        "feature_unroll": feature_unroll if shape.feature_input else None,
        "feature_weight": feature_weight if shape.feature_input else None,
        "train_tokens": len(train),
        "heldout_tokens": len(heldout),
        "final": result.final,
    }
    (out_dir / "distill_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return result
