"""Load a local Hugging Face checkpoint directory into our decoder.

A checkpoint is ``config.json``, ``model.safetensors`` or a sharded ``model.safetensors.index.json``,
and tokenizer files. `transformers` supplies the config and tokenizer classes; the weights are read
with safetensors and checked name by name and shape by shape against what the config implies, so a
mismatched checkpoint fails here with the path and the names, not deep inside a forward pass.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.config import Quantization
from specdec.errors import CheckpointError
from specdec.models.config import ModelConfig, check_config, model_config_from_hf
from specdec.models.decoder import Decoder
from specdec.models.sources import resolve_checkpoint

# Buffers some exporters write that carry nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    path: Path
    name: str
    config: ModelConfig
    model: Decoder
    tokenizer: Any  # a transformers tokenizer
    hf_config: Any
    quantization: Quantization = Quantization.NONE  # its weights' format (models.quantize)

    @property
    def device(self) -> torch.device:
        # The final norm's weight: always a float tensor in the compute dtype, quantized or not.
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow and tests want exactness)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    borrow_from: LoadedModel | None = None,
) -> LoadedModel:
    """Load the model and tokenizer in `path` (a directory, a GGUF file or a hub id in the local
    cache: `sources.resolve_checkpoint`) onto `device` in `dtype`.

    `borrow_from`: the target a draft borrows tensors from (the same tensors, not copies): its
    input embedding (`specdec_shared_embeddings`) - and its tokenizer, when the draft's directory
    has none - and its first layers (`specdec_shared_layers`). Such a draft cannot load without it.

    The RoPE tables are not built here: their length is the KV cache's capacity, which the engine
    decides (``model.init_rope``).
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    checkpoint = resolve_checkpoint(path, dtype)
    path = checkpoint.path
    hf_config = read_hf_config(path)
    config = model_config_from_hf(hf_config, _generation_eos(path))
    check_config(config)
    borrowed = _borrowed(path, config, borrow_from, dtype, device)
    if "embed_tokens.weight" in borrowed and not _has_tokenizer(path):
        # Borrowed embeddings mean the target's ids: its tokenizer is this draft's too.
        tokenizer = borrow_from.tokenizer
    else:
        tokenizer = load_tokenizer(path)
    with torch.device("meta"):
        model = Decoder(config, attention=attention)
    state = _read_weights(path, config, model, dtype, device, borrowed)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.eval().requires_grad_(False)
    return LoadedModel(
        path=path,
        name=checkpoint.name,
        config=config,
        model=model,
        tokenizer=tokenizer,
        hf_config=hf_config,
    )


