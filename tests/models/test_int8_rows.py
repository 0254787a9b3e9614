"""The C row kernels of CPU int8 (specdec/kernels/int8_rows.c) against their tensor-op reference:
bitwise equal, so which one runs never changes an output; and the fallback when no compiler
works."""

from __future__ import annotations

import logging

import pytest
import torch

from specdec.kernels import int8_rows
from specdec.kernels.int8_rows import REFERENCE, RowKernels, row_kernels
from specdec.models.quant_linear import Int8LinearCPU, quantize_int8


@pytest.fixture(scope="module")
def c_kernels():
    kernels = row_kernels()
    if not isinstance(kernels, RowKernels):
        pytest.skip("no working C compiler here: the reference is the only path")
    return kernels


GRIDS = [(127.5, 127.0), (63.5, 63.0)]  # full-range fbgemm, and reduce_range (no VNNI)


def _rows(r, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g) * torch.logspace(-6, 4, r)[:, None]  # rows of every scale
    x[0, k // 2] = 50.0 * float(x[0].abs().max())  # an outlier channel sets a row's scale
    if r > 2:
        x[2] = 0.0  # an all-zero row: the floor on the maximum, no NaN
    if r > 3:
        x[3, :: max(1, k // 7)] = 0.5 / 127.5 * float(x[3].abs().max())  # values on the half-step
    return x


@pytest.mark.parametrize("levels,top", GRIDS)
@pytest.mark.parametrize("r,k", [(1, 576), (5, 1536), (33, 577), (4, 1), (2, 3)])
def test_row_digits_are_bitwise_the_reference(c_kernels, levels, top, r, k):
    x = _rows(r, k, seed=r * 1000 + k)
    fast, slow = torch.full((2 * r, k + 2), float("nan")), torch.full((2 * r, k + 2), float("nan"))
    amax_fast = c_kernels.row_digits(x, levels, top, fast)
    amax_slow = REFERENCE.row_digits(x, levels, top, slow)
    assert torch.equal(amax_fast, amax_slow)
    # Bit for bit: torch.equal calls -0.0 and +0.0 equal, the bit patterns do not.
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    assert torch.equal(fast[:, k:], torch.tensor([1.0, -1.0]).expand(2 * r, 2))  # the guard pair
    # Within fbgemm's [-1, 1]: the coarse digit on the grid, the fine one within half a step (a
    # row's maximum may round a hair past the top level, so the clamp leaves a hair more).
    assert float(fast[:r, :k].abs().max()) <= 1.0 and float(fast[r:, :k].abs().max()) <= 0.5 + 1e-4


@pytest.mark.parametrize("with_bias", [False, True])
def test_combine_is_bitwise_the_reference(c_kernels, with_bias):
    g = torch.Generator().manual_seed(7)
    r, n = 5, 301
    both = torch.randn(2 * r, n, generator=g) * 1000
    amax = torch.rand(r, 1, generator=g) * 10
    bias = torch.randn(n, generator=g) if with_bias else None
    fast = c_kernels.combine(both.clone(), amax, bias, 127.5)
    slow = REFERENCE.combine(both.clone(), amax, bias, 127.5)
    assert fast.shape == (r, n) and torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_a_nan_row_stays_nan_in_both(c_kernels):
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    fast, slow = torch.empty(4, 66), torch.empty(4, 66)
    amax_fast = c_kernels.row_digits(x, 127.5, 127.0, fast)
    amax_slow = REFERENCE.row_digits(x, 127.5, 127.0, slow)
    assert torch.equal(amax_fast[0], amax_slow[0]) and torch.equal(fast[0], slow[0])
    assert bool(amax_fast[1].isnan()) and bool(amax_slow[1].isnan())


def test_the_int8_layer_gives_the_same_output_on_either_path(c_kernels):
    g = torch.Generator().manual_seed(1)
    codes, scale = quantize_int8(torch.randn(200, 192, generator=g) * 0.02)
    layer = Int8LinearCPU(codes, scale, torch.randn(200, generator=g))
    x = torch.randn(3, 7, 192, generator=g) * 5
    layer.rows = c_kernels
    fast = layer(x)
    layer.rows = REFERENCE
    assert torch.equal(fast, layer(x))


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("SPECDEC_KERNELS", raising=False)
    row_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=int8_rows.__name__):
            assert row_kernels() is REFERENCE
        assert "did not build" in caplog.text and "tensor-op path" in caplog.text
    finally:
        row_kernels.cache_clear()


def test_a_failing_compile_names_the_command(c_kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "cc -DSPECDEC_NOT_A_FLAG=1 -Werror=this-is-not-a-warning")
    with pytest.raises(OSError, match="failed"):
        int8_rows._built_library()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


def test_the_reference_can_be_forced(monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", "reference")
    row_kernels.cache_clear()
    try:
        assert row_kernels() is REFERENCE
    finally:
        row_kernels.cache_clear()


def test_a_built_library_is_reused(c_kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    first = int8_rows._built_library()
    stamp = first.stat().st_mtime_ns
    assert int8_rows._built_library() == first and first.stat().st_mtime_ns == stamp
