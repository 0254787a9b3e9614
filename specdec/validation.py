"""Request validation against limits computed once from the pair and the config.

`RequestLimits` is frozen and holds plain numbers, so any thread may validate against it: the gRPC
handlers check requests on the event loop without touching the scheduler, and the scheduler checks
them again when they are added (in-process callers reach it directly).
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.config import EngineConfig
from specdec.errors import InvalidRequestError
from specdec.models.cache_plan import DEFAULT_MAX_CONTEXT
from specdec.models.loader import LoadedModel
from specdec.request import Mode, Request
from specdec.tokenization import emittable_vocab_size

MAX_PROMPT_CHARS = 1_000_000  # whatever the context, text longer than this is refused untokenized


@dataclass(frozen=True, slots=True)
class RequestLimits:
    vocab_size: int  # ids a request may use and the engine may emit: [0, vocab_size)
    max_context: int  # prompt + output tokens per sequence
    max_gamma: int  # the most drafts a request may force per step
    has_draft: bool
    # Whether the draft can answer alone (draft mode, ModelConfig.answers_alone): not with a subset
    # output head, which can never emit most of the vocabulary, nor when it reads the target's
    # features; such a draft only speculates.
    draft_answers: bool = True
    # Text longer than this cannot fit the context (no token spells more than the vocabulary's
    # longest token string), so it is refused before paying for its tokenization.
    max_prompt_chars: int = MAX_PROMPT_CHARS

    @staticmethod
    def for_pair(target: LoadedModel, draft: LoadedModel | None, config: EngineConfig) -> RequestLimits:
        """The limits of an engine on these models: max_context is the config's, or the models'
        shorter max_position_embeddings capped at DEFAULT_MAX_CONTEXT."""
        models = [target] if draft is None else [target, draft]
        model_limit = min(m.config.max_position_embeddings for m in models)
        max_context = config.max_context or min(model_limit, DEFAULT_MAX_CONTEXT)
        if max_context > model_limit:
            raise InvalidRequestError(
                "max_context", f"{max_context} exceeds the models' max_position_embeddings {model_limit}"
            )
        longest_token = max((len(t) for t in target.tokenizer.get_vocab()), default=1)
        return RequestLimits(
            vocab_size=emittable_vocab_size(target, draft),
            max_context=max_context,
            max_gamma=config.max_gamma,
            has_draft=draft is not None,
            draft_answers=draft is not None and draft.config.answers_alone,
            max_prompt_chars=min(MAX_PROMPT_CHARS, max_context * max(longest_token, 1)),
        )

    @property
    def default_mode(self) -> Mode:
        return Mode.SPECULATIVE if self.has_draft else Mode.TARGET


def check_prompt_chars(chars: int, limits: RequestLimits, field: str) -> None:
    """Refuse prompt text that cannot fit the context, before it is tokenized."""
    if chars > limits.max_prompt_chars:
        raise InvalidRequestError(
            field,
            f"at most {limits.max_prompt_chars} characters, got {chars}: the context holds "
            f"{limits.max_context} tokens, and no token is longer than "
            f"{limits.max_prompt_chars // limits.max_context} characters",
        )


def validate(request: Request, limits: RequestLimits) -> Mode:
    """Raise InvalidRequestError naming the first bad field; return the mode the request runs in."""
    mode = request.mode or limits.default_mode
    if mode in (Mode.SPECULATIVE, Mode.DRAFT) and not limits.has_draft:
        raise InvalidRequestError(
            "mode", f"mode {mode.value} needs a draft model; this engine has only a target"
        )
    if mode is Mode.DRAFT and not limits.draft_answers:
        raise InvalidRequestError(
            "mode",
            "mode draft needs a draft that can answer alone; this one only speculates (it has a small "
            "output head, a subset of the vocabulary, or reads the target's features): use speculative or target",
        )
    ids = request.prompt_ids
    if not ids:
        raise InvalidRequestError("prompt", "must not be empty")
    vocab = limits.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            "prompt_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {vocab})"
        )
    if len(ids) >= limits.max_context:
        raise InvalidRequestError(
            "prompt",
            f"{len(ids)} prompt tokens leave no room in the context of {limits.max_context} tokens",
        )
    request.params.validate(vocab)
    room = limits.max_context - len(ids)
    if request.params.max_new_tokens > room:
        raise InvalidRequestError(
            "max_new_tokens",
            f"{request.params.max_new_tokens} exceeds the room left in the context: {len(ids)} prompt tokens "
            f"+ max_new_tokens must be <= {limits.max_context}, so at most {room}",
        )
    if request.external_draft:
        if mode is Mode.DRAFT:
            raise InvalidRequestError(
                "external_draft", "external drafts are verified by the target; not in draft mode"
            )
        outside = [t for t in request.external_draft if not 0 <= t < vocab]
        if outside:
            raise InvalidRequestError(
                "external_draft", f"token id {outside[0]} is outside the vocabulary [0, {vocab})"
            )
    if request.external_draft_from_draft and (not request.external_draft or mode is not Mode.SPECULATIVE):
        raise InvalidRequestError(
            "external_draft_from_draft",
            "verifying an external draft against the draft model's q needs an external draft and speculative mode",
        )
    if not 0 <= request.num_speculative_tokens <= limits.max_gamma:
        raise InvalidRequestError(
            "num_speculative_tokens",
            f"must be in [0, {limits.max_gamma}] (0 = adaptive), got {request.num_speculative_tokens}",
        )
    if request.constraint is not None:
        request.constraint.check()  # compiling it is the scheduler's (it holds the compiler)
        if request.params.ignore_eos:
            raise InvalidRequestError(
                "ignore_eos",
                "cannot be combined with a constraint: a grammar ends on an end-of-sequence token",
            )
    return mode
