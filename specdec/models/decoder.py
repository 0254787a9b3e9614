"""One decoder for the whole seed table; every architectural difference is a ModelConfig flag.

Parameter names follow Hugging Face's (without the leading ``model.``), except that q/k/v and
gate/up are always fused (``qkv_proj``, ``gate_up_proj``): one matmul instead of three, and Phi-3's
checkpoints already store them that way. The loader fuses the others.

A forward pass takes a ragged batch: tokens [B, T] where row b has n_valid[b] real tokens starting
at absolute position start[b] of the sequence in cache slot slots[b]. Each row writes its K/V at its
own positions in its own slot and attends causally to its own prefix. Nothing here reads a tensor
value on the host, so the pass can be captured as a CUDA graph for a fixed (B, T, kv_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import layer_cpu
from specdec.models.attention import AttentionFn, select_backend
from specdec.models.config import ModelConfig
from specdec.models.kv_cache import KVCache
from specdec.models.linear import Linear
from specdec.models.rope import apply_rope, rope_tables


@dataclass(slots=True)
class ForwardBatch:
    tokens: torch.Tensor  # [B, T] int64, padded rows filled with any valid id
    slots: torch.Tensor  # [B] int64: each row's cache slot
    start: torch.Tensor  # [B] int64: absolute position of tokens[:, 0]
    n_valid: torch.Tensor  # [B] int64: real tokens per row; the rest of the row is padding
    kv_len: int  # attention reads positions [0, kv_len); >= max(start + n_valid)
    logits_index: torch.Tensor | None = None  # [B, K] int64 columns of T whose logits are wanted
    # Set when slots are first_slot, first_slot + 1, ... in row order: the cache is then read as a
    # view of that range of slots instead of gathered row by row (a copy per layer).
    first_slot: int | None = None
    # [B, T, hidden]: a feature-reading draft's (ModelConfig.feature_input) second input - the
    # target's final hidden state at the position before each token (or the draft's own, for its
    # proposals). Required by such a draft, ignored by every other model.
    features: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.plus_one:
            if x.is_cpu and not _recording(x, self.weight):
                kernels = layer_cpu.layer_kernels()
                if kernels is not None:
                    return kernels.rms_norm(x, self.weight, self.eps)  # one C call: ~10 us here, not ~25
            # One fused op instead of six (at a decode's width each op is mostly dispatch: 61 norms
            # a SmolLM2 pass, docs/QUANTIZATION.md); the same arithmetic in float32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            # Gemma scales by (1 + w) in float32 and casts once, at the end.
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


def _recording(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether autograd records ops on these (training): the C kernels have no backward."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_fn: AttentionFn):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.attn_fn = attn_fn
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.window = cfg.sliding_windows[layer_idx]

    def forward(self, x: torch.Tensor, ctx: _PassContext) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        qkv = self.qkv_proj(x)
        if ctx.fused_attention is not None and not _recording(qkv):
            return self.o_proj(self._fused(qkv, ctx))
        qkv = qkv.view(b, t, heads + 2 * kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(qkv[:, :, :heads]), self.k_norm(qkv[:, :, heads : heads + kv_heads])
            qk = torch.cat([q, k], dim=2)
        else:
            qk = qkv[:, :, : heads + kv_heads]
        # q and k rotated together: one set of rotary ops a layer, not two.
        qk = apply_rope(qk.transpose(1, 2), ctx.cos, ctx.sin)  # [B, H + KVH, T, D]
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)  # [B, KVH, T, D]
        ctx.cache.write(self.layer_idx, ctx.kv_write_index, k, v)
        k_all, v_all = ctx.cache.read(self.layer_idx, ctx.slots, ctx.kv_len, ctx.first_slot)  # [B, KVH, L, D]
        mask = ctx.masks[self.window]
        out = self.attn_fn(q, k_all, v_all, mask, cfg.softmax_scale, cfg.attn_softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.q_size))

    def _fused(self, qkv: torch.Tensor, ctx: _PassContext) -> torch.Tensor:
        """The lines below from the rotary embedding to the attention output, in one C call
        (specdec/kernels/layer_cpu.py): qkv [B, T, (H + 2 KVH) × D] -> [B, T, H × D], with no
        view in between (each is a few microseconds of dispatch at a decode's width)."""
        cfg, heads, kv_heads = self.cfg, self.cfg.num_heads, self.cfg.num_kv_heads
        if cfg.qk_norm:
            qkv = qkv.view(*qkv.shape[:2], heads + 2 * kv_heads, cfg.head_dim)
            q, k = self.q_norm(qkv[:, :, :heads]), self.k_norm(qkv[:, :, heads : heads + kv_heads])
            qkv = torch.cat([q, k, qkv[:, :, heads + kv_heads :]], dim=2)
        cache, layer = ctx.cache, self.layer_idx
        return ctx.fused_attention.attention(
            qkv.contiguous(),
            heads,
            kv_heads,
            cfg.head_dim,
            ctx.rope_cos,
            ctx.rope_sin,
            ctx.start,
            ctx.n_valid,
            ctx.slots,
            cache.k[layer],
            cache.v[layer],
            ctx.kv_len,
            self.window,
            cfg.softmax_scale,
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if not self.gelu and gate_up.dtype == torch.float32 and gate_up.is_cpu and not _recording(gate_up):
            kernels = layer_cpu.layer_kernels()
            if kernels is not None:  # one C call for chunk, silu and the product (three ops)
                return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_fn: AttentionFn):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_idx, attn_fn)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: _PassContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(slots=True)
