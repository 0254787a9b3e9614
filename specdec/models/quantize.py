"""Quantizing a loaded model: every linear layer and the embedding to int8 or int4
(`quant_linear` has the formats and the kernels; docs/QUANTIZATION.md the measurements).

What is quantized: the projections of every layer, the output head and the input embedding. What
is not: the norms, the rotary tables and the attention math, which run in the compute dtype. With
int4 the embedding and the output head are int8, as llama.cpp keeps its output layer at 6 bits or
more: the head decides every token, it is one layer of thirty where int4's rounding would not
average out, and on the CPU the int8 head is also faster. Measured on SmolLM2, whose GGUF stores
the table as Q8_0: int4 groups of it are 8.9% off (relative error), int8 rows 1.2%. A
head tied to the embedding stays tied: the head multiplies by the quantized table and the
embedding dequantizes the rows it gathers from the same codes, so tying costs one table (on the
CPU the embedding reads the rows out of the head's packed layout; untying would keep a 113 MB
float32 embedding for SmolLM2).

A quantized model is a new `Decoder` that shares the original's unquantized tensors (norms): the
original is untouched, so several engines can share one loaded model, and a draft that borrows the
target's embedding or first layers (`specdec_shared_*`) is quantized after it, reusing the
target's quantized modules for the tensors they share (`quantize_pair`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from specdec.config import Quantization
from specdec.errors import SpecdecError
from specdec.models.decoder import Decoder
from specdec.models.linear import Linear
from specdec.models.loader import LoadedModel
from specdec.models.quant_linear import (
    INT4_GROUP,
    Int4Linear,
    Int8Embedding,
    Int8LinearCPU,
    Int8LinearWeightOnly,
    quantize_int4,
    quantize_int8,
)

log = logging.getLogger("specdec")

# Quantized modules already built, by the float tensor they were built from (its storage address
# and shape): a draft's borrowed tensors are the target's own, so they map to the target's modules.
_Built = dict[tuple[int, tuple[int, ...], str], nn.Module]


def _key(weight: torch.Tensor, what: str) -> tuple[int, tuple[int, ...], str]:
    return (weight.data_ptr(), tuple(weight.shape), what)


def quantize_pair(
    target: LoadedModel,
    draft: LoadedModel | None,
    target_scheme: Quantization,
    draft_scheme: Quantization,
) -> tuple[LoadedModel, LoadedModel | None]:
    """The pair with each model quantized as asked (models already in the asked scheme pass as
    they are). A draft quantized like its target shares the modules of the tensors it borrows."""
    built: _Built = {}
    target = quantized(target, target_scheme, built)
    draft = quantized(draft, draft_scheme, built) if draft is not None else None
    return target, draft


def quantized(model: LoadedModel, scheme: Quantization, built: _Built | None = None) -> LoadedModel:
    """`model` with its linear layers and embedding in `scheme` (a new LoadedModel; see the module
    docstring). NONE and the model's own scheme return it as it is; a model quantized to another
    scheme is refused (quantizing twice would compound the rounding)."""
    if model.quantization is scheme or scheme is Quantization.NONE:
        return model  # NONE asks for nothing more: a model quantized already is served as it is
    if model.quantization is not Quantization.NONE:
        raise SpecdecError(
            f"{model.name} is already quantized to {model.quantization.value}, not {scheme.value}"
        )
    with torch.no_grad():  # nothing quantized may carry autograd history into the passes
        return _quantized(model, scheme, {} if built is None else built)


def _quantized(model: LoadedModel, scheme: Quantization, built: _Built) -> LoadedModel:
    source = model.model
    with torch.device("meta"):
        decoder = Decoder(source.cfg, attention=source.attention)
    # Share every tensor of the original (no copies), then swap the quantized modules in.
    decoder.load_state_dict(source.state_dict(keep_vars=True), assign=True, strict=True)
    decoder.tie_weights()
    dtype = source.norm.weight.dtype
    # int4 is for the layers; the embedding and the output head stay int8 (see the module docstring).
    table_scheme = Quantization.INT8 if scheme is Quantization.INT4 else scheme
    for name, module in list(decoder.named_modules()):
        if isinstance(module, Linear) and not (name == "lm_head" and source.cfg.tie_word_embeddings):
            layer_scheme = table_scheme if name == "lm_head" else scheme
            _replace(decoder, name, _linear(module.weight, module.bias, layer_scheme, dtype, built))
    head, embed = _table(decoder.embed_tokens.weight, dtype, built)
    _replace(decoder, "embed_tokens", embed)
    if source.cfg.tie_word_embeddings:
        _replace(decoder, "lm_head", head)
    decoder.num_positions = 0
    decoder.init_rope(source.num_positions)
    decoder.eval().requires_grad_(False)
    return dataclasses.replace(model, model=decoder, quantization=scheme)


def stored_bytes(*models: nn.Module) -> int:
    """Bytes of the weights of `models` as held in memory: float tensors as stored, quantized
    modules as packed, each counted once however many modules or models share it (a draft that
    borrows the target's embedding adds nothing for it to the pair's total)."""
    modules_seen: set[int] = set()
    storages_seen: set[int] = set()
    total = 0
    for model in models:
        for module in model.modules():
            if hasattr(module, "stored_bytes"):
                if id(module) not in modules_seen:
                    modules_seen.add(id(module))
                    total += module.stored_bytes
                continue
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.untyped_storage().data_ptr() not in storages_seen:
                    storages_seen.add(tensor.untyped_storage().data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return total


def describe_weights(model: LoadedModel) -> str:
    """The weights' format and size in memory, for the start-up log: "int8 weights, 171.3 MB"."""
    if model.quantization is Quantization.NONE:
        what = f"{str(model.dtype).removeprefix('torch.')} weights"
    else:
        what = f"{model.quantization.value} weights"
    return f"{what}, {stored_bytes(model.model) / 1e6:.1f} MB"


