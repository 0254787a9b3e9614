"""Counter-based randomness: the Triton function, the CPU's C and the PyTorch mirror agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.philox import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    _cpu_uniform,
    philox4x32_reference,
    uniform,
    uniform_reference,
    uniform_triton,
)


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_known_answers(counter, key, expected):
    """Random123's published Philox4x32-10 test vectors."""
    words = philox4x32_reference(*(torch.tensor([v]) for v in counter + key))
    assert tuple(int(w) for w in words) == expected


def test_triton_equals_reference_bit_for_bit():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat(
        [torch.tensor([0, 1, 2**63 - 1, 2**32, 2**32 - 1]), torch.randint(0, 2**62, (11,), generator=g)]
    )
    positions = torch.cat(
        [torch.tensor([0, 2**31 - 1, 1, 7, 100]), torch.randint(0, 2**20, (11,), generator=g)]
    )
    seeds, positions = seeds.to(device), positions.to(device)
    for stream, lanes in ((STREAM_DRAFT, 1), (STREAM_ACCEPT, 7), (2, 333)):
        assert torch.equal(
            uniform_triton(seeds, stream, positions, lanes),
            uniform_reference(seeds, stream, positions, lanes),
        )


def test_cpu_c_equals_reference_bit_for_bit(monkeypatch):
    """`uniform` (the sampling references' draw) is philox_cpu.c on the CPU: bitwise the tensor
    ops for every seed (negative ones too: their high word is the two's complement's), position,
    stream, lane count (not only multiples of 4) and thread count."""
    if _cpu_uniform() is None:
        pytest.skip("no C compiler here: `uniform` is the tensor ops themselves")
    g = torch.Generator().manual_seed(1)
    seeds = torch.cat(
        [
            torch.tensor([0, -1, -(2**63), 2**63 - 1, 2**32]),
            torch.randint(-(2**62), 2**62, (27,), generator=g),
        ]
    )
    positions = torch.cat(
        [torch.tensor([0, 2**31 - 1, 2**32 - 1, 1, 5]), torch.randint(0, 2**20, (27,), generator=g)]
    )
    for stream, lanes in ((STREAM_DRAFT, 1), (STREAM_ACCEPT, 7), (2, 333), (2, 4099)):
        expected = uniform_reference(seeds, stream, positions, lanes)
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
            assert torch.equal(uniform(seeds, stream, positions, lanes), expected), (stream, lanes, threads)
    assert uniform(seeds[:0], 0, positions[:0], 5).shape == (0, 5)


def test_reference_kernels_forced_use_tensor_ops(monkeypatch):
    """SPECDEC_KERNELS=reference bypasses the C (to bisect a suspected kernel bug)."""
    monkeypatch.setenv("SPECDEC_KERNELS", "reference")
    _cpu_uniform.cache_clear()
    try:
        assert _cpu_uniform() is None
        seeds, positions = torch.tensor([3, 4]), torch.tensor([0, 9])
        assert torch.equal(uniform(seeds, 2, positions, 9), uniform_reference(seeds, 2, positions, 9))
    finally:
        monkeypatch.delenv("SPECDEC_KERNELS")
        _cpu_uniform.cache_clear()


def test_uniforms_are_open_interval_and_uniform():
    u = uniform_reference(torch.arange(64), 0, torch.arange(64), 4096).flatten()
    assert u.min() > 0 and u.max() < 1
    hist = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = (((hist - expected) ** 2) / expected).sum().item()
    assert chi2 < 45.3  # χ²(19) at 1e-3


def test_streams_positions_and_seeds_are_independent_draws():
    seed, pos = torch.tensor([42]), torch.tensor([10])
    a = uniform_reference(seed, 0, pos, 16)
    assert not torch.equal(a, uniform_reference(seed, 1, pos, 16))
    assert not torch.equal(a, uniform_reference(seed, 0, pos + 1, 16))
    assert not torch.equal(a, uniform_reference(seed + 1, 0, pos, 16))
    # Position and lane are separate counter words: (pos, lane 4) is not (pos + 1, lane 0).
    wide = uniform_reference(seed, 0, pos, 8)
    assert wide[0, 4] != uniform_reference(seed, 0, pos + 1, 1)[0, 0]
