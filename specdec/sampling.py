"""Sampling parameters, and the one transform from logits to probabilities.

`transform_logits` is the only place temperature, top-k and top-p are applied. Draft logits and
target logits both go through it before acceptance, so the speculative guarantee is stated with
respect to its output: the emitted tokens follow the target's *transformed* distribution.
Greedy rows (temperature 0) never reach it: they take the argmax of the raw logits.

It is a pipeline of per-row steps on a [N, V] tensor, so per-position penalties and logit bias can
be added as further steps before temperature without touching the callers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from specdec.errors import InvalidRequestError
from specdec.staging import HostStaging

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# Temperatures below this are greedy (vLLM's rule): dividing logits by a temperature near zero
# overflows float32 (below about 1e-38 it gives inf / NaN), and far above that it is already argmax.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings. Defaults: greedy, 128 new tokens, no stop strings."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None  # None: the engine draws one, reported back (docs/API.md, Seeds)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives returned per token, when logprobs is set

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first field that is out of range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequestError(
                "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens}"
            )
        if math.isnan(self.temperature) or self.temperature < 0 or math.isinf(self.temperature):
            raise InvalidRequestError(
                "temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"must be in [0, 2**63 - 1], got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    "stop",
                    f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}",
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                "stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}",
            )
        for t in self.stop_token_ids:
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidRequestError(
                    "stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})"
                )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )


@dataclass(slots=True)
class SamplingTensors:
    """The per-row parameters of one batch, as device tensors, plus what the host knows about them."""

    temperature: torch.Tensor  # [N] float32, greedy rows hold 1.0 (they never use the result)
    top_k: torch.Tensor  # [N] int64, 0 = off
    top_p: torch.Tensor  # [N] float32
    greedy: torch.Tensor  # [N] bool
    sampled_rows: tuple[bool, ...]  # host-side, per row: does it sample (not greedy)
    truncating_rows: tuple[bool, ...]  # host-side, per row: does it sample with top-k or top-p

    @property
    def any_sampled(self) -> bool:
        """Is there any row to transform at all."""
        return any(self.sampled_rows)

    @property
    def any_truncation(self) -> bool:
        """Does any row use top-k or top-p (the sort is skipped if not)."""
        return any(self.truncating_rows)

    @staticmethod
    def from_params(params: list[SamplingParams], device: torch.device) -> SamplingTensors:
        staging = HostStaging()
        staged = SamplingTensors.stage(params, staging)
        return staged.on_device(staging.upload(device))

    @staticmethod
    def stage(params: list[SamplingParams], staging: HostStaging) -> StagedSampling:
        """The parameters' arrays, added to a step's one host-to-device copy (`specdec.staging`)."""
        floats = np.array(
            [[p.temperature if not p.greedy else 1.0 for p in params], [p.top_p for p in params]],
            dtype=np.float32,
        ).reshape(2, len(params))
        return StagedSampling(
            staging.add(floats),
            staging.add(np.array([p.top_k for p in params], dtype=np.int64)),
            staging.add(np.array([p.greedy for p in params], dtype=np.bool_)),
            tuple(not p.greedy for p in params),
            tuple(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params),
        )

    def take(self, rows: list[int], select: Callable[[torch.Tensor], torch.Tensor]) -> SamplingTensors:
        """The parameters of some rows: `select` takes them from each [N] tensor (a slice or a
        gather made by the caller, which knows how the rows lie), `rows` names them for the host."""
        return SamplingTensors(
            temperature=select(self.temperature),
            top_k=select(self.top_k),
            top_p=select(self.top_p),
            greedy=select(self.greedy),
            sampled_rows=tuple(self.sampled_rows[r] for r in rows),
            truncating_rows=tuple(self.truncating_rows[r] for r in rows),
        )

    def repeat_rows(self, n: int) -> SamplingTensors:
        """The same parameters for each of n consecutive positions per row ([N] -> [N * n])."""
        return SamplingTensors(
            temperature=self.temperature.repeat_interleave(n),
            top_k=self.top_k.repeat_interleave(n),
            top_p=self.top_p.repeat_interleave(n),
            greedy=self.greedy.repeat_interleave(n),
            sampled_rows=tuple(f for f in self.sampled_rows for _ in range(n)),
            truncating_rows=tuple(f for f in self.truncating_rows for _ in range(n)),
        )


@dataclass(frozen=True, slots=True)
class StagedSampling:
    """SamplingTensors staged for an upload: the handles of its arrays and the host-side flags."""

    floats: int  # [2, N] float32: temperature, top_p
    top_k: int
    greedy: int
    sampled_rows: tuple[bool, ...]
    truncating_rows: tuple[bool, ...]

    def on_device(self, uploaded: list[torch.Tensor]) -> SamplingTensors:
        floats = uploaded[self.floats]
        return SamplingTensors(
            floats[0],
            uploaded[self.top_k],
            floats[1],
            uploaded[self.greedy],
            self.sampled_rows,
            self.truncating_rows,
        )


def transform_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [N, V] -> transformed logits [N, V] float32: temperature, then top-k, then top-p.
    Removed entries are -inf. V must already be the real vocabulary (padded lanes sliced off)."""
    x = logits.float() / st.temperature[:, None]
    if st.any_truncation:
        x = _top_k_top_p(x, st.top_k, st.top_p)
    return x


