"""The serving default for torch's compute threads on the CPU (specdec.server.app)."""

from __future__ import annotations

import pytest
import torch

from specdec.server.app import configure_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_leaves_one_core_to_the_grpc_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_cpu_threads(torch.device("cpu"), available=4) == 3
    assert configure_cpu_threads(torch.device("cpu"), available=4) == 3  # twice: the same
    assert configure_cpu_threads(torch.device("cpu"), available=1) == 1  # never zero


def test_an_explicit_count_or_the_users_omp_setting_wins(monkeypatch):
    torch.set_num_threads(4)
    assert configure_cpu_threads(torch.device("cpu"), requested=2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    torch.set_num_threads(4)
    assert configure_cpu_threads(torch.device("cpu")) == 4


def test_a_gpu_keeps_torchs_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(4)
    assert configure_cpu_threads(torch.device("cuda")) == 4
