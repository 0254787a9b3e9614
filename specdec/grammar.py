"""Constrained decoding: JSON Schema, JSON, regular expressions and EBNF grammars, through xgrammar.

A request may carry a `Constraint`. The engine compiles it once per distinct text (xgrammar's
compiler caches compiled grammars) and gives the row a `RowGrammar`: a matcher that writes, for
the row's state, a bitmask of the tokens that may come next. The speculative step masks logits
with it on the device - the mask first, then temperature / top-k / top-p, for draft and target
alike, which defines "the target alone under the constraint". Over a step the matcher is advanced
over the row's drafts (each position's mask is the state that position would have) and rolled
back before the emitted tokens are committed (docs/STRUCTURED_OUTPUT.md).

xgrammar is imported only when a constrained request arrives: an engine that never sees one never
loads it.
"""

from __future__ import annotations

import enum
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from specdec.errors import InvalidRequestError, SpecdecError

MAX_CONSTRAINT_CHARS = 65536
MAX_SCHEMA_DEPTH = 64  # objects and arrays within each other; deeper is refused before compiling

# JSON Schema keywords xgrammar 0.2.9 compiles but does not enforce: the grammar lets through output
# that breaks them (the tests hold this list to xgrammar's behaviour, keyword by
# keyword, so a release that starts enforcing one fails there and the list is updated; the file is
# tests/engine/test_constrained.py). A schema
# using any of them is still constrained by the rest; the output names them as unenforced.
UNENFORCED_KEYWORDS = (
    "not",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "if",
    "then",
    "else",
    "allOf",
    "oneOf",
    "unevaluatedProperties",
)


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # a JSON Schema (its JSON text)
    JSON_OBJECT = "json_object"  # any JSON object (OpenAI's response_format json_object)
    REGEX = "regex"  # a regular expression the whole output matches
    GRAMMAR = "grammar"  # an EBNF grammar (xgrammar's GBNF dialect, rule `root`)


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: ConstraintKind
    text: str = ""  # the schema, regex or grammar; empty for JSON_OBJECT

    @property
    def field(self) -> str:
        """The request field an error about this constraint names."""
        return self.kind.value

    def check(self) -> None:
        """The checks that need no compiling: size, and a schema that is JSON at all."""
        if self.kind is not ConstraintKind.JSON_OBJECT and not self.text:
            raise InvalidRequestError(self.field, "must not be empty")
        if len(self.text) > MAX_CONSTRAINT_CHARS:
            raise InvalidRequestError(
                self.field, f"at most {MAX_CONSTRAINT_CHARS} characters, got {len(self.text)}"
            )
        if self.kind is ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.text)
            except (ValueError, RecursionError) as e:
                raise InvalidRequestError(self.field, f"not valid JSON ({type(e).__name__}: {e})") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(self.field, "a JSON Schema is an object (or true / false)")
            if _depth(schema) > MAX_SCHEMA_DEPTH:
                raise InvalidRequestError(self.field, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")

    def unenforced(self) -> tuple[str, ...]:
        """The keywords of a JSON Schema the grammar does not enforce (UNENFORCED_KEYWORDS)."""
        if self.kind is not ConstraintKind.JSON_SCHEMA:
            return ()
        found: set[str] = set()
        _collect_keywords(json.loads(self.text), found)
        return tuple(k for k in UNENFORCED_KEYWORDS if k in found)


def _depth(node: Any) -> int:
    """How deeply objects and arrays nest in `node` (iteratively: a deep one cannot overflow)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# Keywords whose values are data or names, not schemas: nothing under them is a keyword.
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "dependentRequired", "required")


def _collect_keywords(node: Any, found: set[str]) -> None:
    """Every key used as a schema keyword anywhere in `node` (property names under `properties`
    and friends are names, not keywords, but their values are schemas; under `enum`, `const`,
    `default`, `examples` and the like are data)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                found.add(key)
                continue
            if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
                found.add(key)
                if isinstance(value, dict):
                    for sub in value.values():
                        _collect_keywords(sub, found)
                continue
            found.add(key)
            _collect_keywords(value, found)
    elif isinstance(node, list):
        for item in node:
            _collect_keywords(item, found)


_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[06:14:12] /project/cpp/x.cc:94: "


# xgrammar 0.2.9 writes a length-limited JSON string (minLength / maxLength) with this character
# class, which lets raw control characters through and forbids escapes: output `json.loads`
# refuses ("Invalid control character"). Its unlimited strings exclude \0-\x1f as JSON requires;
# the limited ones are given the same class (tests/engine/test_constrained.py parses every output).
_LAX_STRING_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\]"


def _no_raw_control_characters(ebnf: str) -> str:
    return ebnf.replace(_LAX_STRING_CHARACTER, _JSON_STRING_CHARACTER)


