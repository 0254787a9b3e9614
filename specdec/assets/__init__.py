"""Where the models used when none are named live.

The embedded demo pair (`demo/`: an 8-layer target and a 1-layer draft trained here on the Python
standard library) ships inside the package, so the server does something real on a fresh machine
with no downloads. The CLI, the bench and the load test all resolve "no model given" here.
"""

from __future__ import annotations

from pathlib import Path

from specdec.errors import SpecdecError

DEMO = Path(__file__).resolve().parent / "demo"


def demo_pair() -> tuple[Path, Path]:
    """(target, draft) directories of the embedded demo pair."""
    target, draft = DEMO / "target", DEMO / "draft"
    if not (target / "model.safetensors").exists():
        raise SpecdecError(f"the embedded demo pair is missing from {DEMO}; name a checkpoint with --target")
    return target, draft


def resolve_pair(target: Path | None, draft: Path | None) -> tuple[Path, Path | None]:
    """The checkpoints a command runs on: the ones named, or the default pair when none is."""
    if target:
        return target, draft
    if draft:
        raise SpecdecError("--draft needs --target")
    return demo_pair()
