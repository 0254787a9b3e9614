"""Log-probabilities of emitted tokens under the producing model's raw logits (before the sampling
transform): computed on the device for the step's candidate tokens, read back in the step's one
copy (`readback.HostCopy`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities under the producing model's raw logits, for P positions per row."""

    chosen: torch.Tensor  # [N, P] of the token at each position
    top_values: torch.Tensor  # [N, P, n] best n, n >= 0
    top_ids: torch.Tensor  # [N, P, n]

    @staticmethod
    def of(logits: torch.Tensor, tokens: torch.Tensor, top_n: int, vocab: int) -> Logprobs:
        logp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)  # [N, P, V]
        chosen = logp.gather(-1, tokens[..., None])[..., 0]
        if top_n:
            values, ids = logp.topk(top_n, dim=-1)
        else:
            values = logp.new_empty((*tokens.shape, 0))
            ids = tokens.new_empty((*tokens.shape, 0))
        return Logprobs(chosen, values, ids)

    @staticmethod
    def concat(parts: list[Logprobs]) -> Logprobs | None:
        """Positions side by side ([N, P1] + [N, P2] -> [N, P1 + P2]); None for no parts."""
        if not parts:
            return None
        return Logprobs(
            torch.cat([lp.chosen for lp in parts], 1),
            torch.cat([lp.top_values for lp in parts], 1),
            torch.cat([lp.top_ids for lp in parts], 1),
        )
