"""Where one target pass of the default target (SmolLM2-135M) spends its time, per quantization:
the whole pass at a decode's width (1) and a verify pass's (5), and its parts timed alone - the
linear layers (all of them, the head apart), the attention core (rotary, cache write and read,
scaled dot product; one C call a layer where specdec/kernels/layer_cpu.py applies) and the norms - with what is left (Python, per-layer glue ops) as the
difference; for int8, the whole pass again with the int8 product as tensor ops (its reference) instead of
the C kernel (specdec/kernels/int8_linear.py). The figures behind docs/QUANTIZATION.md's account of the missed targets.

    python benches/decode_profile.py [--quantize none,int8] [--against OTHER/specdec/models/decoder.py]

--against also times the whole pass with another version's decoder layers (an older checkout's
decoder.py; the same weights), taken in turn with this one's (benches/other_version.py).

Medians of 15 runs after 2 warm-ups, at position 64 of a 256-token cache, batch size 1.
"""

from __future__ import annotations

import argparse
import functools
import platform
from datetime import datetime, timezone

import medians  # benches/medians.py, beside this script
import torch
from other_version import load_module, restore, swap_classes

from specdec.assets import default_target
from specdec.batching import Row, make_batch
from specdec.config import Quantization
from specdec.kernels.int8_linear import REFERENCE
from specdec.models import load_checkpoint
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.quant_linear import Int8LinearCPU
from specdec.models.quantize import quantized
from specdec.models.rope import apply_rope

median_ms = functools.partial(medians.median_ms, runs=15)  # one call = one median of 15 runs

POSITION = 64


def profile(model, width: int, against=None) -> dict[str, float]:
    decoder, cpu = model.model, torch.device("cpu")
    cache = KVCache(model.config, CacheLayout(1, 256, 16), model.dtype, cpu)
    decoder.init_rope(cache.layout.capacity)
    decoder(make_batch([Row(0, 0, list(range(1, POSITION + 1)))], cpu, cache.layout.capacity), cache)
    batch = make_batch(
        [Row(0, POSITION, [5] * width)], cpu, cache.layout.capacity, logits_columns=[list(range(width))]
    )
    ctx = decoder._context(batch, cache)
    layers = decoder.layers
    hidden = torch.randn(1, width, model.config.hidden_size)
    linears = [(m, torch.randn(1, width, m.in_features)) for layer in layers for m in _linears(layer)]
    attn = layers[0].self_attn
    q_size, kv_size = attn.cfg.q_size, attn.cfg.kv_size
    qkv = torch.randn(1, width, q_size + 2 * kv_size)

    def attention_core():  # Attention.forward without its two products
        for layer in layers:
            a = layer.self_attn
            heads, kv_heads = a.cfg.num_heads, a.cfg.num_kv_heads
            split = qkv.view(1, width, heads + 2 * kv_heads, a.cfg.head_dim)
            if ctx.fused_attention is not None:  # the C attention core (specdec/kernels/layer_cpu.py)
                a._fused(split, ctx)
                continue
            qk = apply_rope(split[:, :, : heads + kv_heads].transpose(1, 2), ctx.cos, ctx.sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = split[:, :, heads + kv_heads :].transpose(1, 2)
            ctx.cache.write(a.layer_idx, ctx.kv_write_index, k, v)
            k_all, v_all = ctx.cache.read(a.layer_idx, ctx.slots, ctx.kv_len, ctx.first_slot)
            a.attn_fn(q, k_all, v_all, ctx.masks[a.window], a.cfg.softmax_scale, a.cfg.attn_softcap)

    with torch.no_grad():
        out = {
            "pass": median_ms(lambda: decoder(batch, cache)),
            "linears (layers)": median_ms(lambda: [m(x) for m, x in linears]),
            "head": median_ms(lambda: decoder.lm_head(hidden)),
            "attention core": median_ms(attention_core),
            "norms": median_ms(
                lambda: [
                    n(hidden)
                    for layer in layers
                    for n in (layer.input_layernorm, layer.post_attention_layernorm)
                ]
            ),
        }
    out["rest (Python, glue ops)"] = out["pass"] - sum(v for k, v in out.items() if k != "pass")
    int8_layers = [m for m in decoder.modules() if isinstance(m, Int8LinearCPU)]
    if int8_layers:
        # The whole pass with CPU int8's product in C and as tensor ops (what runs where no C
        # compiler works), taken in turn: a comparison this noisy machine would spoil otherwise.
        kernels = int8_layers[0].kernel

        def pass_with(kernel):
            for m in int8_layers:
                m.kernel = kernel
            decoder(batch, cache)

        with torch.no_grad():
            both = medians.interleaved_median_ms(
                {"C": lambda: pass_with(kernels), "tensor ops": lambda: pass_with(REFERENCE)}, runs=31
            )
        pass_with(kernels)
        out["pass, int8 product in C (interleaved)"] = both["C"]
        out["pass, int8 product as tensor ops (interleaved)"] = both["tensor ops"]
    if against is not None:
        # The whole pass with this checkout's layers and with another version's (the same
        # weights), taken in turn.
        def pass_as(other: bool):
            swapped = swap_classes(decoder, against) if other else {}
            try:
                decoder(batch, cache)
            finally:
                restore(swapped)

        with torch.no_grad():
            both = medians.interleaved_median_ms(
                {"this": lambda: pass_as(False), "other": lambda: pass_as(True)}, runs=31
            )
        out["pass, this decoder (interleaved)"] = both["this"]
        out["pass, --against decoder (interleaved)"] = both["other"]
    return {k: round(v, 2) for k, v in out.items()}


def _linears(layer):
    return [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantize", default="none,int8")
    ap.add_argument(
        "--against", default=None, help="another version's specdec/models/decoder.py, timed in turn"
    )
    args = ap.parse_args()
    against = load_module(args.against, "other_decoder") if args.against else None
    base = load_checkpoint(default_target())
    print(
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.node()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms per pass, batch size 1"
    )
    results = {}
    for name in args.quantize.split(","):
        model = quantized(base, Quantization(name))
        for width in (1, 5):
            results[(name, width)] = profile(model, width, against)
    parts = list(dict.fromkeys(part for r in results.values() for part in r))
    print("| part | " + " | ".join(f"{n} width {w}" for n, w in results) + " |")
    print("|---|" + "---|" * len(results))
    for part in parts:
        print(f"| {part} | " + " | ".join(str(r.get(part, "")) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
