"""ModelConfig translation: each family's flags, including configs written by transformers 4."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from specdec.errors import CheckpointError
from specdec.models.attention import math_attention, select_backend
from specdec.models.config import model_config_from_hf


def _hf(model_type, **kw):
    base = dict(
        model_type=model_type,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=128,
        vocab_size=300,
        rope_theta=10000.0,
        rope_scaling=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_transformers4_qwen2_sliding_from_max_window_layers():
    cfg = model_config_from_hf(_hf("qwen2", sliding_window=32, use_sliding_window=True, max_window_layers=2))
    assert cfg.sliding_windows == (None, None, 32, 32)
    assert cfg.qkv_bias and not cfg.o_bias
    off = model_config_from_hf(_hf("qwen2", sliding_window=32, use_sliding_window=False, max_window_layers=2))
    assert off.sliding_windows == (None,) * 4


def test_transformers4_gemma2_alternates_and_softcaps():
    cfg = model_config_from_hf(
        _hf(
            "gemma2",
            sliding_window=8,
            head_dim=32,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
        )
    )
    assert cfg.sliding_windows == (8, None, 8, None)
    assert cfg.softmax_scale == 16**-0.5 and cfg.embed_scale == 8.0
    assert cfg.norm_plus_one and cfg.sandwich_norm and cfg.attn_softcap == 50.0 and cfg.final_softcap == 30.0


def test_mistral_window_applies_to_every_layer():
    assert model_config_from_hf(_hf("mistral", sliding_window=4096)).sliding_windows == (4096,) * 4
    assert model_config_from_hf(_hf("mistral", sliding_window=None)).sliding_windows == (None,) * 4


def test_layer_types_win_when_present():
    cfg = model_config_from_hf(
        _hf("qwen3", sliding_window=5, layer_types=["full_attention", "sliding_attention"] * 2, head_dim=24)
    )
    assert cfg.sliding_windows == (None, 5, None, 5) and cfg.qk_norm and cfg.head_dim == 24


def test_phi3_longrope_is_refused_with_a_reason():
    hf = _hf("phi3", rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
    with pytest.raises(CheckpointError, match=r"unsupported RoPE type 'longrope'.*static cache"):
        model_config_from_hf(hf)


def test_partial_rotary_factor():
    cfg = model_config_from_hf(_hf("phi3", partial_rotary_factor=0.5))
    assert cfg.rope.rotary_dim == 8


def test_unknown_activation_is_refused():
    with pytest.raises(CheckpointError, match="unsupported activation 'relu2'"):
        model_config_from_hf(_hf("llama", hidden_act="relu2"))


def test_softcapping_needs_the_math_backend():
    assert select_backend("auto", needs_softcap=True) is math_attention
    with pytest.raises(ValueError, match="SDPA cannot"):
        select_backend("sdpa", needs_softcap=True)
