"""The C attention core (specdec/kernels/layer_cpu.py) against the decoder's tensor ops.

For attention, the reference below is assembled from the decoder's own pieces (apply_rope, the cache layout,
math_attention, the causal and window masks of Decoder._context). The cache writes must match
bitwise, the outputs to float32 rounding; and a row's output must be bitwise the same whatever
else is in the pass and whatever the thread count. The architectures' logits through the decoder
(which takes this kernel for every pass of few tokens on the CPU) are held to `transformers` in
test_decoder_reference.py.
"""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from specdec.batching import Row, make_batch
from specdec.kernels import layer_cpu
from specdec.kernels.native import built_library
from specdec.models import CacheLayout, KVCache, load_checkpoint
from specdec.models.attention import math_attention
from specdec.models.rope import apply_rope
from specdec.testing import random_prompt

CAPACITY, POSITIONS = 40, 32  # the rotary table is shorter than the cache: positions past it clamp


@pytest.fixture(scope="module")
def kernels():
    built = layer_cpu.layer_kernels()
    if built is None:
        pytest.skip("no C compiler here: the decoder runs its tensor ops instead")
    return built


@pytest.fixture(scope="module")
def attention(kernels):
    return kernels.attention


def tables(rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(POSITIONS, rotary_dim // 2, generator=torch.Generator().manual_seed(9)) * 6
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def tensor_ops(
    qkv, heads, kv_heads, cos_t, sin_t, start, n_valid, slots, k_cache, v_cache, kv_len, window, scale
):
    """What Attention.forward does between its two products, as the decoder does it."""
    b, t = qkv.shape[:2]
    steps = torch.arange(t)
    q_pos = start[:, None] + steps[None, :]
    valid = steps[None, :] < n_valid[:, None]
    write_positions = torch.where(valid, q_pos, k_cache.shape[2] - 1)
    table = q_pos.clamp(max=cos_t.shape[0] - 1)
    cos, sin = cos_t[table].unsqueeze(1), sin_t[table].unsqueeze(1)
    qk = apply_rope(qkv[:, :, : heads + kv_heads].transpose(1, 2), cos, sin)
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
    # Padding tokens all write the scratch row; which one lands there is nobody's business.
    for r in range(b):
        for j in range(t):
            k_cache[slots[r], :, write_positions[r, j]] = k[r, :, j]
            v_cache[slots[r], :, write_positions[r, j]] = v[r, :, j]
    k_pos = torch.arange(kv_len)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if window:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    out = math_attention(
        q, k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len], mask.unsqueeze(1), scale, None
    )
    return out.transpose(1, 2)  # [B, T, H, D]


def random_case(heads, kv_heads, d, rows, seed=0, slots_total=4):
    """rows: (slot, start, t, n_valid) for each row; every row has the same t (the pass's width)."""
    g = torch.Generator().manual_seed(seed)
    t = rows[0][2]
    qkv = torch.randn(len(rows), t, heads + 2 * kv_heads, d, generator=g)
    k_cache = torch.randn(slots_total, kv_heads, CAPACITY, d, generator=g)
    v_cache = torch.randn(slots_total, kv_heads, CAPACITY, d, generator=g)
    as_long = lambda i: torch.tensor([row[i] for row in rows], dtype=torch.int64)  # noqa: E731
    return qkv, as_long(0), as_long(1), as_long(3), k_cache, v_cache


CASES = {
    "gqa": dict(heads=6, kv_heads=2, d=32, rotary_dim=32, window=None),
    "mha, head_dim not a multiple of 16": dict(heads=3, kv_heads=3, d=40, rotary_dim=40, window=None),
    "partial rotary": dict(heads=4, kv_heads=1, d=32, rotary_dim=16, window=None),
    "sliding window": dict(heads=4, kv_heads=2, d=16, rotary_dim=16, window=5),
    # head_dim 64 and 128 take the vector loop over a KV head's whole group of queries
    "vector, head_dim 64": dict(heads=6, kv_heads=2, d=64, rotary_dim=64, window=None),
    "vector, head_dim 128, window, partial rotary": dict(heads=4, kv_heads=1, d=128, rotary_dim=64, window=6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_decoders_tensor_ops(attention, case):
    c = CASES[case]
    # Scattered slots, ragged rows (padding), one row past the rotary table, one at position 0.
    rows = [(2, 7, 4, 4), (0, 0, 4, 1), (3, 30, 4, 3), (1, 12, 4, 2)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(c["heads"], c["kv_heads"], c["d"], rows)
    cos, sin = tables(c["rotary_dim"])
    kv_len = 34
    args = (c["heads"], c["kv_heads"], cos, sin, start, n_valid, slots)
    k_ours, v_ours = k_cache.clone(), v_cache.clone()
    ours = attention(qkv, *args[:2], c["d"], *args[2:], k_ours, v_ours, kv_len, c["window"], 0.3)
    ours = ours.view(*qkv.shape[:2], c["heads"], c["d"])
    expected = tensor_ops(qkv, *args, k_cache, v_cache, kv_len, c["window"], 0.3)
    scratch = CAPACITY - 1  # written by padding in a nondeterministic order: compared apart
    assert torch.equal(k_ours[:, :, :scratch], k_cache[:, :, :scratch])
    assert torch.equal(v_ours[:, :, :scratch], v_cache[:, :, :scratch])
    valid = torch.arange(4)[None, :] < n_valid[:, None]
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_vector_loop_gives_the_scalar_loops_numbers(kernels, case):
    """Bitwise, for every query of a ragged batch, whichever ISA the vector loop was built for."""
    c = CASES[case]
    rows = [(2, 7, 4, 4), (0, 0, 4, 1), (3, 30, 4, 3), (1, 12, 4, 2)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(
        c["heads"], c["kv_heads"], c["d"], rows, seed=7
    )
    cos, sin = tables(c["rotary_dim"])
    args = (qkv, c["heads"], c["kv_heads"], c["d"], cos, sin, start, n_valid, slots)
    fast = kernels.attention(*args, k_cache.clone(), v_cache.clone(), 34, c["window"], 0.3)
    slow = kernels.scalar().attention(*args, k_cache.clone(), v_cache.clone(), 34, c["window"], 0.3)
    assert torch.equal(fast, slow)


def test_a_compiler_without_gccs_vectors_builds_the_same_numbers(kernels, tmp_path, monkeypatch):
    """Other compilers (clang) build the scalar loop alone: the same file with the vector loop
    compiled out gives bitwise the vector loop's numbers."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "cc -DSPECDEC_NO_VECTOR -std=c99 -pedantic-errors")
    plain = layer_cpu.LayerKernels(ctypes.CDLL(str(built_library(layer_cpu.SOURCE))))
    c = CASES["vector, head_dim 64"]
    rows = [(2, 7, 4, 4), (0, 0, 4, 1), (3, 30, 4, 3)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(
        c["heads"], c["kv_heads"], c["d"], rows, seed=9
    )
    args = (qkv, c["heads"], c["kv_heads"], c["d"], *tables(c["rotary_dim"]), start, n_valid, slots)
    ours = kernels.attention(*args, k_cache.clone(), v_cache.clone(), 34, None, 0.3)
    assert torch.equal(plain.attention(*args, k_cache.clone(), v_cache.clone(), 34, None, 0.3), ours)


def test_padding_writes_only_the_scratch_row(attention):
    rows = [(1, 5, 6, 2)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(4, 2, 16, rows, seed=1)
    before = k_cache.clone()
    attention(qkv, 4, 2, 16, *tables(16), start, n_valid, slots, k_cache, v_cache, 11, None, 0.25)
    changed = (k_cache != before).any(dim=-1).nonzero().tolist()  # (slot, head, position)
    assert {(s, p) for s, _h, p in changed} == {(1, 5), (1, 6), (1, CAPACITY - 1)}


def test_a_row_is_bitwise_the_same_in_any_pass_and_thread_count(attention):
    """Its first token decoded alone, and verified in a 5-token pass beside two other rows."""
    heads, kv_heads, d = 6, 2, 64
    cos, sin = tables(d)
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(
        heads, kv_heads, d, [(2, 20, 5, 5), (0, 3, 5, 5), (1, 9, 5, 2)], seed=2
    )
    wide = attention(
        qkv,
        heads,
        kv_heads,
        d,
        cos,
        sin,
        start,
        n_valid,
        slots,
        k_cache.clone(),
        v_cache.clone(),
        25,
        None,
        0.2,
    )
    alone_args = (cos, sin, start[:1], torch.ones(1, dtype=torch.int64), slots[:1])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            alone = attention(
                qkv[:1, :1].contiguous(),
                heads,
                kv_heads,
                d,
                *alone_args,
                k_cache.clone(),
                v_cache.clone(),
                21,
                None,
                0.2,
            )
            assert torch.equal(alone[0, 0], wide[0, 0])
    finally:
        torch.set_num_threads(threads)


def test_enough_work_runs_on_every_thread_with_the_same_numbers(attention):
    heads, kv_heads, d = 8, 2, 64
    rows = [(s, 0, 16, 16) for s in range(4)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(heads, kv_heads, d, rows, seed=3)
    args = (qkv, heads, kv_heads, d, *tables(d), start, n_valid, slots)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention(*args, k_cache.clone(), v_cache.clone(), 16, None, 0.125)
        torch.set_num_threads(max(2, threads))
        many = attention(*args, k_cache.clone(), v_cache.clone(), 16, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.fixture(scope="module")
def llama(checkpoints):
    return load_checkpoint(checkpoints("llama", num_layers=2))


def _decode_logits(lm, attention: str, widths: list[int]) -> list[torch.Tensor]:
    """Prefill 20 tokens, then passes of the given widths; the logits of each."""
    cache = KVCache(lm.config, CacheLayout(2, 64, 16), torch.float32, "cpu")
    lm.model.init_rope(cache.layout.capacity)
    lm.model.attention = attention
    tokens = random_prompt(torch.Generator().manual_seed(4), 20 + sum(widths))
    cpu, out = torch.device("cpu"), []
    try:
        lm.model(make_batch([Row(1, 0, tokens[:20])], cpu, cache.layout.capacity), cache)
        at = 20
        for width in widths:
            batch = make_batch(
                [Row(1, at, tokens[at : at + width])],
                cpu,
                cache.layout.capacity,
                logits_columns=[list(range(width))],
            )
            out.append(lm.model(batch, cache))
            at += width
    finally:
        lm.model.attention = "auto"
    return out


def test_the_decoder_takes_it_for_few_tokens_and_agrees_with_sdpa(attention, llama, monkeypatch):
    calls = []
    monkeypatch.setattr(layer_cpu.LayerKernels, "attention", _counting(calls))
    fused = _decode_logits(llama, "auto", [1, 5, layer_cpu.MAX_TOKENS + 1])
    assert len(calls) == 2 * llama.config.num_layers  # the 17-token pass took SDPA
    calls.clear()
    plain = _decode_logits(llama, "sdpa", [1, 5, layer_cpu.MAX_TOKENS + 1])
    assert not calls  # an explicit backend is kept
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_training_keeps_the_tensor_ops(attention, llama, monkeypatch):
    """The C has no backward: a pass that records gradients runs the tensor ops."""
    calls = []
    monkeypatch.setattr(layer_cpu.LayerKernels, "attention", _counting(calls))
    llama.model.requires_grad_(True)
    try:
        cache = KVCache(llama.config, CacheLayout(1, 32, 4), torch.float32, "cpu")
        llama.model.init_rope(cache.layout.capacity)
        batch = make_batch([Row(0, 0, [3, 4, 5])], torch.device("cpu"), cache.layout.capacity)
        llama.model(batch, cache).sum().backward()
    finally:
        llama.model.requires_grad_(False)
    assert not calls and llama.model.layers[0].self_attn.qkv_proj.weight.grad is not None


def test_without_a_compiler_the_tensor_ops_run_and_say_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("SPECDEC_KERNELS", raising=False)
    layer_cpu.layer_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=layer_cpu.__name__):
            assert layer_cpu.layer_kernels() is None
        assert "did not build" in caplog.text and "tensor ops" in caplog.text
    finally:
        layer_cpu.layer_kernels.cache_clear()


def test_the_tensor_ops_can_be_forced(monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", "reference")
    layer_cpu.layer_kernels.cache_clear()
    try:
        assert layer_cpu.layer_kernels() is None
    finally:
        layer_cpu.layer_kernels.cache_clear()


def _counting(calls):
    original = layer_cpu.LayerKernels.attention

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    return counted


def test_rms_norm_equals_torchs_and_reads_each_row_alone(kernels):
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(3, 7, 96, generator=g) * 4, torch.randn(96, generator=g)
    ours = kernels.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(
        ours, torch.nn.functional.rms_norm(x, (96,), weight, 1e-6), atol=1e-6, rtol=1e-6
    )
    assert torch.equal(kernels.rms_norm(x[1:2, 3:4].contiguous(), weight, 1e-6), ours[1:2, 3:4])


def test_the_decoders_norm_takes_it_outside_training(kernels, llama, monkeypatch):
    calls = []
    original = layer_cpu.LayerKernels.rms_norm
    monkeypatch.setattr(
        layer_cpu.LayerKernels, "rms_norm", lambda self, *a: calls.append(1) or original(self, *a)
    )
    norm = llama.model.norm
    x = torch.randn(2, 3, llama.config.hidden_size)
    expected = torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
    assert calls == [1]
    norm.requires_grad_(True)
    try:
        norm(x).sum().backward()  # records gradients: the tensor op, which has a backward
    finally:
        norm.requires_grad_(False)
    assert calls == [1] and norm.weight.grad is not None


def test_silu_mul_equals_the_tensor_ops(kernels):
    gate_up = torch.randn(2, 3, 2 * 40, generator=torch.Generator().manual_seed(6)) * 6
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(gate_up), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(kernels.silu_mul(gate_up[1:, 2:]), kernels.silu_mul(gate_up)[1:, 2:])
    # A batch wide enough to split over threads: each row's numbers are the row's alone.
    wide = torch.randn(64, 2 * 1536, generator=torch.Generator().manual_seed(7)) * 6
    assert torch.equal(kernels.silu_mul(wide)[5], kernels.silu_mul(wide[5:6])[0])


@pytest.mark.parametrize("d", [16, 64])  # the scalar loop and the vector one
def test_peaked_scores_underflow_to_nothing_as_in_the_tensor_ops(attention, d):
    """Scores hundreds apart: most weights are below float32's range (the C's exponential
    floors at e^-87, which next to the maximum's 1 is nothing)."""
    rows = [(0, 10, 3, 3), (1, 25, 3, 2)]
    qkv, slots, start, n_valid, k_cache, v_cache = random_case(4, 2, d, rows, seed=8)
    qkv = qkv * 30
    cos, sin = tables(d)
    args = (4, 2, cos, sin, start, n_valid, slots)
    ours = attention(qkv, *args[:2], d, *args[2:], k_cache.clone(), v_cache.clone(), 28, None, 1.0)
    expected = tensor_ops(qkv, *args, k_cache, v_cache, 28, None, 1.0)
    valid = torch.arange(3)[None, :] < n_valid[:, None]
    torch.testing.assert_close(ours.view(2, 3, 4, d)[valid], expected[valid], atol=1e-5, rtol=1e-5)
