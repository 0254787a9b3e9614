"""The target's distributions over the training text, computed once (`--teacher-top-k`).

Running the target on every training batch makes it most of a distillation's cost when the target
is much larger than the draft (SmolLM2-135M against a 1-layer draft: the target pass is ~20x the
draft's forward and backward). Instead the training stream is cut into fixed windows, the target
runs over each once, and its top-k log-probabilities over the draft head's tokens are kept (fp16,
a few MB); steps then draw windows from this cache. Top-k (renormalised) rather than the whole
distribution: past the first few dozen tokens the target's probabilities are too small to move an
acceptance rate, and k = 64 keeps the cache small enough to hold in memory for any training set a
CPU run can afford.

Logits are computed only for the head's tokens (the target's final hidden states times the rows of
its output layer for those tokens), so a subset head never pays for the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from specdec.distill.data import TokenStream
from specdec.errors import SpecdecError


@dataclass(frozen=True)
class TeacherCache:
    windows: torch.Tensor  # [W, T] token ids
    logp: torch.Tensor  # [W, T, K] float16: the target's top-k log-probabilities, renormalised over the k
    index: torch.Tensor  # [W, T, K] int32: their positions in the head's token list
    # [W, T, hidden] float16: the target's final hidden states (after its final norm), kept for a
    # feature-reading draft (distill.eagle); None otherwise.
    features: torch.Tensor | None = None

    @staticmethod
    def build(
        target: torch.nn.Module,
        stream: TokenStream,
        seq_len: int,
        head_ids: torch.Tensor,
        top_k: int,
        device: str,
        batch_size: int = 8,
        keep_features: bool = False,
    ) -> TeacherCache:
        count = len(stream) // seq_len
        if count < 1:
            raise SpecdecError(
                f"the training text has {len(stream)} tokens, fewer than one window of {seq_len}"
            )
        windows = torch.from_numpy(stream.ids[: count * seq_len].reshape(count, seq_len).copy())
        head = target.get_output_embeddings().weight[head_ids.to(device)]
        k = min(top_k, len(head_ids))
        logps, indices, features = [], [], []
        from tqdm import tqdm

        with torch.no_grad():
            for start in tqdm(range(0, count, batch_size), desc="teacher", unit="batch"):
                ids = windows[start : start + batch_size].to(device)
                hidden = target.get_decoder()(input_ids=ids).last_hidden_state
                logits = F.linear(hidden, head).float()
                top, where = logits.topk(k, dim=-1)
                logps.append(F.log_softmax(top, dim=-1).half().cpu())
                indices.append(where.int().cpu())
                if keep_features:
                    features.append(hidden.half().cpu())
        return TeacherCache(
            windows, torch.cat(logps), torch.cat(indices), torch.cat(features) if keep_features else None
        )

    def __len__(self) -> int:
        return self.windows.shape[0]

    def pick(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """The `batch_size` windows of step `step`, drawn by (seed, step)."""
        return torch.from_numpy(np.random.default_rng([seed, step]).integers(0, len(self), size=batch_size))

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, teacher log-probs, their head positions) of `batch_size` windows drawn by (seed, step)."""
        pick = self.pick(seed, step, batch_size)
        return self.windows[pick], self.logp[pick].float(), self.index[pick].long()


def topk_distill_loss(
    draft_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_index: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the draft (logits over the head's tokens, [B, T, H]) against the teacher's
    renormalised top-k: KL(teacher_k || draft) up to the teacher's entropy, which is constant."""
    d_logp = F.log_softmax(draft_logits.float(), dim=-1).gather(-1, teacher_index)
    return -(teacher_logp.exp() * d_logp).sum(-1).mean()
