"""EngineConfig: the engine's settings, frozen and validated in one place.

The CLI flags, the server's options and embedding code all build this same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from specdec.errors import SpecdecError

MAX_GAMMA_LIMIT = 16


class Quantization(Enum):
    """How a model's weights are stored and multiplied (models.quantize; docs/QUANTIZATION.md)."""

    NONE = "none"  # the compute dtype
    INT8 = "int8"  # per channel; on the CPU activations are quantized too, per row (kernels/int8_linear)
    INT4 = "int4"  # groups of 32, weight-only; on the CPU for memory, not speed

    @classmethod
    def parse(cls, value: str | Quantization) -> Quantization:
        if isinstance(value, Quantization):
            return value
        try:
            return cls(value)
        except ValueError:
            raise SpecdecError(
                f"quantization must be one of {', '.join(q.value for q in cls)}, got {value!r}"
            ) from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # Running sequences (= KV cache slots) and prompt + output tokens per sequence. None: sized
    # from the KV memory budget (models.cache_plan): up to 16 slots of min(model limit, 4096).
    max_batch_size: int | None = None
    max_queue: int = 256  # waiting requests beyond the running ones; more is RESOURCE_EXHAUSTED
    max_context: int | None = None
    # Of the memory available at start-up, what the KV caches may take when they are sized from a
    # budget (None: 0.1 on CPU, where RAM is shared with everything else; 0.9 on CUDA).
    kv_memory_fraction: float | None = None
    max_gamma: int = 8  # γmax: the most drafts per row per step
    default_gamma: int = 4  # γ for speculative rows that do not force one, until adaptive γ decides
    # External draft tokens verified per row per step (the rest wait); within it the step's budget
    # below holds them too. 512 lets a whole routed answer (128 tokens by default) verify in one
    # pass while bounding the pass's [tokens, vocabulary] float32 tensors (p, q, logprobs: 100 MB
    # each at 49k vocabulary).
    max_external_draft: int = 512
    # Prompt tokens prefilled per step, padding included (rows x the widest chunk), and the budget
    # external drafts share in the verify pass: long prompts are chunked across steps while the
    # running rows go on decoding. 2048 (vLLM's long-standing default for chunked prefill) bounds a
    # pass's activations - the explicit attention path (Gemma 2) holds heads x tokens x context
    # float32 scores, 1 GiB at 32 heads and a 4096 context - and the stall running rows see.
    max_prefill_tokens: int = 2048
    adaptive: bool = True  # choose γ per step from measured costs and acceptance (else default_gamma)
    warmup: bool = True  # time the passes at start-up, so the first adaptive decisions are informed
    explore_every: int = 16  # a row kept at γ = 0 this many steps drafts γ = 1 once, to refresh its α
    # Adaptive γ checks its predictions against realised step times (costs.RateCorrection); every
    # this many decided steps it runs a neighbour of its choice (G - 1 or G + 1) to keep the
    # ratios of the options it is not choosing current. 0 = no correction and no probes.
    probe_every: int = 20
    speculation_margin: float = (
        0.03  # adaptive γ drafts only if expected tokens/s beat plain decoding by this
    )
    per_row_gamma: bool = False  # adaptive γ per row (which rows draft) instead of one γ for the batch
    acceptance_decay: float = 0.95  # per observed draft position, for each row's acceptance estimate
    acceptance_prior: float = 0.5  # the engine-wide acceptance estimate before any evidence
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bf16 on cuda, fp32 on cpu; or float32 / bfloat16 / float16
    # attention backend: auto | sdpa | math. "auto": on the CPU in float32, passes of few tokens
    # take the C attention core (kernels/layer_cpu); the rest SDPA, or math where scores soft-cap.
    attention: str = "auto"
    target_quantize: Quantization = Quantization.NONE  # the target's weights (models.quantize)
    draft_quantize: Quantization = Quantization.NONE  # the draft's
    memory_fraction: float = 0.9  # of free memory the KV caches may never exceed, however sized
    # Constrained rows' drafts: masked by the grammar pass by pass (a host read of the proposals per
    # pass; the draft proposes only allowed tokens), or unmasked (one host read after the passes, to
    # mask the target's positions; a forbidden draft is rejected there). Both are exact. None: masked
    # on the CPU, where it measured 1.15-1.18x faster (docs/BENCHMARKS.md) and a read costs nothing;
    # unmasked elsewhere, where each read synchronises with the device - one extra per step, not one
    # per draft pass, until a measurement there says otherwise (`mask_drafts_on`). Draft-only rows
    # are always masked: they are the output.
    mask_constrained_drafts: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise SpecdecError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue < 0:
            raise SpecdecError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_context is not None and self.max_context < 2:
            raise SpecdecError(f"max_context must be >= 2, got {self.max_context}")
        if not 1 <= self.max_gamma <= MAX_GAMMA_LIMIT:
            raise SpecdecError(f"max_gamma must be in [1, {MAX_GAMMA_LIMIT}], got {self.max_gamma}")
        if not 0 <= self.default_gamma <= self.max_gamma:
            raise SpecdecError(
                f"default_gamma must be in [0, max_gamma={self.max_gamma}], got {self.default_gamma}"
            )
        if self.max_external_draft < 1:
            raise SpecdecError(f"max_external_draft must be >= 1, got {self.max_external_draft}")
        if self.max_prefill_tokens < 1:
            raise SpecdecError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if not 0 <= self.speculation_margin < 1:
            raise SpecdecError(f"speculation_margin must be in [0, 1), got {self.speculation_margin}")
        if self.probe_every < 0:
            raise SpecdecError(f"probe_every must be >= 0 (0 = off), got {self.probe_every}")
        if self.explore_every < 1:
            raise SpecdecError(f"explore_every must be >= 1, got {self.explore_every}")
        if not 0 < self.acceptance_decay <= 1 or not 0 <= self.acceptance_prior <= 1:
            raise SpecdecError("acceptance_decay must be in (0, 1] and acceptance_prior in [0, 1]")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecdecError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 1:
            raise SpecdecError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        for name in ("target_quantize", "draft_quantize"):
            # Strings are accepted where the settings come from text (embedding code, YAML).
            object.__setattr__(self, name, Quantization.parse(getattr(self, name)))
        if not 0 < self.memory_fraction <= 1:
            raise SpecdecError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")

    @property
    def lookahead(self) -> int:
        """Cache positions past max_context. Draft passes run every row to the batch's longest γ,
        so a row near its limit may write up to max_gamma + 1 positions past it (external drafts
        are cut to the row's remaining budget and never need more)."""
        return self.max_gamma + 2
