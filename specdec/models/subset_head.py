"""Drafts with a small output head (the FR-Spec idea) and borrowed input embeddings, on disk.

A draft's output layer is most of its cost when the vocabulary is large (SmolLM2: 49152 tokens x
576 is 80% of a 1-layer draft's pass). Most of what a model emits comes from a few thousand tokens,
so the head keeps only a frequency-ranked subset: `lm_head.weight` has one row per subset token
and `lm_head.token_ids` says which vocabulary id each row is. The config marks it with
`specdec_head_tokens` (the subset's size); the decoder scatters the subset's logits into the full
vocabulary at -inf, so the draft's q is exactly 0 outside the subset and verification stays exact:
the target still decides every token, including those the draft can never propose.

A draft whose hidden size is the target's may also borrow the target's input embedding instead of
storing a copy (`specdec_shared_embeddings`: the file has no `model.embed_tokens.weight`, and the
loader takes the target's tensor, `load_checkpoint(..., borrow_from=target)`), and a draft of the
target's shape may borrow the target's first layers too (`specdec_shared_layers`: the file has no
`model.layers.{i}.*` for those; the self-speculative idea - the draft is the target's own first
layers with trained layers and a small head on top, so only those are stored and trained).

Such a checkpoint is specdec's own: `transformers` cannot load it (its head is not vocabulary-wide).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from specdec.errors import SpecdecError


def frequency_ranked(token_ids: Iterable[int], size: int, always: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent ids of `token_ids` (ties by id), `always` (the end-of-turn and
    end-of-text tokens) included first; padded with the lowest unused ids when the text has fewer
    distinct tokens. Sorted, so the head's rows follow vocabulary order."""
    counts: dict[int, int] = {}
    for t in token_ids:
        counts[int(t)] = counts.get(int(t), 0) + 1
    chosen = list(dict.fromkeys(int(t) for t in always))
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        if t not in chosen:
            chosen.append(t)
    filler = 0
    while len(chosen) < size:
        if filler not in chosen:
            chosen.append(filler)
        filler += 1
    return sorted(chosen[:size])


def save_draft(
    out: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    head_token_ids: list[int] | None,
    share_embeddings: bool,
    dtype: torch.dtype,
    shared_layers: int = 0,
) -> None:
    """Write a draft checkpoint to `out`: `config` (a Hugging Face config dict), `state` (its weights
    under Hugging Face names, `lm_head.weight` already cut to the subset's rows when there is one).
    `share_embeddings`, `shared_layers`: the embedding and first layers are the target's, left out."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items() if v.is_floating_point()}
    config = dict(config)
    if head_token_ids is not None:
        ids = torch.tensor(head_token_ids, dtype=torch.int64)
        if tensors["lm_head.weight"].shape[0] != len(ids):
            raise SpecdecError(
                f"lm_head has {tensors['lm_head.weight'].shape[0]} rows but {len(ids)} token ids"
            )
        tensors["lm_head.token_ids"] = ids
        config.update(specdec_head_tokens=len(ids), tie_word_embeddings=False)
    if share_embeddings:
        tensors.pop("model.embed_tokens.weight", None)
        config["specdec_shared_embeddings"] = True
    if shared_layers:
        borrowed = tuple(f"model.layers.{i}." for i in range(shared_layers))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(borrowed)}
        config["specdec_shared_layers"] = shared_layers
    config["dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def restrict_checkpoint(
    src: Path, dst: Path, head_token_ids: list[int], share_embeddings: bool = False, shared_layers: int = 0
) -> Path:
    """Copy the full-head draft checkpoint `src` to `dst` with its head cut to `head_token_ids`
    (and its embedding, its first `shared_layers` layers, dropped for the target's)."""
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])  # tied: the embedding
    state["lm_head.weight"] = head[torch.tensor(head_token_ids)]
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    save_draft(dst, config, state, head_token_ids, share_embeddings, dtype, shared_layers)
    return dst
