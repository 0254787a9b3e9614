"""Triton kernels of the speculative hot loop, each with a pure-PyTorch reference beside it; and
C for the CPU, each beside its tensor ops: int8's product (`int8_linear`) and a float32 layer's
attention core and norm (`layer_cpu`) and the sampling draws' Philox (`philox`), built at first
use (`native`).

Installed as ``specdec.kernels``. The references are also the CPU path; `use_triton` says which of
the two the engine runs. On a machine without a GPU the kernels themselves run only under
``TRITON_INTERPRET=1`` (the tests hold them equal to the references there).
"""

from __future__ import annotations

import os

import torch

from specdec.kernels.philox import HAVE_TRITON


def use_triton(device: torch.device) -> bool:
    """Run the Triton kernels on CUDA devices (when Triton is installed); the references elsewhere.

    SPECDEC_KERNELS=reference forces the references everywhere, CPU int8's C product's too (to bisect a
    suspected kernel bug);
    SPECDEC_KERNELS=triton forces the kernels (on a CPU that needs TRITON_INTERPRET=1)."""
    choice = os.environ.get("SPECDEC_KERNELS", "auto")
    if choice == "reference" or not HAVE_TRITON:
        return False
    if choice == "triton":
        return True
    return device.type == "cuda"
