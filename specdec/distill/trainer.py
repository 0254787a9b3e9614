"""Training loops: next-token pretraining (the demo target) and distillation (a draft for a target).

Both run the same loop — AdamW, linear warm-up then cosine decay, gradient clipping, a progress bar,
periodic evaluation, checkpoints that `--resume` continues from exactly (the batch of step s depends
only on (seed, s), so no data-loader state needs saving). Models are `transformers` models here:
training is not the serving hot path, and what comes out is a normal Hugging Face checkpoint.

Distillation minimises KL(target || draft) over the tokenizer's real vocabulary, per position, on
the target's distributions over the training text.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdec.errors import SpecdecError

STATE_FILE = "training_state.pt"
HISTORY_FILE = "training_history.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) <= 0:
                raise SpecdecError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpecdecError(f"--lr must be positive, got {self.lr}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def train_loop(
    model: torch.nn.Module,
    config: TrainConfig,
    out_dir: Path,
    loss_fn: Callable[[int], torch.Tensor],
    evaluate: Callable[[], dict[str, Any]],
    save: Callable[[Path], None],
    resume: bool,
    label: str,
) -> TrainResult:
    """Run `config.steps` optimisation steps of `loss_fn(step)`; evaluate and checkpoint every
    `eval_every` steps and at the end. `save(out_dir)` writes the loadable checkpoint."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    start, history, elapsed = 0, [], 0.0
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        if not resume:
            raise SpecdecError(
                f"{out_dir} holds a training state; pass --resume to continue it or choose another --out"
            )
        state = torch.load(state_path, map_location=config.device, weights_only=False)
        if state["config"] != asdict(config):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(config).get(k))
            raise SpecdecError(
                f"cannot resume {out_dir}: the settings differ from the saved run ({', '.join(changed)})"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state["seconds"]
    elif resume:
        raise SpecdecError(f"--resume: {state_path} does not exist")

    model.train()
    t0 = time.monotonic()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=label, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            model.eval()
            with torch.no_grad():
                metrics = {"step": done, "train_loss": round(loss.item(), 4), **evaluate()}
            model.train()
            metrics["seconds"] = round(elapsed + time.monotonic() - t0, 1)
            history.append(metrics)
            bar.write(
                f"{label} step {done}: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "step")
            )
            save(out_dir)
            torch.save(
                {
                    "step": done,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "seconds": metrics["seconds"],
                    "config": asdict(config),
                },
                state_path,
            )
            (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    model.eval()
    return TrainResult(steps=config.steps, seconds=elapsed + time.monotonic() - t0, history=history)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def distill_loss(
    target: torch.nn.Module, draft: torch.nn.Module, batch: torch.Tensor, head: torch.Tensor
) -> torch.Tensor:
    """KL(target || draft) per position over the draft head's tokens `head` (the real vocabulary,
    or a subset head's tokens: the target renormalised over them), averaged."""
    with torch.no_grad():
        t_logp = F.log_softmax(target(input_ids=batch).logits[..., head].float(), dim=-1)
    d_logp = F.log_softmax(draft(input_ids=batch).logits[..., : len(head)].float(), dim=-1)
    return (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()


@torch.no_grad()
def heldout_lm_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    losses = [lm_loss(model, b.to(device)).item() for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def heldout_agreement(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    batches: list[torch.Tensor],
    vocab: int,
    device: str,
    head: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out KL(target || draft), top-1 agreement, and Σ min(p, q) (the expected per-token
    acceptance of sampling at temperature 1). `head`: a subset head's tokens (the draft's logits
    are over them, q is 0 elsewhere); KL is then over the target renormalised to the subset (it is
    infinite over the whole vocabulary), agreement and Σ min(p, q) over the whole vocabulary."""
    sums = {"heldout_kl": 0.0, "top1_agreement": 0.0, "sum_min_pq": 0.0}
    for batch in batches:
        batch = batch.to(device)
        t = F.log_softmax(target(input_ids=batch).logits[..., :vocab].float(), dim=-1)
        for name, value in agreement_metrics(t, draft(input_ids=batch).logits.float(), head).items():
            sums[name] += value
    return {name: round(value / len(batches), 4) for name, value in sums.items()}


def agreement_metrics(t: torch.Tensor, d_logits: torch.Tensor, head: torch.Tensor | None) -> dict[str, float]:
    """One batch's KL, top-1 agreement and Σ min(p, q) (see `heldout_agreement`): `t` the
    target's log-probabilities over the vocabulary, `d_logits` the draft's (over `head`'s tokens
    when it is a subset head)."""
    if head is None:
        d = F.log_softmax(d_logits[..., : t.shape[-1]], dim=-1)
        kl = (t.exp() * (t - d)).sum(-1).mean().item()
    else:
        d_sub = F.log_softmax(d_logits, dim=-1)
        t_sub = F.log_softmax(t[..., head], dim=-1)
        kl = (t_sub.exp() * (t_sub - d_sub)).sum(-1).mean().item()
        d = torch.full_like(t, float("-inf")).index_copy_(-1, head, d_sub)
    return {
        "heldout_kl": kl,
        "top1_agreement": (t.argmax(-1) == d.argmax(-1)).float().mean().item(),
        "sum_min_pq": torch.minimum(t.exp(), d.exp()).sum(-1).mean().item(),
    }
