"""Constrained routed requests on a tiny pair: every tier decodes under the constraint, the escalated
answer is exactly the big tier's own constrained output (the small answer its draft, verified under
the same grammar), `schema_invalid` fires on a constrained answer cut short and on one that breaks
the request's schema, an endpoint tier is asked for the schema as `response_format`, and what a
constrained route cannot be is refused by the constraint's field."""

from __future__ import annotations

import json
import re

import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import InvalidRequestError
from specdec.grammar import Constraint, ConstraintKind
from specdec.request import Mode
from specdec.router.router import Router
from specdec.router.routes import parse_routes
from specdec.router.tools import parse_tools
from specdec.router.validators import SchemaCache
from specdec.testing import EXAMPLE_CONSTRAINTS, EXAMPLE_SCHEMA, ToolCallingEndpoint

MESSAGES = [{"role": "user", "content": "name and age, please"}]
CONSTRAINTS = EXAMPLE_CONSTRAINTS
PARAMS = SamplingParams(max_new_tokens=40)


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target, draft, config=EngineConfig(max_batch_size=4, max_context=256, warmup=False))


def _router(engine, *rules, primary="draft", escalate_to="target", endpoints=None):
    data = {
        "routes": [{"name": "r", "primary": primary, "escalate_to": escalate_to, "escalate_if": list(rules)}],
        "endpoints": endpoints or {},
    }
    return Router(engine, parse_routes(data, "test"))


def _alone(engine, mode, constraint, params=PARAMS):
    request = engine.make_request(engine.render_chat(MESSAGES), params, mode, constraint=constraint)
    [result] = engine.generate([request])
    assert result.error is None
    return result


@pytest.mark.parametrize("escalate_to", ["target", "speculative"])
@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_every_tier_decodes_under_the_constraint_and_escalation_is_exact(engine, kind, escalate_to):
    constraint = CONSTRAINTS[kind]
    router = _router(engine, {"confidence_below": 1.0}, escalate_to=escalate_to)  # always escalates
    routed = router.generate("r", MESSAGES, PARAMS, constraint=constraint)
    record = routed.record
    assert record.tier == escalate_to and record.escalated
    small = _alone(engine, Mode.DRAFT, constraint)
    big = _alone(engine, Mode.TARGET, constraint)
    # The escalated answer is the big tier's own under the constraint (greedy: token for token),
    # and so is its outcome; the small answer it was drafted from was constrained too.
    assert routed.token_ids == big.token_ids and routed.constraint == big.constraint
    reused = record.spent[1].draft_tokens_reused
    assert routed.token_ids[:reused] == small.token_ids[:reused]
    assert reused > 0, "the small answer's grammar-forced opening should have been accepted"
    if big.constraint.complete:
        text = routed.text
        if kind == "schema":
            assert set(json.loads(text)) == {"name", "age", "pet"} and record.schema_valid is True
        elif kind == "json":
            assert isinstance(json.loads(text), dict) and record.schema_valid is True
        elif kind == "regex":
            assert re.fullmatch(constraint.text, text) and record.schema_valid is None
        else:
            assert re.fullmatch(r"\[[a-c]+(,[a-c]+)*\]", text)


def test_an_answer_cut_before_its_constraint_completes_escalates_on_the_schema_rule(engine):
    short = SamplingParams(max_new_tokens=3)
    for kind in ("schema", "regex"):
        routed = _router(engine, {"schema_invalid": True}).generate(
            "r", MESSAGES, short, constraint=CONSTRAINTS[kind]
        )
        record = routed.record
        assert record.tier == "target" and record.fired == ("schema_invalid",)
        assert record.reasons == (
            "schema_invalid: the output ended (length) before its constraint was complete",
        )
        assert routed.constraint is not None and routed.constraint.complete is False
        assert routed.token_ids == _alone(engine, Mode.TARGET, CONSTRAINTS[kind], short).token_ids
        # Without the rule the cut small answer stands, flagged.
        plain = _router(engine, {"input_tokens_above": 10_000}).generate(
            "r", MESSAGES, short, constraint=CONSTRAINTS[kind]
        )
        assert plain.record.tier == "draft" and plain.constraint.complete is False
        assert plain.record.schema_valid is (False if kind == "schema" else None)


def test_the_requests_own_schema_judges_a_constrained_answer(engine):
    """A json_schema beside the constraint is what schema_invalid checks: a grammar's answer that
    breaks it (here: every answer does) escalates, and the big tier's stands as it is, flagged."""
    flag = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(flag))  # a few tokens: always complete
    impossible = {"type": "object", "required": ["never_written"]}
    routed = _router(engine, {"schema_invalid": True}).generate(
        "r", MESSAGES, PARAMS, json_schema=impossible, constraint=constraint
    )
    assert routed.record.tier == "target" and routed.record.fired == ("schema_invalid",)
    assert "never_written" in routed.record.reasons[0] and routed.record.schema_valid is False
    big = _alone(engine, Mode.TARGET, constraint)
    assert (
        routed.token_ids == big.token_ids
        and big.constraint.complete
        and json.loads(big.text)["a"] in (True, False)
    )


def test_an_endpoint_tier_is_asked_for_the_schema_and_judged_by_it(engine):
    api = ToolCallingEndpoint()  # answers with no content: not the JSON asked for
    try:
        endpoint = {"kind": "openai", "base_url": api.url, "model": "m", "retries": 0}
        router = _router(engine, {"confidence_below": 1.0}, escalate_to="big", endpoints={"big": endpoint})
        routed = router.generate("r", MESSAGES, PARAMS, constraint=CONSTRAINTS["schema"])
        [body] = api.bodies
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": EXAMPLE_SCHEMA},
        }
        assert routed.record.tier == "big" and routed.record.schema_valid is False
        assert routed.constraint is not None and routed.constraint.complete is False
        router.generate("r", MESSAGES, PARAMS, constraint=CONSTRAINTS["json"])
        assert api.bodies[1]["response_format"] == {"type": "json_object"}
        # A regex or grammar cannot be sent to an endpoint: refused by its field, before any tier runs.
        for kind in ("regex", "grammar"):
            with pytest.raises(InvalidRequestError, match=f"^{kind}: route 'r' has the endpoint tier 'big'"):
                router.generate("r", MESSAGES, PARAMS, constraint=CONSTRAINTS[kind])
        assert len(api.bodies) == 2
    finally:
        api.close()


def test_a_constraint_with_tools_is_refused_by_name(engine):
    tools = parse_tools([("get_weather", "", '{"type": "object"}')], SchemaCache())
    with pytest.raises(
        InvalidRequestError, match=r"^json_object: a constrained answer cannot make tool calls"
    ):
        _router(engine, {"confidence_below": 1.0}).generate(
            "r", MESSAGES, PARAMS, tools=tools, constraint=CONSTRAINTS["json"]
        )


def test_a_constraint_that_is_not_json_is_refused_by_name_before_any_tier_runs(engine):
    broken = Constraint(ConstraintKind.JSON_SCHEMA, "{not json")
    with pytest.raises(InvalidRequestError, match=r"^json_schema: not valid JSON"):
        _router(engine, {"confidence_below": 1.0}).generate("r", MESSAGES, PARAMS, constraint=broken)
