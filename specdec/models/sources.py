"""What a user may name as a checkpoint, resolved to the Hugging Face directory the loader reads.

- a directory: a Hugging Face checkpoint, used as it is;
- a GGUF file (`*.gguf`, or any file that starts with the GGUF magic): converted once into the
  specdec cache (`gguf_file.cached_conversion`);
- a Hugging Face hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`, optionally `@revision`): the
  snapshot already in the local hub cache ($HF_HOME/hub, or $HF_HUB_CACHE). Nothing is downloaded:
  specdec never reaches the network for a model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import CheckpointError

# owner/name as the hub spells them (a path that exists always wins over this reading).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    path: Path  # the Hugging Face directory to load
    name: str  # what the user knows it by: the directory's name, the GGUF file's stem, the hub id


def resolve_checkpoint(spec: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Checkpoint:
    """The local checkpoint directory `spec` names (see the module docstring). `dtype`: what a GGUF
    file is dequantized to (the cache keeps one conversion per dtype)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return Checkpoint(path, path.resolve().name)
    if path.is_file():
        from specdec.models.gguf_file import cached_conversion, looks_like_gguf

        if not looks_like_gguf(path):
            raise CheckpointError(
                f"{path}: not a directory or a GGUF file (a checkpoint is a Hugging Face directory with "
                "config.json, or a .gguf file)"
            )
        return Checkpoint(cached_conversion(path, _stored_dtype(dtype)), path.stem)
    text = str(spec)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return Checkpoint(hub_snapshot(text), text)
    raise CheckpointError(
        f"{path}: checkpoint directory does not exist (a checkpoint is a Hugging Face directory, a .gguf "
        "file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct already in the local hub cache)"
    )


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    # Dequantized weights are exact in fp32; a half-precision run stores its own dtype (half the disk).
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def hub_snapshot(repo: str) -> Path:
    """The directory of hub id `repo` (`owner/name[@revision]`) in the local hub cache."""
    repo_id, _, revision = repo.partition("@")
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:
        return Path(
            snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
        )
    except Exception as e:  # LocalEntryNotFoundError and friends: it is not in the cache
        raise CheckpointError(
            f"{repo}: not in the local Hugging Face hub cache ({cache}); specdec does not download "
            "models: fetch it where the hub is reachable (huggingface-cli download "
            f"{repo_id}) and copy the cache, or name a local directory or .gguf file ({type(e).__name__})"
        ) from e


def hub_cache() -> Path:
    """The hub cache as the environment says now ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub); read per call, not when huggingface_hub was imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home).expanduser() / "hub"
