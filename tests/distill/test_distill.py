"""`specdec distill` on tiny checkpoints: it learns, it resumes, and bad arguments are clear."""

from __future__ import annotations

import json

import pytest

from specdec.distill.distill import DraftShape, run_distill
from specdec.distill.trainer import TrainConfig
from specdec.errors import CheckpointError, SpecdecError
from specdec.models import load_checkpoint
from specdec.testing import _CORPUS, hf_reference


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"doc{i}.py").write_text("".join(_CORPUS[(i + j) % len(_CORPUS)] for j in range(30)))
    jsonl = root / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in _CORPUS[:10]))
    return root


@pytest.fixture(scope="module")
def target(checkpoints):
    return checkpoints("llama", num_layers=3, hidden_size=64, seed=51)


def _config(steps, **kw):
    return TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=steps, **kw)


def test_distill_reduces_heldout_kl_and_writes_a_checkpoint(tmp_path, target, corpus):
    out = tmp_path / "draft"
    before = run_distill(
        target, tmp_path / "untrained", [corpus], DraftShape(layers=1), _config(1), heldout_fraction=0.25
    )
    after = run_distill(target, out, [corpus], DraftShape(layers=1), _config(40), heldout_fraction=0.25)
    assert after.final["heldout_kl"] < 0.8 * before.final["heldout_kl"]
    assert 0 <= after.final["acceptance_rate"] <= 1 and after.final["mean_accepted_length"] >= 1
    # A normal checkpoint: our loader and transformers both load it.
    draft = load_checkpoint(out)
    assert (
        draft.config.num_layers == 1
        and draft.tokenizer.get_vocab() == load_checkpoint(target).tokenizer.get_vocab()
    )
    hf_reference(out)
    assert json.loads((out / "distill_summary.json").read_text())["initialised_from_target"] > 0


def test_resume_continues_an_interrupted_run_exactly(tmp_path, target, corpus, monkeypatch):
    """Stop a run after its step-4 checkpoint; --resume finishes it with the same weights as a
    run that was never interrupted (batches depend only on (seed, step))."""
    import torch

    import specdec.distill.distill as distill_module

    config = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=4, seed=4)
    run_distill(target, tmp_path / "straight", [corpus], DraftShape(layers=1), config)

    real_loss, calls = distill_module.distill_loss, {"n": 0}

    def failing_loss(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated interruption")
        return real_loss(*args)

    monkeypatch.setattr(distill_module, "distill_loss", failing_loss)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_distill(target, interrupted, [corpus], DraftShape(layers=1), config)
    monkeypatch.setattr(distill_module, "distill_loss", real_loss)
    assert torch.load(interrupted / "training_state.pt", weights_only=False)["step"] == 4
    with pytest.raises(SpecdecError, match="holds a training state; pass --resume"):
        run_distill(target, interrupted, [corpus], DraftShape(layers=1), config)
    resumed = run_distill(target, interrupted, [corpus], DraftShape(layers=1), config, resume=True)
    assert [h["step"] for h in resumed.history] == [4, 8]
    straight = torch.load(tmp_path / "straight" / "training_state.pt", weights_only=False)["model"]
    finished = torch.load(interrupted / "training_state.pt", weights_only=False)["model"]
    for name in straight:
        torch.testing.assert_close(finished[name], straight[name], atol=1e-5, rtol=1e-4)


def test_missing_target_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="checkpoint directory does not exist"):
        run_distill(tmp_path / "nope", tmp_path / "out", [corpus], DraftShape(), _config(1))


def test_empty_data_is_a_clear_error(tmp_path, target):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecdecError, match="no text found in --data"):
        run_distill(target, tmp_path / "out", [empty], DraftShape(), _config(1))
    with pytest.raises(SpecdecError, match="no such file or directory"):
        run_distill(target, tmp_path / "out", [tmp_path / "missing.txt"], DraftShape(), _config(1))


def test_draft_incompatible_with_the_tokenizer_is_a_clear_error(tmp_path, target, corpus):
    with pytest.raises(
        SpecdecError, match=r"--vocab-size 100 is smaller than the target's tokenizer \(300 entries\)"
    ):
        run_distill(target, tmp_path / "out", [corpus], DraftShape(vocab_size=100), _config(1))
    with pytest.raises(SpecdecError, match="--hidden 50 is not a multiple of --heads 4"):
        run_distill(target, tmp_path / "out", [corpus], DraftShape(hidden=50, heads=4), _config(1))


def test_bad_training_settings_are_clear_errors():
    with pytest.raises(SpecdecError, match="--steps must be positive"):
        TrainConfig(steps=0)


