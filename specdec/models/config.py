"""ModelConfig: one frozen description of a decoder, built from a Hugging Face config.

Every architecture of the seed table is the same decoder with different flags; this module is the
one place that turns a `transformers` config (v4 or v5 spelling) into those flags, and the one
place that refuses what the decoder cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from specdec.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    theta: float
    rotary_dim: int  # head_dim * partial_rotary_factor: the leading dims that rotate
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int  # rows of the embedding = logits width; may exceed the tokenizer's vocabulary
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False  # q/k/v projections carry a bias (qwen2; llama with attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) and normalises in fp32 (gemma2)
    sandwich_norm: bool = False  # extra post-attention / pre- and post-MLP norms (gemma2)
    embed_scale: float | None = None  # embeddings multiplied by sqrt(hidden) (gemma2)
    attn_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    attn_softcap: float | None = None  # tanh soft-capping of attention scores (gemma2)
    final_softcap: float | None = None  # tanh soft-capping of the final logits (gemma2)
    sliding_windows: tuple[int | None, ...] = ()  # per layer: window length, None = full attention
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # A draft's small output head (FR-Spec): logits for only these many tokens, a frequency-ranked
    # subset of the vocabulary whose ids the checkpoint stores (lm_head.token_ids); the forward
    # pass scatters them into the full vocabulary at -inf elsewhere, so q is 0 outside the subset.
    # None: the head covers the whole vocabulary.
    head_tokens: int | None = None
    # The input embedding is the target's, borrowed at load rather than stored (a draft only).
    shared_embeddings: bool = False
    # The first `shared_layers` decoder layers are the target's own, borrowed at load rather than
    # stored (a draft only: the self-speculative idea; its trained layers sit on top of them).
    shared_layers: int = 0
    # The draft reads the target's features (EAGLE): its input at position p is
    # fc([embedding of token p, the target's final hidden state at p - 1]) (`specdec_feature_input`),
    # and it answers with its own final hidden state, which the next drafting pass reads in place
    # of the target's. Such a draft speculates only: it needs the target beside it.
    feature_input: bool = False

    @property
    def answers_alone(self) -> bool:
        """Whether this model can answer a request by itself (draft mode): not with a subset head,
        which can never emit most of the vocabulary, and not when it reads the target's features."""
        return self.head_tokens is None and not self.feature_input

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
        )
        embed = 0 if self.shared_embeddings else self.vocab_size * self.hidden_size
        if self.feature_input:
            embed += 2 * self.hidden_size * self.hidden_size + self.hidden_size  # fc
        if not self.tie_word_embeddings:
            embed += (self.head_tokens or self.vocab_size) * self.hidden_size
        return embed + (self.num_layers - self.shared_layers) * per_layer


def _get(hf: Any, name: str, default: Any = None) -> Any:
    value = getattr(hf, name, default)
    return default if value is None else value


