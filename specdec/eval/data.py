"""Eval sets: JSON Lines, one example per line (docs/ROUTING.md, *Evaluating tiers*).

    {"id": "t-17", "messages": [{"role": "user", "content": "..."}], "expected": "refund",
     "slice": "ambiguous", "scorer": "label", "labels": ["refund", "shipping", "other"]}

Fields: `prompt` (text) or `messages` (a chat), `expected` (what a right answer is, in the
scorer's terms), and optionally `json_schema`, `tools` (OpenAI-style function tools), `slice` (a
label the report groups by; "all" otherwise), `id` (the line number otherwise), `scorer` (this
example's, else the file's default) and the scorer's own settings (`labels`, `fields`, ...). A
malformed line stops the load naming its line number; an empty file is an error of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.errors import SpecdecError

KNOWN_FIELDS = {"id", "prompt", "messages", "expected", "json_schema", "tools", "slice", "scorer"}


class EvalDataError(SpecdecError):
    """The eval set is wrong; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    id: str
    line: int
    messages: list[dict[str, str]]  # a plain prompt is one user message
    expected: Any
    slice: str = "all"
    scorer: str | None = None  # None: the run's default
    json_schema: Any = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the scorer's settings (labels, fields, ...)


def load_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read the eval set ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        example = parse_example(line, number, str(path))
        if example.id in seen:
            raise EvalDataError(
                f"{path}: line {number}: id {example.id!r} is used on line {seen[example.id]} too"
            )
        seen[example.id] = number
        examples.append(example)
    if not examples:
        raise EvalDataError(f"{path}: the eval set is empty (JSON Lines: one example per line)")
    return examples


def parse_example(line: str, number: int, source: str = "eval set") -> Example:
    where = f"{source}: line {number}"
    try:
        raw = json.loads(line)
    except ValueError as e:
        raise EvalDataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if ("prompt" in raw) == ("messages" in raw):
        raise EvalDataError(f"{where}: give exactly one of prompt or messages")
    if "expected" not in raw:
        raise EvalDataError(f"{where}: expected: required (what a right answer is)")
    if "prompt" in raw:
        if not isinstance(raw["prompt"], str) or not raw["prompt"]:
            raise EvalDataError(f"{where}: prompt: a non-empty string")
        messages = [{"role": "user", "content": raw["prompt"]}]
    else:
        messages = raw["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise EvalDataError(f"{where}: messages: a non-empty list of {{role, content}} strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    for key, kind in (("slice", str), ("scorer", str), ("id", (str, int))):
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise EvalDataError(
                f"{where}: {key}: expected a {'string' if kind is str else 'string or number'}"
            )
    tools = raw.get("tools", [])
    if not isinstance(tools, list):
        raise EvalDataError(f"{where}: tools: a list of function tools")
    return Example(
        id=str(raw.get("id", number)),
        line=number,
        messages=messages,
        expected=raw["expected"],
        slice=raw.get("slice", "all") or "all",
        scorer=raw.get("scorer"),
        json_schema=raw.get("json_schema"),
        tools=tools,
        options={k: v for k, v in raw.items() if k not in KNOWN_FIELDS},
    )
