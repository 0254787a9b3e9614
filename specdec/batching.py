"""Turn host-side row descriptions into the device tensors of one ragged forward pass.

The scheduler knows every row's slot, length and pending tokens on the host (it reads them back
once per step anyway); this module packs them into one ForwardBatch with a single host-to-device
copy per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.models.decoder import ForwardBatch

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
    """A ForwardBatch of `rows`, each padded to `width` (default: the longest row).

    logits_columns[b] lists the columns of row b whose logits are wanted; rows with fewer columns
    repeat their last one (the caller ignores the extras). None: logits for every column."""
    n = len(rows)
    width = width or max(len(r.tokens) for r in rows)
    tokens = np.zeros((n, width), dtype=np.int64)
    meta = np.zeros((3, n), dtype=np.int64)  # slots, start, n_valid
    for b, row in enumerate(rows):
        tokens[b, : len(row.tokens)] = row.tokens
        meta[:, b] = (row.slot, row.start, len(row.tokens))
    max_end = int((meta[1] + meta[2]).max()) if n else 1
    index = None
    if logits_columns is not None:
        k = max((len(c) for c in logits_columns), default=0)
        cols = np.zeros((n, k), dtype=np.int64)
        for b, c in enumerate(logits_columns):
            if c:
                cols[b, : len(c)] = c
                cols[b, len(c) :] = c[-1]
        index = torch.from_numpy(cols).to(device, non_blocking=True)
    meta_t = torch.from_numpy(meta).to(device, non_blocking=True)
    return ForwardBatch(
        tokens=torch.from_numpy(tokens).to(device, non_blocking=True),
        slots=meta_t[0],
        start=meta_t[1],
        n_valid=meta_t[2],
        kv_len=kv_extent(max(max_end, 1), capacity),
        logits_index=index,
        first_slot=_first_of_consecutive(meta[0]),
    )


def _first_of_consecutive(slots: np.ndarray) -> int | None:
    """slots[0] when the slots are slots[0], slots[0] + 1, ... in order; else None."""
    if len(slots) == 0 or not (np.diff(slots) == 1).all():
        return None
    return int(slots[0])