def _rope_parameters(hf: Any) -> dict[str, Any]:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x)."""
    params = getattr(hf, "rope_parameters", None)
    if params:
        params = dict(params)
        if all(isinstance(v, dict) for v in params.values()):
            # Per-layer-type RoPE (e.g. gemma3): one decoder-wide table is all we build.
            distinct = {tuple(sorted(v.items())) for v in params.values()}
            if len(distinct) != 1:
                raise CheckpointError(
                    "per-layer-type RoPE parameters that differ between layer types are not supported"
                )
            params = dict(next(iter(params.values())))
    else:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", _get(hf, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = _get(hf, "partial_rotary_factor", 1.0)
    return params


def _rope_config(hf: Any, head_dim: int) -> RopeConfig:
    params = _rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            + (
                " (longrope and dynamic scaling depend on the sequence length, which a static cache does "
                "not fix; use a checkpoint without them)"
                if rope_type in ("longrope", "dynamic", "su")
                else ""
            )
        )
    rotary_dim = int(head_dim * float(params["partial_rotary_factor"]))
    kwargs: dict[str, Any] = {}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(rope_type=rope_type, theta=float(params["rope_theta"]), rotary_dim=rotary_dim, **kwargs)


def _eos_ids(hf: Any, generation_eos: Any = None) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (getattr(hf, "eos_token_id", None), generation_eos):
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)


def _sliding_windows(hf: Any, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding-window length, or None for full attention.

    transformers 5 configs list `layer_types`; for configs without them (mistral, phi3, and 4.x
    spellings) the family's own rule applies."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        if len(layer_types) != num_layers:
            raise CheckpointError(
                f"layer_types lists {len(layer_types)} layers, num_hidden_layers is {num_layers}"
            )
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise CheckpointError(
                f"unsupported layer types {sorted(unknown)}; supported: full_attention, sliding_attention"
            )
        if "sliding_attention" in layer_types and not window:
            raise CheckpointError("layer_types has sliding_attention layers but sliding_window is not set")
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("mistral", "phi3") and window:
        return tuple([int(window)] * num_layers)
    if model_type in ("qwen2", "qwen3") and window and getattr(hf, "use_sliding_window", False):
        first = int(_get(hf, "max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    if model_type == "gemma2" and window:
        return tuple(int(window) if i % 2 == 0 else None for i in range(num_layers))
    return tuple([None] * num_layers)


def model_config_from_hf(hf: Any, generation_eos: Any = None) -> ModelConfig:
    """Translate a `transformers` PretrainedConfig into a ModelConfig, or raise CheckpointError."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = int(hf.hidden_size)
    heads = int(hf.num_attention_heads)
    head_dim = int(_get(hf, "head_dim", hidden // heads))
    num_layers = int(hf.num_hidden_layers)
    act = _get(hf, "hidden_act", "silu")
    attention_bias = bool(_get(hf, "attention_bias", False))
    flags: dict[str, Any] = {
        "qkv_bias": attention_bias,
        "o_bias": attention_bias,
        "mlp_bias": bool(_get(hf, "mlp_bias", False)),
        "hidden_act": act,
    }
    if model_type == "qwen2":
        # Qwen2 always carries q/k/v biases (and none on o_proj), whatever attention_bias says.
        flags.update(qkv_bias=True, o_bias=False)
    if model_type == "qwen3":
        flags["qk_norm"] = True
    if model_type == "gemma2":
        flags.update(
            hidden_act=_get(hf, "hidden_activation", _get(hf, "hidden_act", "gelu_pytorch_tanh")),
            norm_plus_one=True,
            sandwich_norm=True,
            embed_scale=hidden**0.5,
            attn_scale=float(_get(hf, "query_pre_attn_scalar", head_dim)) ** -0.5,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None),
            final_softcap=getattr(hf, "final_logit_softcapping", None),
        )
    if flags["hidden_act"] not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"unsupported activation {flags['hidden_act']!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(hf.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(hf.intermediate_size),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 2048)),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        rope=_rope_config(hf, head_dim),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(hf, model_type, num_layers),
        eos_token_ids=_eos_ids(hf, generation_eos),
        bos_token_id=getattr(hf, "bos_token_id", None),
        head_tokens=getattr(hf, "specdec_head_tokens", None),
        shared_embeddings=bool(getattr(hf, "specdec_shared_embeddings", False)),
        shared_layers=int(getattr(hf, "specdec_shared_layers", 0) or 0),
        feature_input=bool(getattr(hf, "specdec_feature_input", False)),
        **flags,
    )


def check_config(cfg: ModelConfig) -> None:
    """Consistency checks that would otherwise surface as shape errors deep in a forward pass."""
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(
            f"num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}"
        )
    if cfg.rope.rotary_dim % 2 or cfg.rope.rotary_dim > cfg.head_dim:
        raise CheckpointError(
            f"rotary dimension {cfg.rope.rotary_dim} must be even and <= head_dim {cfg.head_dim}"
        )
    if len(cfg.sliding_windows) != cfg.num_layers:
        raise CheckpointError("sliding_windows must list one entry per layer")
    if cfg.head_tokens is not None:
        if not 0 < cfg.head_tokens <= cfg.vocab_size:
            raise CheckpointError(
                f"specdec_head_tokens must be in [1, vocab_size {cfg.vocab_size}], got {cfg.head_tokens}"
            )
        if cfg.tie_word_embeddings:
            raise CheckpointError(
                "a subset output head (specdec_head_tokens) cannot be tied to the embeddings"
            )
    if not 0 <= cfg.shared_layers < cfg.num_layers:
        raise CheckpointError(
            f"specdec_shared_layers must be in [0, num_hidden_layers {cfg.num_layers}): "
            f"a draft needs at least one layer of its own, got {cfg.shared_layers}"
        )
    if not math.isfinite(cfg.rms_norm_eps) or cfg.rms_norm_eps <= 0:
        raise CheckpointError(f"rms_norm_eps must be positive, got {cfg.rms_norm_eps}")
