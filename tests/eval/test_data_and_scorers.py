"""Eval sets and scorers: what each scorer calls right, and every bad input named by its line or
its example."""

from __future__ import annotations

import json

import pytest

from specdec.eval.data import EvalDataError, Example, load_examples
from specdec.eval.scorers import ScorerError, score


def _example(expected, scorer=None, **options):
    return Example(id="e1", line=3, messages=[{"role": "user", "content": "q"}], expected=expected,
                   scorer=scorer, options=options)  # fmt: skip


def test_the_built_in_scorers():
    assert score("  Paris \n", _example("Paris"), "exact") == 1
    assert score("paris", _example("Paris"), "exact") == 0
    assert score("paris", _example("Paris", ignore_case=True), "exact") == 1
    assert score("The capital is Paris.", _example("Paris"), "contains") == 1
    assert score("Paris and Lyon", _example(["Paris", "Lyon"]), "contains") == 1
    assert score("Paris", _example(["Paris", "Lyon"]), "contains") == 0
    labels = ["refund", "shipping", "other"]
    assert score("Refund.", _example("refund", labels=labels), "label") == 1
    assert score("refund or shipping", _example("refund", labels=labels), "label") == 0  # names two
    assert score("refunded", _example("refund", labels=labels), "label") == 0  # whole words only
    answer = '```json\n{"name": "John", "age": 31, "city": "Oslo"}\n```'
    assert score(answer, _example({"name": "John", "age": 31}), "json_fields") == 1
    assert score(answer, _example({"name": "John", "age": 30}), "json_fields") == 0
    assert score(answer, _example({"name": "John", "age": 30}, fields=["name"]), "json_fields") == 1
    assert score("not json", _example({"name": "John"}), "json_fields") == 0
    assert score('{"ok": true}', _example({"ok": 1}), "json_fields") == 0  # JSON's true is not 1
    assert score('{"n": 31.0}', _example({"n": 31}), "json_fields") == 1
    assert score("order 12345 shipped", _example(r"\b\d{5}\b"), "regex") == 1
    assert score("```python\n\n    return x + 1\nmore\n```", _example("return x + 1"), "first_line") == 1
    assert score("return x", _example("return x + 1"), "first_line") == 0
    # difflib's ratio: 2 x 8 matching characters over 8 + 12.
    assert score("return x", _example("return x + 1"), "line_similarity") == pytest.approx(16 / 20)
    assert score("", _example("return x"), "line_similarity") == 0
    # The example's own scorer wins over the run's default.
    assert score("Paris", _example("Paris", scorer="exact"), "regex") == 1


def test_a_users_scorer_and_its_failures_name_the_example(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def half(answer, example):\n    return 0.5\n"
        "def broken(answer, example):\n    raise KeyError('oops')\n"
        "def wild(answer, example):\n    return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score("x", _example("y"), "my_scorers:half") == 0.5
    for name, message in (
        ("my_scorers:broken", r"example 'e1' \(line 3\): scorer 'my_scorers:broken' raised KeyError"),
        ("my_scorers:wild", "returned 7; a score is a bool or a number in"),
        ("my_scorers:nothing", "cannot import it"),
        ("fuzzy", "unknown scorer 'fuzzy'; built in: exact, contains"),
    ):
        with pytest.raises(ScorerError, match=message):
            score("x", _example("y"), name)
    with pytest.raises(ScorerError, match="label: the example needs `labels`"):
        score("x", _example("refund"), "label")
    with pytest.raises(ScorerError, match="no scorer"):
        score("x", _example("y"), None)


def test_eval_sets_load_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [
        {"prompt": "2+2?", "expected": "4"},
        {"id": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "expected": {"a": 1}, "slice": "long", "scorer": "json_fields", "fields": ["a"]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    first, second = load_examples(path)
    assert (
        first.id == "1" and first.messages == [{"role": "user", "content": "2+2?"}] and first.slice == "all"
    )
    assert second.id == "m" and second.slice == "long" and second.options == {"fields": ["a"]}
    for text, message in (
        ('{"prompt": "a", "expected": 1}\n{oops\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "line 1: expected: required"),
        ('{"prompt": "a", "messages": [], "expected": 1}\n', "line 1: give exactly one of prompt or messages"),
        ('{"messages": [{"role": "user"}], "expected": 1}\n', "line 1: messages: a non-empty list"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
        ('{"id": "x", "prompt": "a", "expected": 1}\n{"id": "x", "prompt": "b", "expected": 1}\n',
         "line 2: id 'x' is used on line 1 too"),
        ("\n\n", "the eval set is empty"),
    ):  # fmt: skip
        path.write_text(text)
        with pytest.raises(EvalDataError, match=message):
            load_examples(path)
    with pytest.raises(EvalDataError, match="cannot read the eval set"):
        load_examples(tmp_path / "missing.jsonl")
