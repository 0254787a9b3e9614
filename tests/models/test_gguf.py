"""GGUF checkpoints: tiny files written with the `gguf` writer in every type it can write (and
K-quants packed by hand) load in specdec with the logits `transformers` computes from the same
file; a foreign or truncated file is refused naming the file; a conversion is made once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdec.errors import CheckpointError
from specdec.models import gguf_file
from specdec.models.loader import load_checkpoint
from specdec.testing import prompt_logits, random_prompt, write_tiny_checkpoint
from specdec.testing_gguf import gguf_logits, write_tiny_gguf

VOCAB = 300  # GGUF token lists are the vocabulary: no padded logits rows here


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": write_tiny_checkpoint(root / "llama", "llama", vocab_size=VOCAB, seed=11),
        "llama-tied": write_tiny_checkpoint(
            root / "llama-tied", "llama", vocab_size=VOCAB, tie_word_embeddings=True, seed=12
        ),
        "qwen2": write_tiny_checkpoint(root / "qwen2", "qwen2", vocab_size=VOCAB, seed=13),
        "llama-256": write_tiny_checkpoint(
            root / "llama-256", "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=256, seed=14
        ),
    }


CASES = [
    ("llama", "F32", None),
    ("llama", "F16", None),
    ("llama", "Q8_0", None),
    ("llama", "Q4_0", None),
    ("llama", "Q4_1", None),
    # SmolLM2's layout: tied embedding stored as Q8_0 (no output.weight), the rest Q4_1.
    ("llama-tied", "Q4_1", "Q8_0"),
    ("qwen2", "F32", None),
    ("qwen2", "Q8_0", None),
    # K-quants, hand-packed (the writer cannot quantize to them).
    ("llama-256", "Q4_K", "Q8_0"),
    ("llama-256", "Q6_K", "Q8_0"),
]


@pytest.mark.parametrize("name,qtype,embedding", CASES, ids=[f"{n}-{q}" for n, q, _ in CASES])
def test_gguf_logits_equal_transformers_on_the_same_file(hf, tmp_path, name, qtype, embedding):
    path = write_tiny_gguf(hf[name], tmp_path / f"{name}.{qtype}.gguf", qtype, embedding)
    loaded = load_checkpoint(path)
    assert loaded.name == f"{name}.{qtype}"
    tokens = random_prompt(torch.Generator().manual_seed(3), 16, VOCAB)
    expected = gguf_logits(path, tokens)
    torch.testing.assert_close(prompt_logits(loaded, tokens), expected, atol=2e-5, rtol=1e-4)
    if qtype == "F32":  # lossless: the permutation and the names round-trip to the original
        original = load_checkpoint(hf[name])
        torch.testing.assert_close(
            prompt_logits(loaded, tokens), prompt_logits(original, tokens), atol=1e-5, rtol=1e-5
        )


def test_tokenizer_and_chat_template_come_from_the_metadata(hf, tmp_path):
    path = write_tiny_gguf(hf["llama"], tmp_path / "t.gguf", "Q8_0")
    ours, original = load_checkpoint(path).tokenizer, load_checkpoint(hf["llama"]).tokenizer
    text = "def add(a, b):\n    return a + b  # héllo"
    assert ours.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert ours.eos_token_id == original.eos_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )


def test_a_file_is_converted_once(hf, tmp_path, monkeypatch):
    path = write_tiny_gguf(hf["llama"], tmp_path / "once.gguf", "Q4_0")
    calls = []
    real = gguf_file.convert_gguf
    monkeypatch.setattr(gguf_file, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = load_checkpoint(path).path
    second = load_checkpoint(path).path
    assert first == second and len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    os.utime(path)  # touched: the same file, not converted again
    assert load_checkpoint(path).path == first and len(calls) == 1
    # Replaced by another model of the same size, name and time: converted anew, never the stale one.
    stat = path.stat()
    weights = write_tiny_checkpoint(tmp_path / "llama-b", "llama", vocab_size=VOCAB, seed=99)
    other = write_tiny_gguf(weights, tmp_path / "other.gguf", "Q4_0")  # same shapes: same size
    assert other.stat().st_size == stat.st_size
    shutil.copyfile(other, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replaced = load_checkpoint(path).path
    assert replaced != first and len(calls) == 2


def test_convert_command_writes_a_checkpoint_that_loads_alike(hf, tmp_path):
    path = write_tiny_gguf(hf["qwen2"], tmp_path / "q.gguf", "Q8_0")
    out = tmp_path / "converted"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "specdec"), "convert", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tokens = random_prompt(torch.Generator().manual_seed(4), 12, VOCAB)
    torch.testing.assert_close(
        prompt_logits(load_checkpoint(out), tokens),
        prompt_logits(load_checkpoint(path), tokens),
        atol=0,
        rtol=0,
    )
    again = subprocess.run(
        [str(Path(sys.executable).parent / "specdec"), "convert", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_truncated_foreign_and_unsupported_files_are_refused_by_name(hf, tmp_path):
    good = write_tiny_gguf(hf["llama"], tmp_path / "good.gguf", "Q8_0")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CheckpointError, match=r"truncated\.gguf: (truncated: tensor|not a readable GGUF file .* truncated)"
    ):
        load_checkpoint(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"header\.gguf: not a readable GGUF file"):
        load_checkpoint(header_only)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"foreign\.gguf: not a GGUF file \(it starts with b'PK"):
        load_checkpoint(foreign)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"weights\.bin: not a directory or a GGUF file"):
        load_checkpoint(other)
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported; supported: llama"
    ):
        load_checkpoint(tmp_path / "gpt2.gguf")


def _hub_cache(root: Path, repo: str, checkpoint: Path, commit: str = "a" * 40) -> None:
    """The hub cache's layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, base / "snapshots" / commit)


def test_a_hub_id_resolves_through_the_local_cache_only(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _hub_cache(tmp_path / "hf-home", "TinyOrg/tiny-llama", hf["llama"])
    loaded = load_checkpoint("TinyOrg/tiny-llama")
    assert loaded.name == "TinyOrg/tiny-llama" and loaded.path.parent.name == "snapshots"
    tokens = random_prompt(torch.Generator().manual_seed(5), 10, VOCAB)
    torch.testing.assert_close(
        prompt_logits(loaded, tokens), prompt_logits(load_checkpoint(hf["llama"]), tokens)
    )
    with pytest.raises(
        CheckpointError, match=r"TinyOrg/absent: not in the local Hugging Face hub cache .*hf-home"
    ):
        load_checkpoint("TinyOrg/absent")
