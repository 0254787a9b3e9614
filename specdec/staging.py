"""The step's one host-to-device copy: per-row inputs built on the host first, then sent at once.

Every per-row input of a step - each pass's tokens, slot ids, start positions and lengths, which
logits each row wants, the sampling parameters, seeds, draft placements, the rows of the stacked
q - is known on the host before the first kernel runs. `HostStaging` gathers those arrays into
one byte buffer (pinned on CUDA: a copy from pageable memory may synchronise with the stream and
stall the device between the draft, verify and accept phases) and copies it once; the tensors the
step uses are views of the copy. It is the mirror of `readback.HostCopy`, the step's one copy back.
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.bool_): torch.bool,
}
_ALIGN = 16


class HostStaging:
    """Host arrays to send to the device in one copy. `add` returns a handle; `upload` copies them
    all and returns the device tensors in the order added (int64, int32, int8, float32 and bool
    alike)."""

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []

    def add(self, array: np.ndarray | list) -> int:
        array = np.ascontiguousarray(array)
        if array.dtype not in _TORCH:
            raise TypeError(f"cannot stage an array of {array.dtype}")
        self._arrays.append(array)
        return len(self._arrays) - 1

    def upload(self, device: torch.device) -> list[torch.Tensor]:
        """The arrays on `device`, in one copy (on the CPU the buffer itself: no second copy).
        The staging is empty afterwards, ready for another round."""
        arrays, self._arrays = self._arrays, []
        if not arrays:
            return []
        # Every array starts on a 16-byte boundary, as a fresh allocation would: Triton
        # specialises kernels on their pointers' alignment, so a view must not lose it.
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        # Pinned on CUDA; PyTorch's pinned-memory cache does not reuse the block until the
        # asynchronous copy from it has finished, so a second upload in the same step is safe.
        host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        host_bytes = host.numpy()
        for a, offset in zip(arrays, offsets):
            host_bytes[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
        moved = host.to(device, non_blocking=True)
        return [
            moved[offsets[i] : offsets[i] + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
            for i, a in enumerate(arrays)
        ]
