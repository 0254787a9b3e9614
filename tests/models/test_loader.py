"""The loader: sharded checkpoints load, and every way a checkpoint can be wrong has a clear message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.errors import CheckpointError
from specdec.models import load_checkpoint
from specdec.testing import hf_reference, prompt_logits, random_prompt


@pytest.fixture
def copy_of(llama_path, tmp_path):
    def copy(name="ckpt"):
        dst = tmp_path / name
        shutil.copytree(llama_path, dst)
        return dst

    return copy


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_loads_and_matches(tmp_path, checkpoints):
    from transformers import AutoModelForCausalLM

    src = checkpoints("llama", hidden_size=64, num_layers=2)
    ref = hf_reference(src)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="40KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    tokens = random_prompt(torch.Generator().manual_seed(0), 10)
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(
        prompt_logits(load_checkpoint(sharded), tokens), expected, atol=2e-5, rtol=1e-4
    )


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: checkpoint directory does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(f)


def test_missing_config(copy_of):
    path = copy_of()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_checkpoint(path)


def test_unsupported_model_type(copy_of):
    path = copy_of()
    _edit_config(path, model_type="mamba")
    with pytest.raises(
        CheckpointError, match=r"config.json: unsupported model_type 'mamba'; supported: llama"
    ):
        load_checkpoint(path)


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic", "made-up"])
def test_unsupported_rope_type(copy_of, rope_type):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 8, long_factor=[1.0] * 8, original_max_position_embeddings=64)
    cfg["rope_parameters"] = params
    cfg.pop("rope_scaling", None)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=rf"unsupported RoPE type '{rope_type}'|cannot read this config"
    ):
        load_checkpoint(path)


def test_rope_type_from_transformers_4_rope_scaling(copy_of):
    """Older configs spell RoPE as rope_scaling + rope_theta; they load the same."""
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(path).config.rope.rope_type == "llama3"


def test_missing_weights_file(copy_of):
    path = copy_of()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_checkpoint(path)


def test_missing_shard(tmp_path, checkpoints):
    from transformers import AutoModelForCausalLM

    src = checkpoints("llama", hidden_size=64, num_layers=2)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="40KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, sharded)
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(
        CheckpointError, match=rf"{victim.name}: missing; it is listed in model.safetensors.index.json"
    ):
        load_checkpoint(sharded)


def test_missing_tokenizer(copy_of):
    path = copy_of()
    for f in path.glob("tokenizer*"):
        f.unlink()
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_checkpoint(path)


def test_truncated_safetensors(copy_of):
    path = copy_of()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read .*truncated or corrupt"):
        load_checkpoint(path)


def test_missing_weight_name(copy_of):
    path = copy_of()
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"weights missing from the checkpoint: model.layers.1.mlp.down_proj.weight"
    ):
        load_checkpoint(path)


def test_unexpected_weight_name(copy_of):
    path = copy_of()
    weights = load_file(str(path / "model.safetensors"))
    weights["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"does not account for: model.layers.0.self_attn.mystery.weight"
    ):
        load_checkpoint(path)


def test_shape_mismatch(copy_of):
    path = copy_of()
    _edit_config(path, intermediate_size=96)  # the weights are 128 wide
    with pytest.raises(
        CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight .* does not match the config: expected"
    ):
        load_checkpoint(path)


def test_inconsistent_heads(copy_of):
    path = copy_of()
    _edit_config(path, num_key_value_heads=3)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_checkpoint_overwritten_in_place_does_not_change_the_loaded_weights(copy_of):
    """Weights loaded without a conversion (float32 served as float32, a subset head's token ids)
    must not stay safetensors' memory map of the file: `cp new/model.safetensors old/` under a
    running server once changed its token ids to garbage mid-request."""
    path = copy_of()
    loaded = load_checkpoint(path, dtype=torch.float32)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    file = path / "model.safetensors"
    zeroed = {k: torch.zeros_like(v) for k, v in load_file(str(file)).items()}
    data = bytearray(file.read_bytes())
    save_file(zeroed, str(path / "zeros.safetensors"), metadata={"format": "pt"})
    replacement = (path / "zeros.safetensors").read_bytes()
    assert len(replacement) == len(data)  # same header length: the same layout, other bytes
    with file.open("r+b") as f:  # in place, as cp does: the same inode, new contents
        f.write(replacement)
    assert any(v.abs().sum() > 0 for v in before.values())
    for key, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0, msg=key)
