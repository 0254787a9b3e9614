"""GGUF checkpoints (llama.cpp's and Ollama's format): checked, then converted once to a Hugging Face
directory that the ordinary loader reads.

The format is read by the libraries maintained for it, not by a parser of ours: the `gguf` package
(from llama.cpp) opens the file to check it, and `transformers`' GGUF support dequantizes the
weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants and the rest the `gguf` package knows),
undoes llama.cpp's rotary permutation of the query and key projections, and rebuilds the config,
the tokenizer and the chat template from the file's metadata. What it builds is written out with
`save_pretrained`, so a GGUF file and the checkpoint converted from it load through one path
(`loader.load_checkpoint`) and are checked alike.

The conversion is the slow part (about 30 s for a 135M model on 2 cores) and is done once per file
and dtype: `cached_conversion` keys a cache directory by the file's path, size and modification
time, and writes it atomically (a temporary directory renamed into place), so an interrupted
conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.cache import cache_root
from specdec.errors import CheckpointError
from specdec.models.config import SUPPORTED_MODEL_TYPES

GGUF_MAGIC = b"GGUF"
# The dtypes a conversion may store; the loader casts to the engine's dtype at load.
_STORED_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True, slots=True)
class GgufInfo:
    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    name: str  # general.name, or the file's stem
    tensor_types: dict[str, int]  # GGML type name -> number of tensors stored so


def looks_like_gguf(path: Path) -> bool:
    """Whether `path` is a file that claims to be GGUF (by its name or its first four bytes)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def inspect_gguf(path: Path) -> GgufInfo:
    """Open `path` with the `gguf` reader and check what the conversion relies on: the magic, that
    every tensor's data lies inside the file (a truncated download fails here, not halfway through
    a conversion), and an architecture specdec runs."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e})") from e
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ...
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({e}); it may be truncated or corrupt"
        ) from e
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes} "
                f"but the file has {size} bytes"
            )
    arch = _string_field(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: no general.architecture in the GGUF metadata")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return GgufInfo(path, arch, _string_field(reader, "general.name") or path.stem, types)


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception:
        return None
    return value if isinstance(value, str) else None


def convert_gguf(
    path: Path,
    out: Path,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] | None = None,
    info: GgufInfo | None = None,
) -> Path:
    """Write the Hugging Face checkpoint of GGUF file `path` to directory `out` (created; it must
    not exist or be empty), weights dequantized to `dtype`. `info`: the file's `inspect_gguf`,
    when the caller has it already."""
    path, out = Path(path), Path(out)
    info = info or inspect_gguf(path)
    if dtype not in _STORED_DTYPES:
        raise CheckpointError(
            f"cannot store a conversion in {dtype}; choose one of {', '.join(_STORED_DTYPES.values())}"
        )
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new directory for the conversion")
    log = log or _stderr
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    log(f"converting {path.name} ({info.architecture}; tensors: {kinds}) to {_STORED_DTYPES[dtype]}")
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(path.resolve().parent), path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=dtype)
    except ImportError as e:  # transformers' GGUF support needs `gguf` and `accelerate`
        raise CheckpointError(f"{path}: loading GGUF needs the gguf and accelerate packages ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot convert this GGUF file ({e})") from e
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # dequantized already, so the marks are cleared and it saves as the plain model it is.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


_FINGERPRINT_BYTES = 1 << 20


def _content_key(path: Path, dtype: torch.dtype) -> str:
    """What a conversion is cached under: the file's size and its first and last MiB (the header
    and metadata, and the last tensors' data), hashed with the dtype. A file replaced by another
    of the same name, size and time is converted anew; a copy or a `touch` of the same file is not."""
    digest = hashlib.sha256(f"{dtype}|".encode())
    size = path.stat().st_size
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read(_FINGERPRINT_BYTES))
    digest.update(str(size).encode())
    return digest.hexdigest()[:16]


def cached_conversion(
    path: Path, dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None
) -> Path:
    """The converted checkpoint of GGUF file `path`, converting it on first use."""
    path = Path(path).resolve()
    target = cache_root() / "gguf" / f"{path.stem}-{_content_key(path, dtype)}"
    if (target / "config.json").is_file():
        return target
    info = inspect_gguf(path)  # a foreign or truncated file is refused before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    (log or _stderr)(f"{path.name} is converted once, into {target}")
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=target.parent))
    try:
        convert_gguf(path, work / "checkpoint", dtype, log, info)
        try:
            os.replace(work / "checkpoint", target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process converting the same file
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _stderr(message: str) -> None:
    print(f"specdec: {message}", file=sys.stderr, flush=True)
