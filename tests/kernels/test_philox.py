"""Counter-based randomness: the Triton function and its PyTorch mirror agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.philox import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    philox4x32_reference,
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
