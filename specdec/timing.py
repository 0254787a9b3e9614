"""Timing of the step's passes (for the adaptive-γ cost model), and the step's one sync point."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class PassKind(enum.Enum):
    """The forward passes of a step whose cost the γ policy weighs."""

    DRAFT = "draft"  # one draft-model pass, one token per drafting row
    VERIFY = "verify"  # one target pass (and its acceptance) over the rows' γ + 1 positions
    CATCHUP = "catchup"  # the draft-model pass that feeds rows the tokens they missed at γ = 0


@dataclass(frozen=True, slots=True)
class PassTiming:
    kind: PassKind
    batch: int  # rows in the pass
    width: int  # columns of the pass (positions per row)
    seconds: float


class PassTimer:
    """Times the step's passes without adding a sync: wall clock on the CPU (where every op is
    synchronous), CUDA events on a GPU, read only after the step's one device-to-host copy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._records: list[tuple[PassKind, int, int, object, object]] = []

    @contextmanager
    def measure(self, kind: PassKind, batch: int, width: int) -> Iterator[None]:
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
        self._records.append((kind, batch, width, start, end))

    def drain(self) -> list[PassTiming]:
        """Every pass timed since the last drain."""
        out = []
        for kind, batch, width, start, end in self._records:
            if self.cuda:
                seconds = start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]
            else:
                seconds = float(end) - float(start)  # type: ignore[arg-type]
            out.append(PassTiming(kind, batch, width, seconds))
        self._records.clear()
        return out


@contextmanager
def sync_point(device: torch.device) -> Iterator[None]:
    """The one place a step waits for the device. Under torch.cuda.set_sync_debug_mode("error") the
    synchronising CUDA calls torch knows of (a blocking device-to-host copy, .item(), nonzero, ...)
    raise everywhere else in the step, which is how the GPU tests hold the step to this one sync.
    (That mode does not see a stream stalled by a copy from pageable host memory.)"""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
