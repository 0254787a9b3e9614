"""KV cache sizing from a memory budget (models.cache_plan): what flags leave open is sized to fit,
what they set is kept, and a budget too small says which flags to change."""

from __future__ import annotations

import logging

import pytest
import torch

from specdec import Engine
from specdec.config import EngineConfig
from specdec.errors import CapacityError
from specdec.models import cache_plan
from specdec.models.kv_cache import bytes_per_token
from specdec.models.loader import load_checkpoint

LOOKAHEAD = 10
CPU = torch.device("cpu")


@pytest.fixture
def model(llama_path):
    return load_checkpoint(llama_path).config


def test_sizes_from_the_budget_and_keeps_what_flags_set(model, monkeypatch):
    per_token = bytes_per_token(model, torch.float32)
    slot = (4096 + LOOKAHEAD + 1) * per_token  # one slot of the default context

    def plan(available, **kw):
        monkeypatch.setattr(cache_plan, "available_memory", lambda device: available)
        args = dict(max_batch_size=None, max_context=None, fraction=0.5) | kw
        return cache_plan.plan_cache(
            [model],
            torch.float32,
            CPU,
            LOOKAHEAD,
            4096,
            args["max_batch_size"],
            args["max_context"],
            args["fraction"],
        )

    roomy = plan(100 * slot)
    assert (roomy.slots, roomy.max_context) == (16, 4096) and roomy.nbytes == 16 * slot
    tight = plan(2 * 10.5 * slot)  # the budget (half) holds 10 slots
    assert (tight.slots, tight.max_context) == (10, 4096) and tight.nbytes <= tight.budget
    tiny = plan(2 * 0.5 * slot)  # not one slot of 4096: the context shrinks
    assert tiny.slots == 1 and 256 <= tiny.max_context < 4096 and tiny.nbytes <= tiny.budget
    fixed_slots = plan(2 * 4 * slot, max_batch_size=8)  # 8 slots asked: shorter contexts
    assert (
        fixed_slots.slots == 8 and fixed_slots.max_context < 4096 and fixed_slots.nbytes <= fixed_slots.budget
    )
    fixed_context = plan(2 * 4 * slot, max_context=1024)
    assert fixed_context.max_context == 1024 and fixed_context.slots == min(
        16, int(4 * slot // ((1024 + LOOKAHEAD + 1) * per_token))
    )
    both = plan(1, max_batch_size=3, max_context=100)  # flags override the budget
    assert (both.slots, both.max_context, both.budget) == (3, 100, 0)
    assert "set by --max-batch-size and --max-context" in both.describe()
    with pytest.raises(CapacityError, match=r"budget \(0.5 of available memory.*--kv-memory-fraction"):
        plan(1000)
    with pytest.raises(CapacityError, match="1 slot"):
        plan(2 * 0.5 * slot, max_context=4096)


def test_the_engine_sizes_its_caches_and_says_so(llama_path, caplog):
    with caplog.at_level(logging.INFO, logger="specdec"):
        engine = Engine(llama_path, config=EngineConfig(warmup=False, kv_memory_fraction=0.05))
    plan = engine.cache_plan
    assert engine.config.max_batch_size == plan.slots and engine.max_context == plan.max_context
    assert len(engine.scheduler.free_slots) == plan.slots
    assert engine.runner.target_cache.nbytes == plan.nbytes
    assert f"KV cache: {plan.slots} slots x {plan.max_context} tokens" in caplog.text
    with pytest.raises(Exception, match="kv_memory_fraction must be in"):
        EngineConfig(kv_memory_fraction=1.5)
