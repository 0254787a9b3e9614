"""The static KV cache: one slot per running sequence, rollback by length.

k, v: [layers, slots, kv_heads, capacity, head_dim]. A sequence owns one slot; the scheduler keeps its
length. Rolling back rejected draft tokens is setting that length: nothing is copied, and positions
past the length are simply never attended (every query attends only to positions <= its own).

The target of a feature-reading draft (EAGLE, ModelConfig.feature_input) also keeps each position's
final hidden state here, `features` [slots, capacity, hidden]: the draft's input at position p
reads the target's at p - 1. Like K/V they are overwritten, never copied, when a row rolls back.

capacity = max_context + lookahead + 1. The lookahead positions take the speculative writes past
the context limit (a verify of γ+1 tokens at the last position); the final position is a scratch
row where padded tokens of ragged batches write, so no real position is ever clobbered by padding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from specdec.errors import CapacityError
from specdec.models.config import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, features: bool = False) -> int:
    """KV bytes one token occupies across all layers (and its feature, when the cache keeps one)."""
    values = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim + (cfg.hidden_size if features else 0)
    return values * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation on `device` (GPU: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True, slots=True)
class CacheLayout:
    num_slots: int
    max_context: int  # longest sequence (prompt + generated) a slot holds
    lookahead: int  # positions past max_context for speculative writes

    @property
    def capacity(self) -> int:
        return self.max_context + self.lookahead + 1

    @property
    def scratch_position(self) -> int:
        return self.capacity - 1


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        layout: CacheLayout,
        dtype: torch.dtype,
        device: torch.device | str,
        memory_fraction: float = 0.9,
        features: bool = False,
    ):
        device = torch.device(device)
        self.layout = layout
        per_token = bytes_per_token(cfg, dtype, features)
        self.nbytes = layout.num_slots * layout.capacity * per_token
        free = available_memory(device)
        if self.nbytes > memory_fraction * free:
            raise CapacityError(
                f"KV cache needs {self.nbytes / 2**20:.1f} MiB ({layout.num_slots} slots x {layout.capacity} "
                f"positions x {per_token} bytes/token) but only {free / 2**20:.1f} MiB is "
                f"free on {device}: lower the number of slots (--max-batch-size) or the context length "
                "(--max-context)"
            )
        shape = (cfg.num_layers, layout.num_slots, cfg.num_kv_heads, layout.capacity, cfg.head_dim)
        # Zeros, not empty: padded queries read positions nobody wrote, and must read finite numbers.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.features: torch.Tensor | None = None
        if features:
            self.features = torch.zeros(
                (layout.num_slots, layout.capacity, cfg.hidden_size), dtype=dtype, device=device
            )

    def features_before(self, slots: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width, hidden]: for the tokens at positions start[b] + t of each row's slot, the
        feature of the position before (zeros before position 0, as in training)."""
        assert self.features is not None
        positions = start[:, None] + torch.arange(width, device=start.device)[None, :] - 1
        # Padding columns may run past the cache; they read any real row, which nothing uses.
        found = self.features[slots[:, None], positions.clamp(0, self.layout.capacity - 1)]
        return torch.where((positions >= 0)[..., None], found, 0.0)

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B * KVH * T]: where `write` puts k/v [B, KVH, T, D] of tokens at positions [B, T] of
        slots [B], as rows of one layer's cache viewed as [slots * KVH * capacity, D]. Built once
        a pass: each layer's write is then one index_copy_ instead of an advanced-index put."""
        heads = torch.arange(self.k.shape[2], device=slots.device)
        rows = (slots[:, None, None] * self.k.shape[2] + heads[None, :, None]) * self.layout.capacity
        return (rows + positions[:, None, :]).reshape(-1)

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, KVH, T, D] of `layer` at `index` (`write_index`)."""
        d = k.shape[-1]
        self.k[layer].view(-1, d).index_copy_(0, index, k.reshape(-1, d).to(self.k.dtype))
        self.v[layer].view(-1, d).index_copy_(0, index, v.reshape(-1, d).to(self.v.dtype))

    def read(
        self, layer: int, slots: torch.Tensor, kv_len: int, first_slot: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, KVH, kv_len, D] of each row's slot, positions [0, kv_len). When the rows hold
        consecutive slots from `first_slot`, a view of the cache (no copy); else a gather."""
        if first_slot is not None:
            end = first_slot + slots.shape[0]
            return self.k[layer, first_slot:end, :, :kv_len], self.v[layer, first_slot:end, :, :kv_len]
        return self.k[layer][slots, :, :kv_len], self.v[layer][slots, :, :kv_len]

    def describe(self) -> str:
        return (
            f"{self.layout.num_slots} slots x {self.layout.capacity} positions "
            f"({self.layout.max_context} context + {self.layout.lookahead} look-ahead + 1 scratch): "
            f"{self.nbytes / 2**20:.1f} MiB"
        )
