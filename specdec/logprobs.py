"""Log-probabilities of emitted tokens under the producing model's raw logits (before the sampling
transform): computed on the device for the step's candidate tokens, read back after its sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.request import TokenLogprob


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

    def host(self) -> tuple[list, list, list]:
        """(chosen, top values, top ids) as nested lists; called after the step's sync."""
        return self.chosen.cpu().tolist(), self.top_values.cpu().tolist(), self.top_ids.cpu().tolist()


def token_logprobs(
    chosen: list[float], values: list[list[float]], ids: list[list[int]], tokens: list[int], top_n: int
) -> list[TokenLogprob]:
    return [
        TokenLogprob(t, lp, list(zip(i[:top_n], v[:top_n])))
        for t, lp, v, i in zip(tokens, chosen, values, ids)
    ]