def probabilities(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[N, V] probabilities of the transformed distribution (what acceptance compares). A row with
    no possible token (every logit -inf) has no mass - all zeros, not softmax's NaN - so the kernels
    tell it from bad numbers (a NaN or +inf logit still gives NaN)."""
    x = transform_logits(logits, st)
    p = torch.softmax(x, dim=-1)
    return p.masked_fill_((x.amax(dim=-1) == float("-inf"))[:, None], 0.0)


# Top-k / top-p read a row's best CANDIDATES logits, found by one partial selection (torch.topk),
# rather than sorting the whole vocabulary: for SmolLM2's 49152 entries a sort cost ~10 ms a row on
# this project's 2-core machine, as much as a decode pass, and a 1024-candidate topk under half a
# millisecond. A row whose kept tokens could reach past its candidates (top-k above CANDIDATES, or
# candidates holding less than top_p of the mass) is sorted whole instead. The count is fixed, not
# chosen per batch, so a row's result never depends on what else is in the batch. CPU only: which
# rows fall back is read on the host, which on a GPU would sync every step, and there the sort is
# cheap.
CANDIDATES = 1024


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return _top_k_top_p_sorted(x, top_k, top_p)
    vocab = x.shape[-1]
    n = min(vocab, CANDIDATES)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    cand_x, cand_ids = x.topk(n, dim=-1)  # sorted, best first
    ranks = torch.arange(n, device=x.device)[None, :]
    cand_x = cand_x.masked_fill(ranks >= k[:, None], float("-inf"))
    # Top-p on the top-k-renormalised distribution: when the top-k lies inside the candidates, its
    # normaliser is theirs; with no top-k it is the whole row's.
    inside = k <= n
    log_norm = torch.where(inside, torch.logsumexp(cand_x, dim=-1), torch.logsumexp(x, dim=-1))
    cand_p = torch.exp(cand_x - log_norm[:, None])
    mass = cand_p.cumsum(dim=-1)
    # Keep the shortest prefix whose mass reaches p (a token is dropped when the mass before it
    # already reaches p; the first is always kept).
    cand_x = cand_x.masked_fill(mass - cand_p >= top_p[:, None], float("-inf"))
    out = torch.full_like(x, float("-inf")).scatter_(-1, cand_ids, cand_x)
    untruncated = (k == vocab) & (top_p >= 1.0)  # keeps every token: nothing to choose
    exact = inside | untruncated | ((k == vocab) & (mass[:, -1] >= top_p))
    out = torch.where(untruncated[:, None], x, out)
    if not bool(exact.all()):
        rows = (~exact).nonzero().squeeze(1)
        out[rows] = _top_k_top_p_sorted(x[rows], top_k[rows], top_p[rows])
    return out


def _top_k_top_p_sorted(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_top_k_top_p` over the whole sorted row (its rows whose kept tokens may pass the candidates)."""
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_x = sorted_x.masked_fill(ranks >= k[:, None], float("-inf"))
    sorted_p = torch.softmax(sorted_x, dim=-1)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_x = sorted_x.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)
