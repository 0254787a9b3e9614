"""The decoder, its static KV cache, and the checkpoint loader."""

from specdec.models.config import ModelConfig, RopeConfig
from specdec.models.decoder import Decoder, ForwardBatch
from specdec.models.kv_cache import CacheLayout, KVCache
from specdec.models.loader import LoadedModel, load_checkpoint

__all__ = [
    "CacheLayout",
    "Decoder",
    "ForwardBatch",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "RopeConfig",
    "load_checkpoint",
]
