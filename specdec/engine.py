"""The public facade: ``from specdec import Engine``.

    engine = Engine(target="path/to/target", draft="path/to/draft")
    [result] = engine.generate(["def fibonacci(n):"], SamplingParams(max_new_tokens=64))
    print(result.text, result.stats.acceptance_rate)

An Engine loads a pair (or one model), checks it, and wires the parts together: the request
limits (`validation`), the model runner (models, caches, passes), the γ planner and the scheduler
(slots and queues), which it then drives synchronously. It knows nothing of gRPC; the server runs
the same scheduler loop in a thread of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from specdec.chat import encode_chat
from specdec.config import EngineConfig
from specdec.errors import InvalidRequestError
from specdec.grammar import Constraint
from specdec.models.cache_plan import plan_cache
from specdec.models.loader import LoadedModel, load_checkpoint
from specdec.models.pair import check_pair
from specdec.models.quantize import describe_weights, quantize_pair, stored_bytes
from specdec.planner import GammaPlanner
from specdec.request import GenerationResult, Mode, Request, RequestOutput, SpecStats, Timing
from specdec.runner import ModelRunner
from specdec.sampling import SamplingParams
from specdec.scheduler import Scheduler, StepReport
from specdec.speculative import AcceptKernels
from specdec.validation import RequestLimits, check_prompt_chars, validate

log = logging.getLogger("specdec")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class Engine:
    def __init__(
        self,
        target: str | os.PathLike[str] | LoadedModel,
        draft: str | os.PathLike[str] | LoadedModel | None = None,
        config: EngineConfig | None = None,
        *,
        planner: GammaPlanner | None = None,
        kernels: AcceptKernels | None = None,
    ):
        """`planner`: a γ planner to use instead of a fresh one (tests inject synthetic costs or a
        forced γ schedule through it). `kernels`: the acceptance kernels (default: by device)."""
        self.config = config or EngineConfig()
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        target_model = _load(target, device, dtype, self.config.attention)
        draft_model = (
            _load(draft, device, dtype, self.config.attention, borrow_from=target_model)
            if draft is not None
            else None
        )
        # Quantized after both are loaded: a draft borrows the target's float tensors first.
        self.target, self.draft = quantize_pair(
            target_model, draft_model, self.config.target_quantize, self.config.draft_quantize
        )
        del target_model, draft_model  # the float originals, unless the caller holds them
        if self.draft is not None:
            check_pair(self.target, self.draft)
        # What the config leaves open (slots, context) is sized from the KV memory budget now that
        # the weights are loaded; from here on the config holds the sizes chosen.
        models = [self.target] if self.draft is None else [self.target, self.draft]
        self.cache_plan = plan_cache(
            [m.config for m in models],
            self.target.dtype,
            self.target.device,
            self.config.lookahead,
            min(m.config.max_position_embeddings for m in models),
            self.config.max_batch_size,
            self.config.max_context,
            self.config.kv_memory_fraction,
            target_features=self.draft is not None and self.draft.config.feature_input,
        )
        self.config = dataclasses.replace(
            self.config, max_batch_size=self.cache_plan.slots, max_context=self.cache_plan.max_context
        )
        self.limits = RequestLimits.for_pair(self.target, self.draft, self.config)
        self.runner = ModelRunner(self.target, self.draft, self.config, self.limits, kernels)
        self.planner = planner or GammaPlanner(self.config)
        self.scheduler = Scheduler(self.runner, self.planner, self.limits, self.config)
        if self.config.warmup and self.config.adaptive:
            self.planner.calibrate(self.runner.warm_up())
        log.info(
            "target %s (%s, %d layers, %s), draft %s; %s",
            self.target.name,
            self.target.config.model_type,
            self.target.config.num_layers,
            describe_weights(self.target),
            f"{self.draft.name} ({describe_weights(self.draft)}; the pair "
            f"{stored_bytes(self.target.model, self.draft.model) / 1e6:.1f} MB)"
            if self.draft
            else "none",
            self.cache_plan.describe(),
        )

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.limits.vocab_size

    @property
    def max_context(self) -> int:
        return self.limits.max_context

    # ------------------------------------------------------------------ building requests

    def encode(self, prompt: str) -> list[int]:
        """Token ids of prompt text; text that cannot fit the context is refused untokenized."""
        check_prompt_chars(len(prompt), self.limits, "prompt")
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template (generation prompt
        added); message content stays text (`specdec.chat`)."""
        check_prompt_chars(sum(len(m["content"]) for m in messages), self.limits, "messages")
        return encode_chat(self.tokenizer, messages)

    def check_constraint(self, constraint: Constraint) -> None:
        """Compile a constraint now (InvalidRequestError naming the field if it cannot be): the
        server does it in a worker thread, so the engine loop later finds it in the cache."""
        self.scheduler.runner.grammars().compile(constraint)

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        mode: Mode | str | None = None,
        num_speculative_tokens: int = 0,
        request_id: str = "",
        external_draft: list[int] | None = None,
        external_draft_from_draft: bool = False,
        constraint: Constraint | None = None,
    ) -> Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if isinstance(mode, str):
            try:
                mode = Mode(mode)
            except ValueError:
                raise InvalidRequestError(
                    "mode", f"unknown mode {mode!r}; one of {', '.join(m.value for m in Mode)}"
                ) from None
        return Request(
            prompt_ids=ids,
            params=params or SamplingParams(),
            mode=mode,
            num_speculative_tokens=num_speculative_tokens,
            request_id=request_id,
            external_draft=external_draft,
            external_draft_from_draft=external_draft_from_draft,
            constraint=constraint,
        )

    # ------------------------------------------------------------------ running them

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int] | Request],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        mode: Mode | str | None = None,
        num_speculative_tokens: int = 0,
        max_concurrency: int | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> list[GenerationResult]:
        """Run `prompts` (strings, token-id lists or Requests) to completion, batched together;
        `params` is one SamplingParams for all or one per prompt. Results come in prompt order.
        With `max_concurrency`, at most that many are in flight: the next starts as soon as one
        finishes (a closed loop, as clients of a server would keep it busy). `on_step` sees every
        step's report (what the bench measures)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        requests = [
            p if isinstance(p, Request) else self.make_request(p, sp, mode, num_speculative_tokens)
            for p, sp in zip(prompts, params)
        ]
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        for request in requests:  # every request is checked before any starts
            validate(request, self.limits)
            if request.constraint is not None:
                self.check_constraint(request.constraint)
        limit = max_concurrency or len(requests)
        todo = deque(enumerate(requests))
        handles: list[int] = [-1] * len(requests)
        collected: dict[int, list[RequestOutput]] = {}
        in_flight = 0
        try:
            while todo or in_flight:
                while todo and in_flight < limit:
                    index, request = todo.popleft()
                    # No queue limit in-process: the caller's own loop is the back-pressure.
                    handles[index] = self.scheduler.add_request(request, check_queue=False)
                    collected[handles[index]] = []
                    in_flight += 1
                report = self.scheduler.step()
                if on_step is not None:
                    on_step(report)
                for out in report.outputs:
                    if out.handle in collected:
                        collected[out.handle].append(out)
                        if out.finished:
                            in_flight -= 1
        finally:
            # Interrupted (an exception here or in on_step): nothing of this call stays queued to
            # run during some later call.
            self._drop([h for h in handles if h >= 0 and self.scheduler.is_active(h)])
        return [merge_outputs(collected[h]) for h in handles]

    def _drop(self, handles: list[int]) -> None:
        """Cancel these requests and step until the scheduler has let go of them."""
        for handle in handles:
            self.scheduler.cancel(handle)
        while any(self.scheduler.is_active(h) for h in handles):
            self.scheduler.step()

    def stream(
        self,
        prompt: str | list[int] | Request,
        params: SamplingParams | None = None,
        mode: Mode | str | None = None,
        num_speculative_tokens: int = 0,
    ) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per step for one request (new tokens and text); the last one has
        `finished` set and carries the totals. Closing the iterator cancels the request."""
        request = (
            prompt
            if isinstance(prompt, Request)
            else self.make_request(prompt, params, mode, num_speculative_tokens)
        )
        handle = self.scheduler.add_request(request, check_queue=False)
        done = False
        try:
            while not done:
                for out in self.scheduler.step().outputs:
                    if out.handle == handle:
                        done = out.finished
                        if out.new_token_ids or out.new_text or out.finished:
                            yield out
        finally:
            if not done:
                self._drop([handle])


def _load(
    spec: Any,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    borrow_from: LoadedModel | None = None,
) -> LoadedModel:
    if isinstance(spec, LoadedModel):
        return spec
    return load_checkpoint(spec, device=device, dtype=dtype, attention=attention, borrow_from=borrow_from)


def merge_outputs(outputs: list[RequestOutput]) -> GenerationResult:
    """One request's outputs, in order, as its GenerationResult."""
    last = outputs[-1]
    assert last.finished and last.finish_reason is not None
    return GenerationResult(
        request_id=last.request_id,
        text="".join(o.new_text for o in outputs),
        token_ids=[t for o in outputs for t in o.new_token_ids],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        stats=last.stats or SpecStats(),
        timing=last.timing or Timing(arrival=0.0),
        seed=last.seed,
        logprobs=[lp for o in outputs for lp in o.new_logprobs],
        error=last.error,
        constraint=last.constraint,
    )
