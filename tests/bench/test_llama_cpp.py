"""The llama.cpp anchor of `specdec bench` (optional: skipped where llama-cpp-python is not
installed, which is CI). It must decode the same model as specdec - on an F32 GGUF file the two
greedy outputs are the same tokens - and appear in the bench's report at batch size 1 only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is an optional extra (pip install 'specdec[llama-cpp]')"
)

from specdec.bench.llama_cpp import anchor_for
from specdec.models.loader import load_checkpoint
from specdec.testing import first_divergence, perturb_checkpoint, write_tiny_checkpoint
from specdec.testing_gguf import write_tiny_gguf

SPECDEC = shutil.which("specdec") or str(Path(sys.executable).parent / "specdec")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp")
    checkpoint = write_tiny_checkpoint(root / "hf", "llama", vocab_size=300, seed=21)
    return checkpoint, write_tiny_gguf(checkpoint, root / "tiny.gguf", "F32")


def test_llama_cpp_decodes_the_same_model(tiny_gguf):
    from specdec.config import EngineConfig
    from specdec.engine import Engine
    from specdec.request import Mode
    from specdec.sampling import SamplingParams

    _, gguf = tiny_gguf
    prompt = [5, 17, 42, 99, 7, 64]
    anchor = anchor_for(gguf, context=64, threads=1)
    assert anchor is not None
    theirs, seconds = anchor.greedy(prompt, 24)
    assert len(theirs) == 24 and seconds > 0
    engine = Engine(target=load_checkpoint(gguf), config=EngineConfig(max_batch_size=1, warmup=False))
    request = engine.make_request(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), Mode.TARGET, 0)
    [ours] = engine.generate([request])
    # Random tiny weights have near-ties that llama.cpp's float order may break the other way; the
    # first tokens must agree, and a divergence, if any, must come late.
    divergence = first_divergence(list(ours.token_ids), theirs)
    assert divergence is None or divergence >= 8, (ours.token_ids, theirs)


def test_bench_reports_llama_cpp_at_batch_size_one(tiny_gguf, tmp_path):
    checkpoint, gguf = tiny_gguf
    draft = perturb_checkpoint(checkpoint, tmp_path / "draft", noise=0.05, seed=3)
    out = tmp_path / "bench"
    proc = subprocess.run(
        [SPECDEC, "bench", "--target", str(gguf), "--draft", str(draft), "--batch-sizes", "1,2",
         "--gamma", "0,2", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1", "--no-hf",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = [r for r in result["rows"] if r["mode"] == "llama.cpp"]
    assert [r["batch_size"] for r in rows] == [1] and rows[0]["tokens_per_second"] > 0
    assert result["llama_cpp"]["gguf"] == str(gguf)
    assert "speedup_vs_target" in result["summary"][0]["modes"]["llama.cpp"]