def test_a_subset_head_draft_with_shared_embeddings_learns_from_a_cached_teacher(tmp_path, target, corpus):
    """--head-tokens, --share-embeddings and --teacher-top-k together: the draft stores no embedding
    and a head of 64 rows, learns (held-out KL over the subset falls), and serves with its target."""
    import torch
    from safetensors.torch import load_file

    shape = DraftShape(layers=1, head_tokens=64, share_embeddings=True)
    before = run_distill(
        target, tmp_path / "untrained", [corpus], shape, _config(1), heldout_fraction=0.25, teacher_top_k=64
    )
    out = tmp_path / "subset"
    after = run_distill(target, out, [corpus], shape, _config(80), heldout_fraction=0.25, teacher_top_k=64,
                        save_dtype=torch.bfloat16)  # fmt: skip
    assert after.final["heldout_kl"] < 0.8 * before.final["heldout_kl"]
    assert after.final["top1_agreement"] > 1.5 * before.final["top1_agreement"]
    assert after.final["acceptance_rate"] > 0
    stored = load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.weight" not in stored and stored["lm_head.weight"].shape[0] == 64
    assert (
        stored["lm_head.weight"].dtype == torch.bfloat16 and stored["lm_head.token_ids"].dtype == torch.int64
    )
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["head_tokens"] == 64 and summary["teacher_top_k"] == 64
    with pytest.raises(CheckpointError, match="borrows its input embeddings"):
        load_checkpoint(out)


def test_a_draft_on_the_targets_first_layers_trains_only_its_own(tmp_path, target, corpus):
    """--shared-layers: the target's first layers stay frozen under the trained one; the file holds
    only the trained layer (layer 1 of 2), and the draft serves with its
    target, greedy output equal to the target alone."""
    import torch
    from safetensors.torch import load_file

    from specdec import Engine, SamplingParams
    from specdec.config import EngineConfig
    from specdec.request import Mode

    shape = DraftShape(layers=1, shared_layers=1, head_tokens=64, share_embeddings=True)
    out = tmp_path / "layered"
    result = run_distill(target, out, [corpus], shape, _config(20), heldout_fraction=0.25, teacher_top_k=64)
    assert result.final["acceptance_rate"] > 0
    stored = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("model.layers.0.") for k in stored)
    assert "model.layers.1.self_attn.q_proj.weight" in stored
    theirs = load_file(str(target / "model.safetensors"))
    mine = load_file(str(out / "model.safetensors"))
    # Trained from the target's layer 1: it moved, and the borrowed layer 0 was never written.
    assert not torch.equal(
        mine["model.layers.1.mlp.up_proj.weight"], theirs["model.layers.1.mlp.up_proj.weight"]
    )
    config = EngineConfig(max_batch_size=2, max_context=96, warmup=False)
    engine = Engine(target, out, config=config)
    assert engine.draft.config.shared_layers == 1 and engine.draft.config.num_layers == 2
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=3)
    expected = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    with pytest.raises(
        SpecdecError, match="--shared-layers 3 \\+ --layers 1 must be at most the target's 3 layers"
    ):
        run_distill(target, tmp_path / "deep", [corpus], DraftShape(layers=1, shared_layers=3), _config(1))
    with pytest.raises(SpecdecError, match="drop --hidden"):
        run_distill(
            target,
            tmp_path / "narrow",
            [corpus],
            DraftShape(layers=1, shared_layers=1, hidden=32),
            _config(1),
        )


def test_a_feature_reading_draft_learns_from_the_targets_features(tmp_path, target, corpus):
    """--feature-input (EAGLE): trained on the cached teacher's features, unrolled over two passes;
    it learns (held-out KL and agreement of both passes improve), stores its fc beside one layer and
    a subset head, and serves with its target, greedy output equal to the target alone."""
    from safetensors.torch import load_file

    from specdec import Engine, SamplingParams
    from specdec.config import EngineConfig
    from specdec.request import Mode

    shape = DraftShape(layers=1, head_tokens=64, share_embeddings=True, feature_input=True)
    before = run_distill(
        target, tmp_path / "untrained", [corpus], shape, _config(1), heldout_fraction=0.25, teacher_top_k=64
    )
    out = tmp_path / "eagle"
    after = run_distill(target, out, [corpus], shape, _config(60), heldout_fraction=0.25, teacher_top_k=64)
    assert after.final["heldout_kl"] < 0.8 * before.final["heldout_kl"]
    assert after.final["top1_agreement"] > before.final["top1_agreement"]
    assert after.final["top1_agreement_pass2"] > before.final["top1_agreement_pass2"]
    assert after.final["acceptance_rate"] > 0
    stored = load_file(str(out / "model.safetensors"))
    assert stored["model.fc.weight"].shape == (64, 128) and "model.embed_tokens.weight" not in stored
    assert json.loads((out / "config.json").read_text())["specdec_feature_input"] is True
    engine = Engine(target, out, config=EngineConfig(max_batch_size=2, max_context=96, warmup=False))
    assert engine.draft.config.feature_input and engine.runner.target_cache.features is not None
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = engine.generate(prompts, params, mode=Mode.SPECULATIVE, num_speculative_tokens=3)
    expected = engine.generate(prompts, params, mode=Mode.TARGET)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert sum(r.stats.accepted_tokens for r in got) > 0
    with pytest.raises(SpecdecError, match="--feature-input trains on the target's cached features"):
        run_distill(target, tmp_path / "x", [corpus], shape, _config(1), heldout_fraction=0.25)
    with pytest.raises(SpecdecError, match="drop --hidden"):
        run_distill(
            target, tmp_path / "y", [corpus], DraftShape(hidden=32, feature_input=True), _config(1),
            teacher_top_k=8,
        )  # fmt: skip
