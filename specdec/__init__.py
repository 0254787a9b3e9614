"""specdec: speculative decoding served over gRPC.

``from specdec import Engine`` embeds the engine without the server.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import specdec` (and the CLI's --help) does not load torch.
    if name == "Engine":
        from specdec.engine import Engine

        return Engine
    if name == "SamplingParams":
        from specdec.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
