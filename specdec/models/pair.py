"""Whether a draft and a target can be paired: they must share a tokenizer."""

from __future__ import annotations

from specdec.errors import IncompatiblePairError
from specdec.models.loader import LoadedModel


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose tokenizer maps tokens to ids differently from the target's.

    Logits widths may differ (checkpoints pad the vocabulary differently); the token <-> id mapping
    may not. A feature-reading draft (ModelConfig.feature_input) must also have the target's
    hidden size: it reads the target's final hidden states."""
    if draft.config.feature_input and draft.config.hidden_size != target.config.hidden_size:
        raise IncompatiblePairError(
            f"draft {draft.path} reads its target's features (specdec_feature_input) at hidden size "
            f"{draft.config.hidden_size}, but target {target.path} has hidden size {target.config.hidden_size}"
        )
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab == d_vocab:
        return
    only_t = sorted(set(t_vocab) - set(d_vocab))
    only_d = sorted(set(d_vocab) - set(t_vocab))
    moved = sorted(k for k in set(t_vocab) & set(d_vocab) if t_vocab[k] != d_vocab[k])
    details = []
    if len(t_vocab) != len(d_vocab):
        details.append(f"target tokenizer has {len(t_vocab)} entries, draft {len(d_vocab)}")
    if only_t:
        details.append(f"{len(only_t)} tokens only in the target's (e.g. {only_t[:3]})")
    if only_d:
        details.append(f"{len(only_d)} tokens only in the draft's (e.g. {only_d[:3]})")
    if moved:
        k = moved[0]
        details.append(
            f"{len(moved)} tokens with different ids (e.g. {k!r}: target {t_vocab[k]}, draft {d_vocab[k]})"
        )
    raise IncompatiblePairError(
        f"draft {draft.path} and target {target.path} do not share a tokenizer: " + "; ".join(details)
    )
