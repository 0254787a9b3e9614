"""Turn host-side row descriptions into the device tensors of one ragged forward pass.

The scheduler knows every row's slot, length and pending tokens on the host (it reads them back
once per step anyway); this module packs them into the arrays of one ForwardBatch (`HostBatch`),
which a step stages with its other inputs for its one host-to-device copy (`specdec.staging`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.models.decoder import ForwardBatch
from specdec.staging import HostStaging

KV_LEN_BUCKET = 64  # attention extents are rounded up to this, so shapes repeat from step to step


@dataclass(slots=True)
class Row:
    slot: int
    start: int  # absolute position of tokens[0]
    tokens: list[int]  # the row's inputs this pass (may be empty only if logits are not wanted)


def kv_extent(max_end: int, capacity: int) -> int:
    """Cache positions attention must read: max_end rounded up to the bucket, within the cache
    (the last position is the scratch row and never attended)."""
    return min(-(-max_end // KV_LEN_BUCKET) * KV_LEN_BUCKET, capacity - 1)


def make_batch(
    rows: list[Row],
    device: torch.device,
    capacity: int,
    logits_columns: list[list[int]] | None = None,
    width: int | None = None,
) -> ForwardBatch:
    """A ForwardBatch of `rows` on `device`, in one host-to-device copy (`HostBatch`)."""
    staging = HostStaging()
    host = HostBatch.pack(rows, capacity, logits_columns, width).stage(staging)
    return host.on_device(staging.upload(device))


@dataclass(slots=True)
class HostBatch:
    """One ragged forward pass packed on the host: what a ForwardBatch holds, before the copy.

    A step stages all its passes' batches (and its other per-row inputs) in one `HostStaging`, so
    the device gets them in a single copy; `on_device` then makes each pass's ForwardBatch."""

    tokens: np.ndarray  # [B, width] int64, each row padded with zeros
    meta: np.ndarray  # [3, B] int64: slots, start, n_valid
    logits_index: np.ndarray | None  # [B, k] int64 columns whose logits are wanted
    kv_len: int
    first_slot: int | None
    handles: tuple[int, int, int | None] | None = None  # in the staging, once staged

    @staticmethod
    def pack(
        rows: list[Row],
        capacity: int,
        logits_columns: list[list[int]] | None = None,
        width: int | None = None,
    ) -> HostBatch:
        """`rows`, each padded to `width` (default: the longest row).

        logits_columns[b] lists the columns of row b whose logits are wanted; rows with fewer
        columns repeat their last one (the caller ignores the extras). None: logits for every
        column."""
        n = len(rows)
        width = width or max(len(r.tokens) for r in rows)
        tokens = np.zeros((n, width), dtype=np.int64)
        meta = np.zeros((3, n), dtype=np.int64)  # slots, start, n_valid
        for b, row in enumerate(rows):
            tokens[b, : len(row.tokens)] = row.tokens
            meta[:, b] = (row.slot, row.start, len(row.tokens))
        max_end = int((meta[1] + meta[2]).max()) if n else 1
        cols = None
        if logits_columns is not None:
            k = max((len(c) for c in logits_columns), default=0)
            cols = np.zeros((n, k), dtype=np.int64)
            for b, c in enumerate(logits_columns):
                if c:
                    cols[b, : len(c)] = c
                    cols[b, len(c) :] = c[-1]
        return HostBatch(
            tokens, meta, cols, kv_extent(max(max_end, 1), capacity), _first_of_consecutive(meta[0])
        )

    def stage(self, staging: HostStaging) -> HostBatch:
        index = None if self.logits_index is None else staging.add(self.logits_index)
        self.handles = (staging.add(self.tokens), staging.add(self.meta), index)
        return self

    def on_device(self, uploaded: list[torch.Tensor]) -> ForwardBatch:
        """The ForwardBatch, from the staging's upload."""
        assert self.handles is not None, "stage the batch before the upload"
        tokens, meta, index = self.handles
        meta_t = uploaded[meta]
        return ForwardBatch(
            tokens=uploaded[tokens],
            slots=meta_t[0],
            start=meta_t[1],
            n_valid=meta_t[2],
            kv_len=self.kv_len,
            logits_index=None if index is None else uploaded[index],
            first_slot=self.first_slot,
        )


def _first_of_consecutive(slots: np.ndarray) -> int | None:
    """slots[0] when the slots are slots[0], slots[0] + 1, ... in order; else None."""
    if len(slots) == 0 or not (np.diff(slots) == 1).all():
        return None
    return int(slots[0])
