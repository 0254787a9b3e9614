"""Training text: files in, fixed-length token windows out.

Accepted inputs: plain text files, JSON Lines (one object per line; its "text" field), and
directories (source trees, walked for text files). Held-out evaluation uses whole files, so no
window of a held-out file is ever trained on.

Windows are drawn from a generator seeded by (seed, step): the batch of step s is the same on every
run and after a resume, without saving any random state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.errors import SpecdecError

TEXT_SUFFIXES = (
    ".py",
    ".txt",
    ".md",
    ".rst",
    ".c",
    ".h",
    ".cpp",
    ".js",
    ".ts",
    ".go",
    ".rs",
    ".java",
    ".json",
    ".toml",
    ".yaml",
    ".yml",
)


@dataclass(slots=True)
class Document:
    name: str
    text: str


def read_documents(paths: list[str | Path], jsonl_field: str = "text") -> list[Document]:
    """Every document under `paths`, in a deterministic order."""
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SpecdecError(f"--data {path}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            docs.extend(Document(str(f), f.read_text(errors="replace")) for f in files)
        elif path.suffix in (".jsonl", ".ndjson"):
            for i, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[jsonl_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SpecdecError(
                        f"{path}:{i + 1}: not a JSON object with a {jsonl_field!r} field ({e})"
                    ) from e
                docs.append(Document(f"{path}:{i + 1}", str(text)))
        else:
            docs.append(Document(str(path), path.read_text(errors="replace")))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SpecdecError(f"no text found in --data {', '.join(map(str, paths))}")
    return docs


def split_heldout(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out): every k-th document is held out, k = round(1 / fraction)."""
    if not 0 < fraction < 1:
        raise SpecdecError(f"held-out fraction must be in (0, 1), got {fraction}")
    if len(docs) < 2:
        raise SpecdecError("need at least two documents to hold one out for evaluation")
    k = min(max(2, round(1 / fraction)), len(docs))  # at least one document is held out
    heldout = [d for i, d in enumerate(docs) if i % k == k - 1]
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    return train, heldout


class TokenStream:
    """All documents tokenised and joined by EOS into one stream of ids."""

    def __init__(self, docs: list[Document], tokenizer: Any):
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for doc in docs:
            ids.extend(tokenizer.encode(doc.text, add_special_tokens=False))
            ids.append(eos)
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """[batch_size, seq_len] windows at offsets drawn from a generator seeded by (seed, step)."""
        if len(self.ids) <= seq_len:
            raise SpecdecError(
                f"the training text has {len(self.ids)} tokens, fewer than one window of {seq_len}"
            )
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.ids) - seq_len, size=batch_size)
        return torch.from_numpy(np.stack([self.ids[s : s + seq_len] for s in starts]))

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
        """Non-overlapping windows from the start of the stream: the same every evaluation."""
        n = min(max_batches * batch_size, len(self.ids) // seq_len)
        windows = [self.ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
        return [torch.from_numpy(np.stack(windows[i : i + batch_size])) for i in range(0, n, batch_size)]
