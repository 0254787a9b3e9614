"""Shared fixtures: tiny random checkpoints written once per session, and reference helpers."""

from __future__ import annotations

import os

import torch

# Before anything imports triton: without a GPU, the kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from specdec.testing import write_tiny_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))

TOKENIZER_VOCAB = 300
PADDED_VOCAB = 320  # logits width > tokenizer vocabulary, as in many real checkpoints

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


# name -> (model_type, checkpoint kwargs). Each is a distinct feature set of the one decoder.
ARCHITECTURES = {
    "llama": ("llama", {"vocab_size": PADDED_VOCAB, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope-tied": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
            "tie_word_embeddings": True,
        },
    ),
    "llama-bias-mha": ("llama", {"attention_bias": True, "mlp_bias": True, "num_kv_heads": 4}),
    "mistral": ("mistral", {"vocab_size": PADDED_VOCAB}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"vocab_size": PADDED_VOCAB}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"vocab_size": PADDED_VOCAB}),
}


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


def hf_reference(path):
    """The `transformers` model of a checkpoint, fp32 with eager attention: the ground truth."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval().requires_grad_(False)


def random_prompt(generator: torch.Generator, length: int, vocab: int = TOKENIZER_VOCAB) -> list[int]:
    # Ids from 3 up: 0..2 are the special tokens (EOS would end generation at once).
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, vocab: int = TOKENIZER_VOCAB) -> list[int]:
    """`transformers` greedy generation, padded ids suppressed (specdec never emits them)."""
    width = model.config.vocab_size
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        suppress_tokens=list(range(vocab, width)) or None,
        pad_token_id=model.config.eos_token_id,
    )
    return out[0, len(prompt) :].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def is_near_tie(model, prefix: list[int], vocab: int = TOKENIZER_VOCAB, eps: float = 1e-5) -> bool:
    """Whether the reference's top-2 logits after `prefix` are within eps: batched and single-row
    numerics may legitimately pick different tokens there."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1, :vocab]
    top2 = logits.topk(2).values
    return bool(top2[0] - top2[1] < eps)


def assert_greedy_equal(reference_model, prompt, ours, theirs, vocab=TOKENIZER_VOCAB) -> bool:
    """Assert two greedy continuations agree token for token; a divergence is tolerated only at an
    exact near-tie of the reference (returns False then, so the caller can count skips)."""
    i = first_divergence(ours, theirs)
    if i is None:
        return True
    if i < min(len(ours), len(theirs)) and is_near_tie(reference_model, prompt + theirs[:i], vocab):
        return False
    raise AssertionError(f"greedy outputs diverge at token {i}:\n ours   {ours}\n theirs {theirs}")


# Draft/target pairs: (target model_type, target kwargs, draft kwargs). The drafts are shallower
# and narrower, share the tokenizer, and (for some) pad their vocabulary differently.
PAIRS = {
    "llama": (
        "llama",
        {"vocab_size": PADDED_VOCAB, "num_layers": 3, "seed": 1},
        {"vocab_size": 310, "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "seed": 2},
    ),
    "qwen2": (
        "qwen2",
        {"num_layers": 3, "seed": 3},
        {"num_layers": 1, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "seed": 4},
    ),
    "gemma2": (
        "gemma2",
        {"vocab_size": PADDED_VOCAB, "num_layers": 2, "seed": 5},
        {"num_layers": 1, "hidden_size": 32, "head_dim": 16, "seed": 6},
    ),
}


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


def chi_square_pvalue(observed, expected_probs, min_expected: float = 5.0) -> float:
    """Pearson χ² goodness of fit, merging (smallest first) bins whose expected count is below
    `min_expected` into one, so the χ² approximation holds."""
    import numpy as np
    from scipy.stats import chi2

    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    n = observed.sum()
    expected = probs / probs.sum() * n
    assert observed[expected == 0].sum() == 0, "an outcome with probability 0 was observed"
    keep = expected >= min_expected
    obs = list(observed[keep])
    exp = list(expected[keep])
    if (~keep).any():
        obs.append(observed[~keep].sum())
        exp.append(expected[~keep].sum())
        if exp[-1] < min_expected and len(exp) > 1:  # fold a still-small remainder into the smallest bin
            i = int(np.argmin(exp[:-1]))
            exp[i] += exp.pop()
            obs[i] += obs.pop()
    obs, exp = np.array(obs), np.array(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(chi2.sf(stat, df=len(exp) - 1))
