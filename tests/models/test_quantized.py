"""Quantized weights: the quantizers against their references, the fast modules against the
references, the per-row activation scale that keeps a row's numbers independent of its batch,
and whole models (tied tables, borrowed tensors, sizes, GGUF blocks)."""

from __future__ import annotations

import pytest
import torch

from specdec.config import EngineConfig, Quantization
from specdec.errors import SpecdecError
from specdec.models import load_checkpoint
from specdec.models.quant_linear import (
    Int4Linear,
    Int8Embedding,
    Int8LinearCPU,
    Int8LinearWeightOnly,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from specdec.models.quantize import quantize_pair, quantized, stored_bytes
from specdec.testing import int8_per_tensor_forward, prompt_logits, random_prompt


def _weights(n=96, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02, g


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_codes_reconstruct_within_half_a_step():
    w, _ = _weights()
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    err = (dequantize_int8(codes, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-9).all())


def test_int4_recovers_q4_0_and_q4_1_blocks_exactly():
    """Weights dequantized from GGUF-style blocks of 32 - Q4_1 (m + q·d, the block's min and max
    both used) and Q4_0 ((q - 8)·d, the peak at code 0) - quantize back to the same codes."""
    g = torch.Generator().manual_seed(3)
    n, k = 64, 128
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15  # every Q4_1 block spans its grid, as llama.cpp's quantizer makes it
    d = torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-3
    m = -torch.rand(n, k // 32, 1, generator=g) * 0.05
    q4_1 = (m + q.view(n, k // 32, 32) * d).view(n, k)
    q0 = torch.randint(1, 16, (n, k), generator=g)
    q0[:, ::32] = 0  # the block's peak (largest magnitude) is at code 0: -8·d
    q4_0 = ((q0.view(n, k // 32, 32) - 8) * d).view(n, k)
    for name, w, codes_in in (("Q4_1", q4_1, q), ("Q4_0", q4_0, q0)):
        codes, scale, zero = quantize_int4(w)
        assert torch.equal(codes.long(), codes_in), name
        assert torch.allclose(dequantize_int4(codes, scale, zero), w, rtol=0, atol=1e-7), name


def test_int4_error_is_bounded_on_gaussian_weights():
    w, _ = _weights()
    codes, scale, zero = quantize_int4(w)
    assert int(codes.max()) <= 15
    assert _rel(dequantize_int4(codes, scale, zero), w) < 0.12
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(8, 40))


def test_int8_cpu_linear_matches_its_reference():
    w, g = _weights()
    bias = torch.randn(96, generator=g)
    codes, scale = quantize_int8(w)
    layer = Int8LinearCPU(codes, scale, bias)
    x = torch.randn(2, 5, 128, generator=g)
    reference = x @ dequantize_int8(codes, scale).t() + bias
    # Activations go in two 8-bit digits per row: the error is the weights' alone, ~1e-4 here.
    assert _rel(layer(x), reference) < 1e-3
    assert layer(x).shape == (2, 5, 96)
    assert torch.equal(layer(torch.zeros(1, 128)), bias[None].expand(1, 96))  # a zero row: no NaN


def test_a_rows_int8_output_is_the_same_in_any_batch_at_any_width():
    """The per-row scale: a row gives bitwise the same output alone, in a 5-row verify pass or in
    a 64-row prefill, however large the other rows are."""
    w, g = _weights(n=200, k=192)
    layer = Int8LinearCPU(*quantize_int8(w), None)
    x = torch.randn(64, 192, generator=g) * torch.logspace(-2, 2, 64)[:, None]  # rows of every scale
    full = layer(x)
    for width in (1, 2, 5, 9, 17, 33):
        for start in (0, width, 64 - width):
            assert torch.equal(layer(x[start : start + width]), full[start : start + width]), (width, start)


def test_without_the_per_row_scale_rows_depend_on_their_batch():
    """Negative control for the test above: one activation scale per pass (fbgemm's dynamic
    linear as is) makes a small row's numbers depend on a large row beside it, which would make
    speculative output drift."""
    w, g = _weights(n=200, k=192)
    layer = Int8LinearCPU(*quantize_int8(w), None)
    small, large = torch.randn(1, 192, generator=g), 100 * torch.randn(1, 192, generator=g)
    alone = int8_per_tensor_forward(layer, small)
    beside = int8_per_tensor_forward(layer, torch.cat([small, large]))[:1]
    assert not torch.equal(alone, beside)
    assert torch.equal(layer(small), layer(torch.cat([small, large]))[:1])  # the per-row scale does not


def test_weight_only_int8_matches_its_reference():
    """The CUDA path's module (activations unquantized), run here on the CPU's kernel."""
    w, g = _weights()
    codes, scale = quantize_int8(w)
    x = torch.randn(4, 128, generator=g)
    y = Int8LinearWeightOnly(codes, scale, None, torch.float32)(x)
    assert _rel(y, x @ dequantize_int8(codes, scale).t()) < 1e-5


@pytest.mark.parametrize("n", [96, 100])  # 100: not a multiple of 16, padded inside
def test_int4_linear_matches_its_reference(n):
    w, g = _weights(n=n)
    codes, scale, zero = quantize_int4(w)
    bias = torch.randn(n, generator=g)
    layer = Int4Linear(codes, scale, zero, bias, torch.float32)
    x = torch.randn(3, 128, generator=g)
    reference = x @ dequantize_int4(codes, scale, zero).t() + bias
    assert _rel(layer(x), reference) < 1e-5


def test_the_quantized_embedding_reads_the_dequantized_table():
    w, _ = _weights(n=50, k=64)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    codes, scale = quantize_int8(w)
    assert torch.equal(Int8Embedding(codes, scale, torch.float32)(ids), dequantize_int8(codes, scale)[ids])


# ----------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def tied(checkpoints):
    return load_checkpoint(checkpoints("llama", tie_word_embeddings=True, seed=5))


@pytest.mark.parametrize("scheme,tolerance", [(Quantization.INT8, 0.05), (Quantization.INT4, 0.35)])
def test_a_quantized_model_stays_close_and_leaves_the_original_untouched(tied, scheme, tolerance):
    prompt = random_prompt(torch.Generator().manual_seed(1), 24)
    before = prompt_logits(tied, prompt)
    q = quantized(tied, scheme)
    assert q.quantization is scheme and tied.quantization is Quantization.NONE
    ours = prompt_logits(q, prompt)
    assert _rel(ours, before) < tolerance
    assert torch.equal(prompt_logits(tied, prompt), before)  # the original still computes as before
    # Nothing carries autograd history: the engine runs without no_grad, and a graph hanging off
    # the KV cache would grow by every pass (it did: 13 MB a verify pass on SmolLM2).
    assert not any(t.requires_grad for t in [*q.model.parameters(), *q.model.buffers()])
    assert q.model.norm.weight is tied.model.norm.weight  # unquantized tensors are shared, not copied
    # A tiny model: the scales and the packing's padding weigh more than in a real one.
    assert stored_bytes(q.model) < stored_bytes(tied.model) / (2.5 if scheme is Quantization.INT8 else 3)


def test_a_tied_head_and_its_embedding_read_one_table(tied):
    q = quantized(tied, Quantization.INT8).model
    vocab = tied.config.vocab_size
    table = q.embed_tokens(torch.arange(vocab))  # every row, dequantized as the embedding reads it
    assert q.embed_tokens.codes.data_ptr() == q.lm_head.packed.data_ptr()  # stored once, not copied
    codes, scale = quantize_int8(tied.model.embed_tokens.weight)
    assert torch.equal(table, dequantize_int8(codes, scale))  # the rows out of the packed layout
    x = torch.randn(2, tied.config.hidden_size)
    assert _rel(q.lm_head(x), x @ table.t()) < 1e-3


def test_the_embedding_reads_rows_out_of_a_packed_head():
    w, _ = _weights(n=50, k=70)  # neither dimension a multiple of the packed blocks
    codes, scale = quantize_int8(w)
    embed = Int8Embedding.reading(Int8LinearCPU(codes, scale, None), torch.float32)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(embed(ids), dequantize_int8(codes, scale)[ids]) and embed.stored_bytes == 0


def test_quantized_modules_are_shared_with_a_draft_that_borrows_them(tmp_path, checkpoints):
    """A draft borrowing the target's embedding reuses the target's quantized table, stored once."""
    from specdec.models.subset_head import restrict_checkpoint

    target_path = checkpoints("llama", tie_word_embeddings=True, seed=5)
    target = load_checkpoint(target_path)
    full_draft = checkpoints("llama", tie_word_embeddings=True, seed=6, num_layers=1)
    draft_path = restrict_checkpoint(
        full_draft, tmp_path / "draft", list(range(3, 131)), share_embeddings=True
    )
    draft = load_checkpoint(draft_path, borrow_from=target)
    qt, qd = quantize_pair(target, draft, Quantization.INT8, Quantization.INT8)
    assert qd.model.embed_tokens is qt.model.embed_tokens
    _, alone = quantize_pair(target, draft, Quantization.NONE, Quantization.INT8)
    assert alone.model.embed_tokens is not qt.model.embed_tokens
    prompt = random_prompt(torch.Generator().manual_seed(2), 10)
    assert torch.isfinite(prompt_logits(qd, prompt)[:, qd.model.head_token_ids]).all()


def test_requantizing_differently_is_refused(tied):
    q = quantized(tied, Quantization.INT8)
    assert quantized(q, Quantization.INT8) is q
    with pytest.raises(SpecdecError, match="already quantized to int8"):
        quantized(q, Quantization.INT4)


def test_engine_config_takes_the_names_and_refuses_others():
    assert EngineConfig(target_quantize="int4").target_quantize is Quantization.INT4
    with pytest.raises(SpecdecError, match="quantization must be one of none, int8, int4, got 'int3'"):
        EngineConfig(draft_quantize="int3")


def test_int4_on_a_q4_gguf_is_its_own_blocks(tmp_path, checkpoints):
    """A Q4_0 or Q4_1 GGUF loaded with int4 keeps the file's blocks: the int4 weights dequantize to
    the same numbers the float conversion holds."""
    from specdec.testing_gguf import write_tiny_gguf

    for qtype in ("Q4_0", "Q4_1"):
        path = write_tiny_gguf(checkpoints("llama", seed=7), tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
        loaded = load_checkpoint(path)
        q = quantized(loaded, Quantization.INT4)
        for name, module in loaded.model.named_modules():
            if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
                codes, scale, zero = quantize_int4(module.weight)
                assert torch.allclose(
                    dequantize_int4(codes, scale, zero), module.weight, rtol=0, atol=1e-6
                ), (
                    qtype,
                    name,
                )
        assert q.quantization is Quantization.INT4
