"""The self-distillation data's instructions and which answers are sampled, with which seeds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from specdec.distill.chat_data import instructions, write_answers


class _RecordingEngine:
    """Just enough of `Engine` for write_answers: it records each request's sampling parameters."""

    def __init__(self):
        self.params = []
        self.tokenizer = SimpleNamespace(eos_token="<end>", decode=lambda ids: "prompt ")

    def render_chat(self, messages):
        return [1, 2, 3]

    def make_request(self, ids, params, mode):
        self.params.append(params)
        return SimpleNamespace(prompt_ids=ids)

    def generate(self, requests):
        done = SimpleNamespace(value="eos")
        return [SimpleNamespace(finish_reason=done, text="answer", token_ids=[7, 8]) for _ in requests]


def test_training_and_heldout_instructions_never_overlap():
    train, heldout = instructions(896), instructions(99, heldout=True)
    assert not set(train) & set(heldout) and len(set(train)) == 896
    with pytest.raises(ValueError, match="only 99 held-out"):
        instructions(100, heldout=True)


@pytest.mark.parametrize("all_sampled", [False, True])
def test_which_answers_are_sampled_and_their_seeds(tmp_path, all_sampled):
    """Half greedy by default (odd indices sampled); --all-sampled samples every one, and another
    seed gives every sampled answer a seed of its own, never one of the first set's."""
    sets = []
    for seed in (0, 1):
        engine = _RecordingEngine()
        out = tmp_path / f"{seed}.jsonl"
        tokens = write_answers(engine, instructions(6), out, 32, seed=seed, first=10, all_sampled=all_sampled)
        assert tokens == 12
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["text"] for line in lines] == ["prompt answer<end>"] * 6
        sampled = [p.temperature > 0 for p in engine.params]
        assert sampled == ([True] * 6 if all_sampled else [False, True] * 3)
        assert [line["sampled"] for line in lines] == sampled
        sets.append({p.seed for p in engine.params if p.temperature > 0})
    assert len(sets[0]) == len(sets[1]) == (6 if all_sampled else 3)
    assert not sets[0] & sets[1]
