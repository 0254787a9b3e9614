"""Benchmarks run with `pytest benches/` (pytest-benchmark). On a machine without a GPU the Triton
kernels run in the interpreter: those timings only check the harness and are never recorded."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def sizes(device: torch.device):
    """sizes(gpu, cpu): realistic shapes on a GPU; small ones that keep the interpreter quick on a
    CPU."""
    return lambda gpu, cpu: gpu if device.type == "cuda" else cpu
