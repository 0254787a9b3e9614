"""Scorers: is an answer right? Each returns a score in [0, 1] (a right/wrong scorer 1 or 0).

    exact       the answer, stripped, equals `expected` (option `ignore_case`)
    contains    the answer contains `expected` (a string, or a list: all of them; `ignore_case`)
    label       of the example's `labels`, the answer names exactly one, and it is `expected`
                (whole words, case-insensitive: "Refund." names refund; "refund or shipping" names two)
    json_fields the answer is one JSON object (a code fence around it is allowed) whose `fields`
                (default: every key of `expected`) equal `expected`'s
    regex       `expected` is a regular expression the answer matches (re.search)
    first_line  the answer's first line of code (blank lines and ``` fences skipped), stripped,
                equals `expected` stripped (next-line completion)
    line_similarity  partial credit for that line: difflib's ratio of it to `expected` (the edit
                similarity code-completion benchmarks report beside exact match)
    MODULE:FUNC a function of yours, called as FUNC(answer, example) -> bool or a number in [0, 1]

A scorer is chosen per example (`scorer`) or for the run (`--scorer`). An unknown scorer, a
missing option or a scorer that raises stops the run naming the example.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from specdec.errors import SpecdecError
from specdec.eval.data import Example
from specdec.router.validators import unfenced


class ScorerError(SpecdecError):
    """A scorer cannot score an example; the message names it."""


Scorer = Callable[[str, Example], float]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def exact(answer: str, example: Example) -> float:
    a, e = answer.strip(), _text(example.expected).strip()
    if example.options.get("ignore_case"):
        a, e = a.lower(), e.lower()
    return float(a == e)


def contains(answer: str, example: Example) -> float:
    wanted = example.expected if isinstance(example.expected, list) else [example.expected]
    fold = bool(example.options.get("ignore_case"))
    text = answer.lower() if fold else answer
    return float(all((_text(w).lower() if fold else _text(w)) in text for w in wanted))


def label(answer: str, example: Example) -> float:
    labels = example.options.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ScorerError("label: the example needs `labels`, a non-empty list of strings")
    if example.expected not in labels:
        raise ScorerError(f"label: expected {example.expected!r} is not one of its labels")
    named = [x for x in labels if re.search(rf"(?<!\w){re.escape(x)}(?!\w)", answer, re.IGNORECASE)]
    return float(named == [example.expected])


def json_fields(answer: str, example: Example) -> float:
    if not isinstance(example.expected, dict):
        raise ScorerError("json_fields: `expected` must be a JSON object")
    fields = example.options.get("fields", list(example.expected))
    if not isinstance(fields, list) or not all(isinstance(f, str) and f in example.expected for f in fields):
        raise ScorerError("json_fields: `fields` must list keys of `expected`")
    try:
        got = json.loads(unfenced(answer))
    except (ValueError, RecursionError):
        return 0.0

    def same(a: Any, b: Any) -> bool:  # JSON's true is not 1
        return a == b and isinstance(a, bool) == isinstance(b, bool)

    return float(
        isinstance(got, dict) and all(f in got and same(got[f], example.expected[f]) for f in fields)
    )


def regex(answer: str, example: Example) -> float:
    try:
        pattern = re.compile(_text(example.expected))
    except re.error as e:
        raise ScorerError(f"regex: `expected` is not a regular expression ({e})") from None
    return float(pattern.search(answer) is not None)


def _first_code_line(answer: str) -> str | None:
    lines = [x.strip() for x in answer.splitlines() if x.strip() and not x.strip().startswith("```")]
    return lines[0] if lines else None


def first_line(answer: str, example: Example) -> float:
    return float(_first_code_line(answer) == _text(example.expected).strip())


def line_similarity(answer: str, example: Example) -> float:
    import difflib

    line = _first_code_line(answer)
    return (
        0.0 if line is None else difflib.SequenceMatcher(None, line, _text(example.expected).strip()).ratio()
    )


BUILT_IN: dict[str, Scorer] = {
    "exact": exact, "contains": contains, "label": label, "json_fields": json_fields, "regex": regex,
    "first_line": first_line, "line_similarity": line_similarity,
}  # fmt: skip


def resolve(name: str) -> Scorer:
    """A built-in scorer by name, or MODULE:FUNCTION imported."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ScorerError(f"unknown scorer {name!r}; built in: {', '.join(BUILT_IN)}, or MODULE:FUNCTION")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ScorerError(f"scorer {name!r}: cannot import it ({e})") from None
    if not callable(found):
        raise ScorerError(f"scorer {name!r} is not callable")
    return found


def score(answer: str, example: Example, default: str | None) -> float:
    """The example's score, by its scorer or the default; ScorerError naming the example."""
    name = example.scorer or default
    where = f"example {example.id!r} (line {example.line})"
    if name is None:
        raise ScorerError(f"{where}: no scorer: give the example a `scorer` or the run --scorer")
    try:
        value = resolve(name)(answer, example)
    except ScorerError as e:
        raise ScorerError(f"{where}: {e}") from None
    except Exception as e:  # a user's scorer: its failure names the example, not a traceback
        raise ScorerError(f"{where}: scorer {name!r} raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ScorerError(
            f"{where}: scorer {name!r} returned {value!r}; a score is a bool or a number in [0, 1]"
        )
    return float(value)