class _PassContext:
    """What every layer of one forward pass shares: built once per pass, not per layer."""

    cache: KVCache
    cos: torch.Tensor  # [B, 1, T, rotary_dim]
    sin: torch.Tensor
    slots: torch.Tensor  # [B]
    slot_index: torch.Tensor  # [B, T]: slots broadcast over the row
    write_positions: torch.Tensor  # [B, T]: where each token's K/V goes (padding -> scratch)
    kv_write_index: torch.Tensor  # the same places as rows of a layer's cache (KVCache.write_index)
    kv_len: int
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, T, kv_len] bool
    first_slot: int | None  # see ForwardBatch
    # Set when this pass's attention core runs in C (Decoder._fused_attention); then what it reads.
    fused_attention: layer_cpu.LayerKernels | None
    rope_cos: torch.Tensor  # [positions, rotary_dim]: the whole tables
    rope_sin: torch.Tensor
    start: torch.Tensor  # [B] int64, as in ForwardBatch
    n_valid: torch.Tensor


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention = attention  # the backend asked for (a quantized copy is built alike)
        attn_fn = select_backend(attention, needs_softcap=cfg.attn_softcap is not None)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.feature_input:  # EAGLE: [embedding, feature] -> the first layer's input
            self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attn_fn) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.lm_head = Linear(cfg.hidden_size, cfg.head_tokens or cfg.vocab_size, bias=False)
        # The vocabulary ids of a subset head's rows (see ModelConfig.head_tokens).
        subset = cfg.head_tokens is not None
        self.head_token_ids: torch.Tensor | None
        self.register_buffer(
            "head_token_ids", torch.zeros(cfg.head_tokens, dtype=torch.long) if subset else None
        )
        self.tie_weights()
        self.num_positions = 0

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_rope(self, num_positions: int) -> None:
        """Make the cos/sin tables cover positions [0, num_positions) on the model's device and dtype.

        Tables only grow: several engines (the bench builds one per configuration) may share one
        loaded model, and a longer table serves a shorter cache unchanged."""
        if num_positions <= self.num_positions:
            return
        ref = self.norm.weight  # a float tensor in the compute dtype, quantized model or not
        cos, sin = rope_tables(self.cfg.rope, num_positions)
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("rope_cos", cos.to(ref.device, ref.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(ref.device, ref.dtype), persistent=False)
        self.num_positions = num_positions

    def _context(self, batch: ForwardBatch, cache: KVCache) -> _PassContext:
        b, t = batch.tokens.shape
        device = batch.tokens.device
        steps = torch.arange(t, device=device)
        q_pos = batch.start[:, None] + steps[None, :]  # [B, T]
        valid = steps[None, :] < batch.n_valid[:, None]
        write_positions = torch.where(valid, q_pos, cache.layout.scratch_position)
        table_index = q_pos.clamp(max=self.num_positions - 1)
        cos = self.rope_cos[table_index].unsqueeze(1)
        sin = self.rope_sin[table_index].unsqueeze(1)
        k_pos = torch.arange(batch.kv_len, device=device)
        causal = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, L]
        masks: dict[int | None, torch.Tensor] = {None: causal.unsqueeze(1)}
        for window in set(self.cfg.sliding_windows) - {None}:
            in_window = k_pos[None, None, :] > q_pos[:, :, None] - window
            masks[window] = (causal & in_window).unsqueeze(1)
        return _PassContext(
            cache=cache,
            cos=cos,
            sin=sin,
            slots=batch.slots.contiguous(),
            slot_index=batch.slots[:, None].expand(b, t),
            write_positions=write_positions,
            kv_write_index=cache.write_index(batch.slots, write_positions),
            kv_len=batch.kv_len,
            masks=masks,
            first_slot=batch.first_slot,
            fused_attention=self._fused_attention(t, cache),
            rope_cos=self.rope_cos,
            rope_sin=self.rope_sin,
            start=batch.start.contiguous(),  # the C reads them as plain arrays
            n_valid=batch.n_valid.contiguous(),
        )

    def _fused_attention(self, t: int, cache: KVCache) -> layer_cpu.LayerKernels | None:
        """The C attention core for a pass of t tokens a row, where it applies: with the "auto"
        backend, on the CPU in float32, at most layer_cpu.MAX_TOKENS tokens (prefills keep
        SDPA), scores not soft-capped (Gemma 2), and where the C builds."""
        cfg = self.cfg
        if (
            self.attention != "auto"
            or t > layer_cpu.MAX_TOKENS
            or cache.k.device.type != "cpu"
            or cache.k.dtype != torch.float32
            or self.rope_cos.dtype != torch.float32
            or cfg.attn_softcap is not None
            or cfg.head_dim > layer_cpu.MAX_HEAD_DIM
        ):
            return None
        return layer_cpu.layer_kernels()

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor | None:
        """Logits [B, K, vocab] float32 at batch.logits_index (all T if None); None if K == 0."""
        return self.forward_features(batch, cache)[0]

    def forward_features(
        self, batch: ForwardBatch, cache: KVCache
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, features) at batch.logits_index: the features are the final hidden states the
        head reads ([B, K, hidden], after the final norm) - what a feature-reading draft is fed.
        When `cache` keeps features (KVCache.features: the target of such a draft), every valid
        position's are written there too."""
        ctx = self._context(batch, cache)
        x = self.embed_tokens(batch.tokens)
        if self.cfg.embed_scale is not None:
            # Gemma rounds the scale to the activation dtype before multiplying.
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.cfg.feature_input:
            if batch.features is None:
                raise ValueError("a feature-reading draft needs ForwardBatch.features")
            x = self.fc(torch.cat([x, batch.features.to(x.dtype)], dim=-1))
        for layer in self.layers:
            x = layer(x, ctx)
        if cache.features is not None:
            # Every position's, for the draft's later passes (padding goes to the scratch row).
            x = self.norm(x)
            cache.features[ctx.slot_index, ctx.write_positions] = x
        if batch.logits_index is not None:
            if batch.logits_index.shape[1] == 0:
                return None, None
            index = batch.logits_index[:, :, None].expand(-1, -1, x.shape[-1])
            x = torch.gather(x, 1, index)
        features = x if cache.features is not None else self.norm(x)
        logits = self.lm_head(features).float()
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        if self.head_token_ids is not None:
            # A subset head: every other token gets -inf (probability 0), so the rest of the engine
            # sees full-vocabulary logits and the acceptance rule stays exact.
            full = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
            logits = full.index_copy_(-1, self.head_token_ids, logits)
        return logits, features
