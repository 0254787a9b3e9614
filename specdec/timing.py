"""Timing of the step's passes (for the adaptive-γ cost model), and the step's one sync point."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PassTimer:
    """Times the step's passes without adding a sync: wall clock on the CPU (where every op is
    synchronous), CUDA events on a GPU, read only after the step's one device-to-host copy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._records: list[tuple[str, int, int, object, object]] = []

    @contextmanager
    def measure(self, kind: str, batch: int, size: int) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._records.append((kind, batch, size, start, end))

    def drain(self) -> list[tuple[str, int, int, float]]:
        """(kind, batch, size, seconds) of every pass since the last drain."""
        out = []
        for kind, batch, size, start, end in self._records:
            if self.cuda:
                seconds = start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]
            else:
                seconds = float(end) - float(start)  # type: ignore[arg-type]
            out.append((kind, batch, size, seconds))
        self._records.clear()
        return out


@contextmanager
def sync_point(device: torch.device) -> Iterator[None]:
    """The one place a step waits for the device. With torch.cuda.set_sync_debug_mode("error")
    every other synchronising op in a step raises, which is how the GPU tests hold the step to a
    single sync."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