def read_hf_config(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a checkpoint directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    # Check the architecture ourselves first, so that an unknown one gets our message and list.
    from specdec.models.config import SUPPORTED_MODEL_TYPES

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean the same thing here
        raise CheckpointError(f"{config_file}: transformers cannot read this config ({e})") from e


def _generation_eos(path: Path) -> Any:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return None
    try:
        return json.loads(gen.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return None


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(path: Path) -> Any:
    if not _has_tokenizer(path):
        raise CheckpointError(
            f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "draft and target are paired through their tokenizer, so the checkpoint must carry one"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from e


def _weight_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files, and for a sharded checkpoint the name -> file map of its index."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single], None
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{file}: missing; it is listed in {index.name}")
        return sorted(set(files.values())), files
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


@contextmanager
def _open_shards(files: list[Path]) -> Iterator[dict[str, Any]]:
    """name -> open safetensors handle, for every tensor of every shard (memory-mapped, lazy)."""
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    with ExitStack() as stack:
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:
                raise CheckpointError(
                    f"{file}: cannot read safetensors ({e}); the file may be truncated or corrupt"
                ) from e
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                handles[name] = (handle, file)
        yield handles


def _sources(key: str, available: set[str]) -> list[str]:
    """Checkpoint tensor names that make up our parameter `key` (several when we fuse them)."""
    if key.startswith("lm_head."):
        return [key]
    if key == "head_token_ids":  # stored beside the head it indexes
        return ["lm_head.token_ids"]
    name = "model." + key
    if name in available:
        return [name]
    for fused, parts in (
        ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
        ("gate_up_proj", ("gate_proj", "up_proj")),
    ):
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


def _borrowed(
    path: Path, config: ModelConfig, source: LoadedModel | None, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The target's tensors a draft borrows instead of storing (parameter name -> tensor): its input
    embedding (`specdec_shared_embeddings`) and its first `specdec_shared_layers` layers, each
    checked to fit the draft's config. Empty for a draft that stores everything."""
    if not config.shared_embeddings and not config.shared_layers:
        return {}
    layers = f"{config.shared_layers} layers" if config.shared_layers != 1 else "layer"
    what = " and ".join(
        ([f"its first {layers}"] if config.shared_layers else [])
        + (["its input embeddings"] if config.shared_embeddings else [])
    )
    if source is None:
        raise CheckpointError(
            f"{path}: this draft borrows {what} from its target (specdec_shared_layers / "
            "specdec_shared_embeddings); load it as the draft of that target (--draft, or Engine(target, draft))"
        )
    # The Parameters themselves (state_dict() would hand out detached aliases of them).
    target_state = {**dict(source.model.named_buffers()), **dict(source.model.named_parameters())}
    wanted = ["embed_tokens.weight"] if config.shared_embeddings else []
    if config.shared_layers:
        if config.shared_layers > source.config.num_layers:
            raise CheckpointError(
                f"{path}: borrows {config.shared_layers} layers from a target that has {source.config.num_layers}"
            )
        prefixes = tuple(f"layers.{i}." for i in range(config.shared_layers))
        wanted += [k for k in target_state if k.startswith(prefixes)]
    borrowed = {}
    for key in wanted:
        if key not in target_state:
            raise CheckpointError(
                f"{path}: borrows {what} from a target that is already quantized; load the draft "
                "before quantizing the pair (models.quantize.quantize_pair; the Engine does)"
            )
        weight = target_state[key]
        if weight.dtype != dtype or weight.device != device:
            raise CheckpointError(
                f"{path}: the target it borrows {what} from is on {weight.device} in {weight.dtype}"
            )
        borrowed[key] = weight
    if config.shared_embeddings:
        shape = tuple(borrowed["embed_tokens.weight"].shape)
        if shape != (config.vocab_size, config.hidden_size):
            raise CheckpointError(
                f"{path}: borrows its input embeddings from the target, whose embedding is "
                f"{shape}, but its config needs ({config.vocab_size}, {config.hidden_size})"
            )
    return borrowed


def _read_weights(
    path: Path,
    config: ModelConfig,
    model: Decoder,
    dtype: torch.dtype,
    device: torch.device,
    borrowed: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    files, _index = _weight_files(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for key, tensor in borrowed.items():
        shape = expected.pop(key, None)
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: borrows the target's {key} {tuple(tensor.shape)}, but its config needs "
                f"{'no such weight' if shape is None else shape} (is the draft built for this target?)"
            )
    state: dict[str, torch.Tensor] = {}
    with _open_shards(files) as handles:
        available = set(handles)
        used: set[str] = set()
        missing: list[str] = []
        for key, shape in expected.items():
            sources = _sources(key, available)
            absent = [s for s in sources if s not in available]
            if absent:
                missing.extend(absent)
                continue
            parts = []
            for source in sources:
                handle, file = handles[source]
                try:
                    parts.append(handle.get_tensor(source))
                except Exception as e:
                    raise CheckpointError(
                        f"{file}: cannot read tensor {source} ({e}); the file may be truncated or corrupt"
                    ) from e
            used.update(sources)
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != shape:
                detail = " + ".join(f"{s} {tuple(p.shape)}" for s, p in zip(sources, parts))
                raise CheckpointError(
                    f"{path}: weight {detail} does not match the config: expected {shape} "
                    f"(hidden {config.hidden_size}, heads {config.num_heads}, kv heads {config.num_kv_heads}, "
                    f"head_dim {config.head_dim}, vocab {config.vocab_size})"
                )
            # Weights take the engine's dtype; integer tensors (a subset head's token ids) stay ids.
            loaded = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else torch.long)
            if len(parts) == 1 and loaded.data_ptr() == tensor.data_ptr():
                # Read from one tensor and not converted, so still safetensors' memory map of the
                # file (a concatenation of several is already a copy):
                # a checkpoint overwritten in place under a running server would change (or
                # corrupt: garbage token ids) the served weights. Own the memory instead.
                loaded = loaded.clone()
            state[key] = loaded
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{path}: weights missing from the checkpoint: {shown}")
        unexpected = sorted(
            name
            for name in available - used
            if not name.endswith(_IGNORED_SUFFIXES)
            and not (name == "lm_head.weight" and config.tie_word_embeddings)
        )
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (
                f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            )
            raise CheckpointError(
                f"{path}: weights the {config.model_type} config does not account for: {shown} "
                "(is config.json from the same model?)"
            )
    state.update(borrowed)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if config.head_tokens is not None:
        _check_head_ids(path, state["head_token_ids"], config.vocab_size)
    return state


def _check_head_ids(path: Path, ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise CheckpointError(f"{path}: lm_head.token_ids has ids outside [0, {vocab_size})")
    if torch.unique(ids).numel() != ids.numel():
        raise CheckpointError(f"{path}: lm_head.token_ids lists a token twice")
