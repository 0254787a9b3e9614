"""Drafts with a small output head and borrowed embeddings (models.subset_head): the logits are
the full head's on the subset and -inf elsewhere; greedy speculation with such a draft is the target
alone token for token, tokens outside the subset included; bad files are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import CheckpointError, InvalidRequestError
from specdec.models.loader import load_checkpoint
from specdec.models.subset_head import frequency_ranked, restrict_checkpoint
from specdec.request import Mode
from specdec.testing import prompt_logits, random_prompt

SUBSET = sorted(range(0, 300, 3))  # 100 of the 300 tokens


@pytest.fixture(scope="module")
def close_pair(pairs):
    return pairs("llama-close")


def test_subset_logits_are_the_full_heads_on_the_subset_and_minus_inf_elsewhere(close_pair, tmp_path):
    _target, draft = close_pair
    full = load_checkpoint(draft)
    cut = load_checkpoint(restrict_checkpoint(draft, tmp_path / "cut", SUBSET))
    assert cut.config.head_tokens == len(SUBSET) and cut.model.lm_head.weight.shape[0] == len(SUBSET)
    assert cut.config.num_parameters() < full.config.num_parameters()
    tokens = random_prompt(torch.Generator().manual_seed(1), 12)
    ours, reference = prompt_logits(cut, tokens), prompt_logits(full, tokens)
    assert ours.shape == reference.shape
    inside = torch.tensor(SUBSET)
    torch.testing.assert_close(ours[:, inside], reference[:, inside])
    outside = torch.ones(ours.shape[-1], dtype=torch.bool)
    outside[inside] = False
    assert torch.isneginf(ours[:, outside]).all()


def test_shared_embeddings_are_the_targets_tensor_and_required(close_pair, tmp_path):
    target_dir, draft = close_pair
    shared = restrict_checkpoint(draft, tmp_path / "shared", SUBSET, share_embeddings=True)
    target = load_checkpoint(target_dir)
    loaded = load_checkpoint(shared, borrow_from=target)
    assert loaded.model.embed_tokens.weight is target.model.embed_tokens.weight
    with pytest.raises(
        CheckpointError, match=r"shared: this draft borrows its input embeddings from its target"
    ):
        load_checkpoint(shared)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (shared / name).unlink(missing_ok=True)  # then it borrows the tokenizer too
    assert load_checkpoint(shared, borrow_from=target).tokenizer is target.tokenizer
    narrow = load_checkpoint(draft)  # given an embedding of another shape below
    narrow.model.embed_tokens = torch.nn.Embedding(320, 8)
    with pytest.raises(CheckpointError, match=r"whose embedding is \(320, 8\)"):
        load_checkpoint(shared, borrow_from=narrow)


def test_corrupt_subset_ids_are_refused(close_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    path = restrict_checkpoint(close_pair[1], tmp_path / "bad", SUBSET)
    state = load_file(str(path / "model.safetensors"))
    state["lm_head.token_ids"][0] = 10_000
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head.token_ids has ids outside \[0, "):
        load_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot be tied"):
        load_checkpoint(path)


def test_greedy_with_a_subset_draft_is_the_target_alone_and_emits_tokens_outside_it(close_pair, tmp_path):
    target_dir, draft = close_pair
    config = EngineConfig(max_batch_size=4, max_context=96, warmup=False)
    alone = Engine(target_dir, config=config)
    prompts = [random_prompt(torch.Generator().manual_seed(s), 8) for s in range(4)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    expected = alone.generate(prompts, params, mode=Mode.TARGET)
    # The subset: the tokens the target emits most, but not all of them.
    emitted = [t for r in expected for t in r.token_ids]
    subset = frequency_ranked(emitted, size=len(set(emitted)) // 2)
    shared = restrict_checkpoint(draft, tmp_path / "subset", subset, share_embeddings=True)
    engine = Engine(target_dir, shared, config=config)
    assert engine.vocab_size == alone.vocab_size  # the head's width is not the vocabulary
    got = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=3)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert any(t not in subset for r in got for t in r.token_ids)
    assert sum(r.stats.accepted_tokens for r in got) > 0
    # It only speculates: it cannot answer alone (most of the vocabulary is out of its reach).
    with pytest.raises(InvalidRequestError, match="mode draft needs a draft that can answer alone"):
        engine.generate(prompts[:1], params, mode=Mode.DRAFT)
    assert not engine.limits.draft_answers and alone.limits.default_mode is Mode.TARGET


def test_frequency_ranking_keeps_the_always_tokens_and_fills_up():
    assert frequency_ranked([5, 5, 5, 7, 7, 9], size=2) == [5, 7]
    assert frequency_ranked([5, 5, 5, 7, 7, 9], size=3, always=[2]) == [2, 5, 7]
    assert frequency_ranked([4], size=3) == [0, 1, 4]


def _layered_draft(target_dir, draft_dir, out, shared_layers):
    """A 2-layer draft: the target's layer 0 under the (perturbed) draft's layer 1, its norm and
    head; `shared_layers` = 1 leaves layer 0 out of the file, to be borrowed from the target."""
    import shutil

    from safetensors.torch import load_file

    from specdec.models.subset_head import save_draft

    shutil.copytree(draft_dir, out)
    config = json.loads((draft_dir / "config.json").read_text())
    config.update(num_hidden_layers=2)
    config.pop("layer_types", None)
    theirs = load_file(str(target_dir / "model.safetensors"))
    state = {
        k: v
        for k, v in load_file(str(draft_dir / "model.safetensors")).items()
        if not k.startswith("model.layers.") or k.startswith("model.layers.1.")
    }
    state.update({k: v for k, v in theirs.items() if k.startswith("model.layers.0.")})
    save_draft(out, config, state, None, False, torch.float32, shared_layers)
    return out


def test_shared_layers_are_the_targets_tensors_and_required(close_pair, pairs, tmp_path):
    from safetensors import safe_open

    target_dir, draft = close_pair
    target = load_checkpoint(target_dir)
    full = load_checkpoint(_layered_draft(target_dir, draft, tmp_path / "full", shared_layers=0))
    shared_dir = _layered_draft(target_dir, draft, tmp_path / "shared", shared_layers=1)
    with safe_open(str(shared_dir / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert (
        not any(k.startswith("model.layers.0.") for k in stored)
        and "model.layers.1.mlp.up_proj.weight" in stored
    )
    shared = load_checkpoint(shared_dir, borrow_from=target)
    assert shared.config.shared_layers == 1
    assert shared.config.num_parameters() < full.config.num_parameters()
    theirs = dict(target.model.named_parameters())
    for name, param in shared.model.named_parameters():
        if name.startswith("layers.0."):
            assert param is theirs[name]  # the same tensor, not a copy
    tokens = random_prompt(torch.Generator().manual_seed(2), 12)
    torch.testing.assert_close(prompt_logits(shared, tokens), prompt_logits(full, tokens))

    with pytest.raises(CheckpointError, match=r"shared: this draft borrows its first layer from its target"):
        load_checkpoint(shared_dir)
    other_target = load_checkpoint(pairs("llama")[1])  # a narrower model: its layer 0 does not fit
    with pytest.raises(CheckpointError, match=r"borrows the target's layers\.0\..* but its config needs"):
        load_checkpoint(shared_dir, borrow_from=other_target)
    config = json.loads((shared_dir / "config.json").read_text())
    config.update(num_hidden_layers=6, specdec_shared_layers=5)
    (shared_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="borrows 5 layers from a target that has 3"):
        load_checkpoint(shared_dir, borrow_from=target)
    config.update(num_hidden_layers=2, specdec_shared_layers=2)
    (shared_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="a draft needs at least one layer of its own"):
        load_checkpoint(shared_dir, borrow_from=target)


def test_greedy_with_a_shared_layers_draft_is_the_target_alone(close_pair, tmp_path):
    target_dir, draft = close_pair
    config = EngineConfig(max_batch_size=4, max_context=96, warmup=False)
    prompts = [random_prompt(torch.Generator().manual_seed(s), 8) for s in range(4)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    expected = Engine(target_dir, config=config).generate(prompts, params, mode=Mode.TARGET)
    shared = _layered_draft(target_dir, draft, tmp_path / "shared", shared_layers=1)
    engine = Engine(target_dir, shared, config=config)
    assert engine.draft.config.shared_layers == 1
    got = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=3)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert sum(r.stats.accepted_tokens for r in got) > 0
