"""Training a feature-reading draft (EAGLE): its input is the token and the target's own features.

A draft that sees only tokens must recompute, in one layer, what the target's thirty compute; one
trained on the little text a CPU can afford agrees with the target on about half of held-out next
tokens (docs/DEMO_MODELS.md). The target's final hidden state at the position before - what its
head reads to choose the token the draft now sees - already carries that context, so the draft's
input at position p is fc([embedding(token p), target feature(p - 1)]) and its job shrinks to one
more position. Its output is its own guess of the target's feature at p; the next drafting pass
reads that in place of the target's, which it does not have yet (`speculative.SpeculativeStep`).

Training unrolls those passes: pass 1 reads the target's features (cached with the teacher's
top-k, `teacher.TeacherCache`), pass k + 1 reads pass k's own outputs, and every pass is scored
against the target's distribution at its position - so the draft learns to draft from its own
guesses, as it will (the "training-time test" of EAGLE-3 and HASS, without their attention masks:
here every position of an unrolled pass reads the draft's own features, where at serving time the
committed positions read the target's). A regression of the draft's features onto the target's
(EAGLE-1's) is optional.

The draft is a `transformers` model of one layer with `model.fc` added; `transformers` cannot run
it (that is specdec's decoder, `ModelConfig.feature_input`), so it is saved as specdec's own
checkpoint (`models.subset_head.save_draft`), with `specdec_feature_input` in its config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specdec.distill.teacher import topk_distill_loss


def add_feature_input(draft: torch.nn.Module) -> None:
    """Give the `transformers` draft its fc: [embedding, feature] -> hidden, started as the
    embedding alone (so it starts where a token-only draft would, and learns to use the feature)."""
    hidden = draft.config.hidden_size
    param = draft.model.embed_tokens.weight
    fc = torch.nn.Linear(2 * hidden, hidden, bias=True, device=param.device)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[:, :hidden].copy_(torch.eye(hidden))
        fc.bias.zero_()
    draft.model.fc = fc
    draft.config.specdec_feature_input = True


def eagle_forward(
    draft: torch.nn.Module, tokens: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over the draft's head, its own features) [B, T, ·] for `tokens` [B, T] and the
    features of the positions before them [B, T, hidden] - specdec's decoder computes the same."""
    x = draft.model.embed_tokens(tokens)
    x = draft.model.fc(torch.cat([x, features.to(x.dtype)], dim=-1))
    hidden = draft.model(inputs_embeds=x).last_hidden_state  # after the draft's final norm
    return draft.lm_head(hidden), hidden


def features_before(features: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> the feature of the position before each (zeros before the first, as
    `KVCache.features_before` gives at position 0)."""
    return F.pad(features[:, :-1], (0, 0, 1, 0))


def eagle_loss(
    draft: torch.nn.Module,
    tokens: torch.Tensor,
    target_features: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_index: torch.Tensor,
    head_size: int,
    unroll: int,
    feature_weight: float = 0.0,
) -> torch.Tensor:
    """The mean over `unroll` passes of the top-k cross-entropy to the teacher (plus
    `feature_weight` x smooth-L1 of the draft's features to the target's)."""
    features = features_before(target_features)
    total = torch.zeros((), device=tokens.device)
    for _ in range(unroll):
        logits, hidden = eagle_forward(draft, tokens, features)
        total = total + topk_distill_loss(logits[..., :head_size], teacher_logp, teacher_index)
        if feature_weight:
            total = total + feature_weight * F.smooth_l1_loss(hidden.float(), target_features.float())
        features = features_before(hidden)
    return total / unroll


@torch.no_grad()
def eagle_agreement(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    batches: list[torch.Tensor],
    vocab: int,
    device: str,
    head: torch.Tensor | None,
    passes: int = 2,
) -> dict[str, float]:
    """Held-out metrics of pass 1 (reading the target's features) as `trainer.heldout_agreement`
    reports them, and the top-1 agreement of each later pass (reading the draft's own)."""
    from specdec.distill.trainer import agreement_metrics

    sums: dict[str, float] = {}
    for batch in batches:
        batch = batch.to(device)
        target_features = target.get_decoder()(input_ids=batch).last_hidden_state  # after its norm
        t = F.log_softmax(target.lm_head(target_features)[..., :vocab].float(), dim=-1)
        features = features_before(target_features)
        for k in range(passes):
            logits, hidden = eagle_forward(draft, batch, features)
            metrics = agreement_metrics(t, logits.float(), head)
            if k > 0:
                metrics = {f"top1_agreement_pass{k + 1}": metrics["top1_agreement"]}
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            features = features_before(hidden)
    return {name: round(value / len(batches), 4) for name, value in sums.items()}