def _fits(weight: torch.Tensor, scheme: Quantization) -> Quantization:
    """The scheme a weight [N, K] gets: int4 needs K in whole groups; a weight without them is
    int8 instead (as llama.cpp stores a tensor whose rows do not fill its blocks in another type)."""
    if scheme is Quantization.INT4 and weight.shape[1] % INT4_GROUP:
        log.info(
            "int4: in_features %d is not a multiple of %d; int8 for that weight", weight.shape[1], INT4_GROUP
        )
        return Quantization.INT8
    return scheme


def _linear(weight: torch.Tensor, bias, scheme: Quantization, dtype: torch.dtype, built: _Built) -> nn.Module:
    scheme = _fits(weight, scheme)
    key = _key(weight, f"linear-{scheme.value}")
    if key not in built:
        cpu = weight.device.type == "cpu"
        if scheme is Quantization.INT8:
            codes, scale = quantize_int8(weight)
            built[key] = (
                Int8LinearCPU(codes, scale, bias) if cpu else Int8LinearWeightOnly(codes, scale, bias, dtype)
            )
        else:
            codes, scale, zero = quantize_int4(weight)
            built[key] = Int4Linear(codes, scale, zero, bias, dtype)
    return built[key]


def _table(weight: torch.Tensor, dtype: torch.dtype, built: _Built) -> tuple[nn.Module, nn.Module]:
    """(head, embedding) over one int8 table of `weight` [V, K]: the head for a tied model, the
    embedding for every model (both int8 whatever the layers are; see the module docstring)."""
    key = _key(weight, "table-int8")
    if key not in built:
        codes, scale = quantize_int8(weight)
        cpu = weight.device.type == "cpu"
        if cpu:
            head = Int8LinearCPU(codes, scale, None)
            embed = Int8Embedding.reading(head, dtype)  # the head's packed codes, not a copy
        else:
            head = Int8LinearWeightOnly(codes, scale, None, dtype)
            embed = Int8Embedding(codes, scale, dtype)
        built[key] = nn.ModuleList([head, embed])
    head, embed = built[key]
    return head, embed


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
