"""CPU int8's C product (specdec/kernels/int8_linear.c) against its tensor-op reference: bitwise
equal on every path this CPU has (AVX-512 VNNI, AVX2, portable), so which one runs never changes
an output; the packed layout; and the fallback when no compiler works."""

from __future__ import annotations

import logging

import pytest
import torch

from specdec.kernels import int8_linear
from specdec.kernels.int8_linear import (
    REFERENCE,
    Int8Kernel,
    Isa,
    int8_kernel,
    int8_linear_reference,
    pack_weights,
    unpack_weights,
)
from specdec.kernels.native import built_library
from specdec.models.quant_linear import Int8LinearCPU, quantize_int8


@pytest.fixture(scope="module")
def kernel():
    built = int8_kernel()
    if not isinstance(built, Int8Kernel):
        pytest.skip("no working C compiler here: the reference is the only path")
    return built


def _paths(kernel):
    return [kernel.on(isa) for isa in Isa if isa <= kernel.best]


def _rows(r, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g) * torch.logspace(-6, 4, r)[:, None]  # rows of every scale
    x[0, k // 2] = 50.0 * float(x[0].abs().max())  # an outlier channel sets a row's scale
    if r > 2:
        x[2] = 0.0  # an all-zero row: the floor on the maximum, no NaN
    if r > 3:
        x[3, :: max(1, k // 7)] = 0.5 / 127 * float(x[3].abs().max())  # values on the half-step
    return x


def _layer(n, k, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    codes, scale = quantize_int8(torch.randn(n, k, generator=g) * 0.02)
    return Int8LinearCPU(codes, scale, torch.randn(n, generator=g) if bias else None), codes, scale


def _bits(t):
    return t.contiguous().view(torch.int32)


def test_packing_round_trips_with_zero_padding():
    codes = torch.randint(-127, 128, (7, 70), dtype=torch.int8)
    packed = pack_weights(codes)
    assert packed.shape == (8, 128)
    back = unpack_weights(packed)
    assert torch.equal(back[:7, :70], codes) and not back[7:].any() and not back[:, 70:].any()


@pytest.mark.parametrize(
    "r,n,k",
    [(1, 960, 576), (5, 576, 1536), (2, 49152 // 64, 576), (33, 13, 577), (4, 7, 1), (2, 5, 3), (9, 64, 130)],
)
def test_every_path_is_bitwise_the_reference(kernel, r, n, k):
    layer, _, _ = _layer(n, k, seed=r * 1000 + n + k)
    x = _rows(r, k, seed=r + k)
    slow = REFERENCE.linear(x, layer.packed, layer.wsum, layer.wscale, layer.bias)
    for path in _paths(kernel):
        fast = path.linear(x, layer.packed, layer.wsum, layer.wscale, layer.bias)
        # Bit for bit: torch.equal calls -0.0 and +0.0 equal, the bit patterns do not.
        assert torch.equal(_bits(fast), _bits(slow)), path.isa.name


def test_two_digits_carry_the_activations_almost_exactly(kernel):
    """The activations lose next to nothing: against the float product with the same int8
    weights, the error is a few parts in 10⁵ of the output's scale, outlier channel and all."""
    layer, codes, scale = _layer(200, 576, seed=3, bias=False)
    x = _rows(6, 576, seed=4)
    exact = x @ (codes.float() * scale[:, None]).t()
    got = layer(x)
    for row in range(6):
        if x[row].any():
            err = (got[row] - exact[row]).abs().max() / exact[row].abs().max()
            assert float(err) < 2e-4, row
    assert not got[2].any()  # the all-zero row


def test_a_row_that_is_not_finite_gives_nan_on_every_path(kernel):
    layer, _, _ = _layer(16, 64, seed=5)
    x = torch.randn(3, 64)
    x[1, 5], x[2, 9] = float("nan"), float("inf")
    for path in [REFERENCE, *_paths(kernel)]:
        y = path.linear(x, layer.packed, layer.wsum, layer.wscale, layer.bias)
        assert not y[0].isnan().any() and y[1].isnan().all() and y[2].isnan().all(), path.isa


def test_the_layer_gives_the_same_output_on_any_path(kernel):
    layer, _, _ = _layer(200, 192, seed=1)
    x = torch.randn(3, 7, 192) * 5
    layer.kernel = REFERENCE
    slow = layer(x)
    for path in _paths(kernel):
        layer.kernel = path
        assert torch.equal(layer(x), slow), path.isa.name
    assert slow.shape == (3, 7, 200)


def test_the_reference_is_the_documented_arithmetic():
    """The reference spelled out on one row by hand, so that the reference itself cannot drift
    from what the docs say: digits on a grid of 127 and one 254 times finer, exact integer
    products, then (coarse + fine / 254) × (a / 127) × scale."""
    codes = torch.tensor([[3, -7, 127, 0]], dtype=torch.int8)
    scale = torch.tensor([0.5])
    x = torch.tensor([[0.1, -2.0, 0.33, 1.0]])
    a = 2.0
    steps = x * ((1.0 / torch.tensor(a)) * 127.0)
    coarse = torch.round(steps)
    fine = torch.round((steps - coarse) * 254.0)
    w = codes.float()
    expected = ((coarse * w).sum() + (fine * w).sum() * (1.0 / 254.0)) * ((a * (1.0 / 127.0)) * 0.5)
    got = int8_linear_reference(x, pack_weights(codes), torch.tensor([0.5, 0, 0, 0]), None)[0, 0]
    assert torch.equal(got, expected.float())
    assert float(got) == pytest.approx(float(x @ (w * scale).t()), rel=1e-4)


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("SPECDEC_KERNELS", raising=False)
    int8_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=int8_linear.__name__):
            assert int8_kernel() is REFERENCE
        assert "did not build" in caplog.text and "tensor-op reference" in caplog.text
    finally:
        int8_kernel.cache_clear()


def test_a_failing_compile_names_the_command(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "cc -DSPECDEC_NOT_A_FLAG=1 -Werror=this-is-not-a-warning")
    with pytest.raises(OSError, match="failed"):
        built_library(int8_linear.SOURCE)
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


def test_the_reference_can_be_forced(monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", "reference")
    int8_kernel.cache_clear()
    try:
        assert int8_kernel() is REFERENCE
    finally:
        int8_kernel.cache_clear()


def test_a_built_library_is_reused(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    first = built_library(int8_linear.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert built_library(int8_linear.SOURCE) == first and first.stat().st_mtime_ns == stamp
