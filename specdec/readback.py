"""The step's one device-to-host copy, and the typed view of what it brought back.

A step leaves its results on the device: accepted counts, emitted-token candidates and non-finite
flags per verified row, proposals and flags per drafting row, and log-probabilities where a request
asked for them. `HostCopy` gathers those tensors (int64, float32 and bool alike: each is viewed as
bytes), concatenates them on the device and copies them to the host at once, so the step waits for
the device exactly once. `StepReadback` is that copy unpacked by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.logprobs import Logprobs
from specdec.request import TokenLogprob
from specdec.timing import sync_point

_NUMPY = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int8: np.int8,
    torch.float32: np.float32,
    torch.bool: np.bool_,
}


class HostCopy:
    """Tensors to bring to the host in one copy. `add` returns a handle; `fetch` copies them all."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def add_logprobs(self, logprobs: Logprobs | None) -> tuple[int, int, int] | None:
        if logprobs is None:
            return None
        return self.add(logprobs.chosen), self.add(logprobs.top_values), self.add(logprobs.top_ids)

    def fetch(self, device: torch.device) -> list[np.ndarray]:
        """The host arrays, in the order added. The bytes are laid out widest element type first,
        so every array starts aligned to its own element size."""
        if not self._tensors:
            return []
        order = sorted(range(len(self._tensors)), key=lambda i: -self._tensors[i].element_size())
        parts = [self._tensors[i].contiguous().view(-1).view(torch.uint8) for i in order]
        with sync_point(device):
            host = torch.cat(parts).cpu().numpy()
        arrays: list[np.ndarray] = [np.empty(0)] * len(self._tensors)
        offset = 0
        for i, part in zip(order, parts):
            tensor = self._tensors[i]
            arrays[i] = host[offset : offset + part.numel()].view(_NUMPY[tensor.dtype]).reshape(tensor.shape)
            offset += part.numel()
        return arrays


@dataclass(slots=True)
class HostLogprobs:
    """Log-probabilities on the host, P positions per row (see `Logprobs`)."""

    chosen: np.ndarray  # [N, P]
    top_values: np.ndarray  # [N, P, n]
    top_ids: np.ndarray  # [N, P, n]

    @staticmethod
    def of(arrays: list[np.ndarray], handles: tuple[int, int, int] | None) -> HostLogprobs | None:
        return None if handles is None else HostLogprobs(*(arrays[h] for h in handles))

    def row(self, r: int, tokens: list[int], top_n: int) -> list[TokenLogprob]:
        """TokenLogprobs of row r's first len(tokens) positions, with the best top_n alternatives."""
        chosen = self.chosen[r].tolist()
        values = self.top_values[r, :, :top_n].tolist()
        ids = self.top_ids[r, :, :top_n].tolist()
        return [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, v, i in zip(tokens, chosen, values, ids)]


@dataclass(slots=True)
class VerifyReadback:
    """Per target-verified row."""

    accepted: list[int]  # drafts accepted
    status: list[int]  # specdec.kernels.status of the target's numbers for the row
    tokens: list[list[int]]  # emitted-token candidates: the row emits tokens[b][: accepted[b] + 1]
    logprobs: HostLogprobs | None  # of those candidates, when a row asked


@dataclass(slots=True)
class DraftReadback:
    """Per row the draft model ran on (model-drafted rows first, then draft-only rows)."""

    tokens: list[list[int]]  # the proposals (a draft-only row's output)
    status: list[int]  # specdec.kernels.status of the draft's numbers for the row
    logprobs: HostLogprobs | None  # of each proposal, when a draft-only row asked


@dataclass(slots=True)
class StepReadback:
    verify: VerifyReadback | None  # None when no row was target-verified
    draft: DraftReadback | None  # None when the draft model did not run
