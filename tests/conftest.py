"""Shared fixtures: tiny random checkpoints written once per session. Plain helpers (the
`transformers` reference, greedy comparison, χ²) are in `specdec.testing`."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

# Before anything imports triton: without a GPU, the kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One few-row matmul order for the whole suite (models.linear otherwise times both per shape and
# keeps the faster): results must not depend on how busy the machine was when a shape was first
# seen. tests/models/test_linear.py checks both orders and the measurement itself.
os.environ.setdefault("SPECDEC_FEW_ROW_MATMUL", "transposed")
# GGUF conversions go to a cache of this run's own, not the user's ~/.cache/specdec.
# (Removed by pytest_sessionfinish.)
os.environ["SPECDEC_CACHE"] = tempfile.mkdtemp(prefix="specdec-test-cache-")

import pytest

from specdec.testing import LLAMA3_ROPE, PADDED_VOCAB, PAIRS, write_tiny_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["SPECDEC_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """A factory of tiny checkpoints, cached by their arguments for the whole session."""
    made: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(arch: str = "llama", **kwargs):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in made:
            made[key] = write_tiny_checkpoint(root / f"{arch}-{len(made)}", arch, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoints):
    """The foundation's checkpoint: llama3 RoPE scaling and a padded vocabulary."""
    return checkpoints("llama", vocab_size=PADDED_VOCAB, rope_parameters=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def pairs(checkpoints, tmp_path_factory):
    """name -> (target path, draft path); plus name + '-close': a draft that is a perturbed copy of
    the target, so most drafts are accepted (exercises full accepts and bonus tokens)."""
    from specdec.testing import perturb_checkpoint

    made = {}

    def get(name: str):
        if name not in made:
            base = name.removesuffix("-close")
            arch, target_kwargs, draft_kwargs = PAIRS[base]
            target = checkpoints(arch, **target_kwargs)
            if name.endswith("-close"):
                draft = perturb_checkpoint(target, tmp_path_factory.mktemp(name), noise=0.05, seed=9)
            else:
                draft = checkpoints(arch, **draft_kwargs)
            made[name] = (target, draft)
        return made[name]

    return get


@pytest.fixture(scope="session")
def word_pair(checkpoints, tmp_path_factory):
    """A 16-word-vocabulary pair whose draft agrees with the target often but not always: small
    enough to enumerate the joint of three tokens exactly, for the χ² tests of sampling."""
    from specdec.testing import perturb_checkpoint

    target = checkpoints(
        "llama",
        tokenizer="words",
        tokenizer_vocab=16,
        vocab_size=16,
        num_layers=2,
        initializer_range=0.3,
        seed=41,
    )
    return target, perturb_checkpoint(target, tmp_path_factory.mktemp("noisy-draft"), noise=0.1, seed=42)