class Grammars:
    """The engine's grammar compiler: one tokenizer's token strings, the logits' width (the
    bitmask's), and the engine's end-of-sequence ids as the grammar's stop tokens."""

    def __init__(self, tokenizer: Any, logits_width: int, stop_token_ids: tuple[int, ...]):
        try:
            import xgrammar
        except ImportError as e:
            raise SpecdecError(
                f"constrained output needs xgrammar, which does not import here ({e}); scripts/setup.sh "
                "installs it (pip install --no-deps xgrammar==0.2.9), or pip install 'specdec[structured]'"
            ) from None

        self._xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=logits_width, stop_token_ids=list(stop_token_ids)
        )
        # Compiled grammars are cached by their text (bounded: a client sending a new schema per
        # request must not grow the server without bound).
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=256 << 20)
        self._ebnf_of_schema: dict[str, str] = {}  # JSON Schema text -> its grammar (EBNF)
        self._lock = threading.Lock()  # request threads compile too (Engine.check_constraint)

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar, or InvalidRequestError naming the field and what xgrammar said."""
        constraint.check()
        try:
            if constraint.kind is ConstraintKind.JSON_SCHEMA:
                return self._json(constraint.text)
            if constraint.kind is ConstraintKind.JSON_OBJECT:
                return self._json('{"type": "object"}')
            if constraint.kind is ConstraintKind.REGEX:
                return self.compiler.compile_regex(constraint.text)
            return self.compiler.compile_grammar(constraint.text)
        except Exception as e:  # xgrammar's errors come through tvm-ffi as several types
            message = _XGRAMMAR_LOCATION.sub(
                "", str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            )
            raise InvalidRequestError(constraint.field, f"cannot be compiled: {message}") from None

    def _json(self, schema: str) -> Any:
        # Compact JSON (no free whitespace between tokens): a small model cannot loop on blanks,
        # and the output is what json.dumps would write. strict_mode off: JSON Schema's own semantics. xgrammar's strict mode closes every object
        # and array the schema leaves open, so {"type": "object"} would allow only {} and
        # {"type": "array"} only []; a schema that wants closed objects says additionalProperties.
        ebnf = self._ebnf_of_schema.get(schema)
        if ebnf is None:  # the conversion is not xgrammar's to cache: ours, bounded, by schema text
            grammar = self._xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=False)
            ebnf = _no_raw_control_characters(str(grammar))
            with self._lock:
                if len(self._ebnf_of_schema) >= 1024:
                    self._ebnf_of_schema.pop(next(iter(self._ebnf_of_schema)))  # the oldest
                self._ebnf_of_schema[schema] = ebnf
        return self.compiler.compile_grammar(ebnf)

    def row(self, constraint: Constraint) -> RowGrammar:
        return RowGrammar(self._xgr.GrammarMatcher(self.compile(constraint)), constraint.unenforced())


def new_bitmask(rows: int, logits_width: int) -> torch.Tensor:
    """[rows, ceil(width / 32)] int32 on the host, every token allowed (-1: all bits set)."""
    return torch.full((rows, (logits_width + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int, indices: list[int]
) -> torch.Tensor:
    """logits [N, >= vocab_size] with -inf where rows `indices` of the host bitmask [N, words]
    forbid a token (xgrammar's kernel on the logits' device; the bitmask travels in one copy).
    In place when the logits are contiguous - xgrammar's kernels assume rows laid end to end, and
    the few-row matmuls can return them transposed - else on a contiguous copy, returned."""
    import xgrammar

    logits = logits.contiguous()
    xgrammar.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab_size, indices=indices
    )
    return logits


class RowGrammar:
    """One row's matcher. The step `speculate`s it over drafts and `undo`es that before the
    scheduler `commit`s what was emitted, so between steps it holds exactly the committed output."""

    def __init__(self, matcher: Any, unenforced: tuple[str, ...]):
        self.matcher = matcher
        self.unenforced = unenforced
        self.speculated = 0  # tokens accepted this step ahead of the commit

    def fill(self, bitmask: torch.Tensor, index: int) -> bool:
        """Write the next-token mask of the current state into bitmask[index]. Once the grammar
        has taken its stop token nothing is constrained any more - the stop token ends the row
        there, so what follows is never emitted - and this returns False."""
        if self.matcher.is_terminated():
            bitmask[index].fill_(-1)
            return False
        self.matcher.fill_next_token_bitmask(bitmask, index)
        return True

    def speculate(self, token: int) -> bool:
        """Advance over a drafted token; False if the grammar forbids it (the state is unchanged)."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            return False
        self.speculated += 1
        return True

    def fill_along(self, bitmask: torch.Tensor, first: int, tokens: list[int]) -> None:
        """Masks for the positions of `tokens` proposed from the current state: bitmask[first] now,
        bitmask[first + p] after the first p tokens, advancing over them (`speculate`) up to the
        first the grammar forbids. Its position's mask rejects it, so the rows after it are left
        as they are (all allowed in a new bitmask)."""
        self.fill(bitmask, first)
        for p, token in enumerate(tokens, start=1):
            if not self.speculate(token):
                return
            self.fill(bitmask, first + p)

    def undo(self) -> None:
        """Back to the committed output."""
        if self.speculated:
            self.matcher.rollback(self.speculated)
            self.speculated = 0

    def commit(self, tokens: list[int]) -> None:
        for token in tokens:
            if not self.matcher.accept_token(token):
                # Masking makes this impossible; if it happens the row's output is wrong.
                raise RuntimeError(f"token {token} was emitted although the grammar forbids it")

    @property
    def terminated(self) -> bool:
        """The grammar has taken its stop token: nothing may follow."""
        return self.matcher.is_terminated()

    @property
    def complete(self) -> bool:
        """The output so far is a whole match (the grammar could end here)."""
        return self.matcher.is_terminated() or self.matcher.is_completed()
