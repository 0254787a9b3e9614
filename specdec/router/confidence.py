"""How sure the small model was of its answer, from its own probabilities of the tokens it emitted.

The probabilities are the primary model's raw ones (temperature 1, no top-k / top-p, its whole
vocabulary) of each emitted token, whatever transform the request sampled with: the sampling
transform says how the answer was drawn, not what the model believed. Four summaries:

- `mean_prob`: the mean probability. Dominated by the many easy tokens of any answer (punctuation,
  words copied from the prompt), so one unsure, decisive token barely moves it.
- `min_prob`: the least probable token. Sensitive to one unsure token, but it falls with length -
  a long answer has more chances of one low token - so long answers escalate more for no reason.
- `geometric_mean`: exp(mean log p), the per-token perplexity's inverse; a mean, with the same
  dilution as `mean_prob` (less so: log weights the low tokens up).
- `quantile` (with `q`, default 0.1): the q-quantile of the per-token probabilities - the
  published alternative to length-biased sums and means: stable in length (a fraction of the tokens,
  not one of them), yet it falls when a tenth of the answer is unsure. The default.

An answer with no tokens has confidence 0: there is nothing to trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.errors import SpecdecError

METHODS = ("quantile", "mean_prob", "min_prob", "geometric_mean")
DEFAULT_METHOD = "quantile"
DEFAULT_Q = 0.1


@dataclass(frozen=True)
class ConfidenceMethod:
    method: str = DEFAULT_METHOD
    q: float | None = None  # quantile only

    @staticmethod
    def make(method: object = None, q: object = None) -> ConfidenceMethod:
        """The method named `method` (None: the default), checked; `q` only with quantile."""
        method = DEFAULT_METHOD if method is None else method
        if method not in METHODS:
            raise SpecdecError(f"confidence: one of {', '.join(METHODS)}, got {method!r}")
        if method != "quantile":
            if q is not None:
                raise SpecdecError(f"q: only the quantile method takes q, not {method}")
            return ConfidenceMethod(str(method))
        q = DEFAULT_Q if q is None else q
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise SpecdecError(f"q: a quantile in [0, 1], got {q!r}")
        return ConfidenceMethod("quantile", float(q))

    def __call__(self, token_probs: torch.Tensor) -> float:
        """The confidence in [0, 1] of an answer whose emitted tokens had these probabilities (1-D)."""
        if token_probs.numel() == 0:
            return 0.0
        p = token_probs.double().clamp(0.0, 1.0)
        if self.method == "mean_prob":
            value = p.mean()
        elif self.method == "min_prob":
            value = p.min()
        elif self.method == "geometric_mean":
            value = p.clamp_min(1e-300).log().mean().exp()
        else:
            value = torch.quantile(p, self.q)
        return float(value)

    def __str__(self) -> str:
        return f"quantile(q={self.q:g})" if self.method == "quantile" else self.method
