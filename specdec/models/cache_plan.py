"""How many KV cache slots, and how long a context, the engine allocates: sized from a memory budget.

The caches are allocated whole at start-up (`kv_cache.KVCache`), so their size is what the process
costs before the first request. A fixed 16 slots x 4096 positions is 3 GiB for SmolLM2-135M in
fp32 - more than its weights ten times over, and too much for a laptop - so what is not fixed by a
flag is sized from a budget: `kv_memory_fraction` of the memory available now (CPU: MemAvailable,
shared with everything else on the machine, hence a small default; CUDA: free device memory after
the weights are loaded, the engine's to use).

Flags override: a given `max_batch_size` and `max_context` are used as given (only the hard check
in `KVCache`, memory_fraction of what is free, can refuse them). Otherwise the context is the
models' limit capped at DEFAULT_MAX_CONTEXT, and slots are as many as the budget holds, at most
DEFAULT_SLOTS; a given slot count with no context given shortens the context to fit instead; and
when not even one slot of the default context fits, the context shrinks, down to MIN_CONTEXT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.errors import CapacityError
from specdec.models.config import ModelConfig
from specdec.models.kv_cache import available_memory, bytes_per_token

DEFAULT_SLOTS = 16
DEFAULT_MAX_CONTEXT = 4096
MIN_CONTEXT = 256
DEFAULT_FRACTION = {"cpu": 0.1, "cuda": 0.9}


@dataclass(frozen=True, slots=True)
class CachePlan:
    slots: int
    max_context: int
    nbytes: int  # both caches
    budget: int  # bytes the budget allowed (0: flags fixed the size)
    available: int  # bytes available when it was planned

    def describe(self) -> str:
        gib = 2**30
        budget = (
            f"budget {self.budget / gib:.2f} GiB of {self.available / gib:.1f} GiB available"
            if self.budget
            else "size set by --max-batch-size and --max-context"
        )
        return (
            f"KV cache: {self.slots} slots x {self.max_context} tokens of context, "
            f"{self.nbytes / gib:.2f} GiB ({budget}; --max-batch-size, --max-context and "
            "--kv-memory-fraction change it)"
        )


def plan_cache(
    models: list[ModelConfig],
    dtype: torch.dtype,
    device: torch.device,
    lookahead: int,
    model_limit: int,
    max_batch_size: int | None,
    max_context: int | None,
    fraction: float | None,
    target_features: bool = False,
) -> CachePlan:
    """The slots and context for caches of `models` (target and draft) in `dtype` on `device`.
    target_features: the target's cache keeps its features too (a feature-reading draft's)."""
    per_token = sum(bytes_per_token(m, dtype, target_features and i == 0) for i, m in enumerate(models))

    def size(slots: int, context: int) -> int:
        return slots * (context + lookahead + 1) * per_token

    available = available_memory(device)
    if max_batch_size is not None and max_context is not None:
        return CachePlan(max_batch_size, max_context, size(max_batch_size, max_context), 0, available)
    fraction = fraction if fraction is not None else DEFAULT_FRACTION.get(device.type, 0.9)
    budget = int(fraction * available)
    wanted = max_context or min(model_limit, DEFAULT_MAX_CONTEXT)
    if max_batch_size is None:
        slots = min(DEFAULT_SLOTS, budget // size(1, wanted))
        if slots < 1 and max_context is not None:
            raise _too_small(1, wanted, size(1, wanted), budget, fraction)
        slots = max(slots, 1)
    else:
        slots = max_batch_size
    context = wanted
    if size(slots, wanted) > budget:  # only where no context was given: it shortens to fit
        context = min(wanted, _fitting_context(budget, slots, lookahead, per_token))
        floor = min(MIN_CONTEXT, wanted)
        if context < floor:
            raise _too_small(slots, floor, size(slots, floor), budget, fraction)
    return CachePlan(slots, context, size(slots, context), budget, available)


def _fitting_context(budget: int, slots: int, lookahead: int, per_token: int) -> int:
    return budget // (slots * per_token) - lookahead - 1


def _too_small(slots: int, context: int, needed: int, budget: int, fraction: float) -> CapacityError:
    return CapacityError(
        f"the KV cache budget ({fraction:g} of available memory, {budget / 2**20:.0f} MiB) does not hold "
        f"{slots} slot(s) of {context} tokens ({needed / 2**20:.0f} MiB): raise --kv-memory-fraction, or "
        "set --max-batch-size and --max-context yourself"
    )
