"""Tools: their definitions refused by name when wrong, the call format a local model is asked to
write, each call checked against its tool's parameters, and the rules that read the calls."""

from __future__ import annotations

import json

import pytest

from specdec.errors import InvalidRequestError
from specdec.router.router import check_answer
from specdec.router.routes import parse_routes
from specdec.router.tools import calls_in, check_calls, openai_calls, parse_tools, with_tools
from specdec.router.validators import SchemaCache

WEATHER = json.dumps(
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
        "additionalProperties": False,
    }
)
TOOLS = [("get_weather", "The forecast for a city.", WEATHER), ("now", "The time.", "")]


def _call(name, arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_tools_parse_and_their_calls_are_checked():
    schemas = SchemaCache()
    tools = parse_tools(TOOLS, schemas)
    assert [t.name for t in tools] == ["get_weather", "now"] and tools[1].parameters is True
    assert tools[0].openai()["function"]["parameters"]["required"] == ["city"]
    assert "parameters" not in tools[1].openai()["function"]
    text = (
        "Let me look.\n" + _call("get_weather", {"city": "Paris", "days": 2}) + "\n"
        + _call("get_weather", {"days": 0}) + _call("now", {}) + _call("send_email", {"to": "x"})
        + "<tool_call>{not json}</tool_call>" + _call("now", "soon")
    )  # fmt: skip
    checked = check_calls(calls_in(text), tools, schemas)
    assert [c.valid for c in checked] == [True, False, True, False, False, False]
    assert json.loads(checked[0].arguments) == {"city": "Paris", "days": 2} and checked[0].error is None
    assert checked[1].error.startswith("get_weather: at (root): 'city' is a required property")
    assert "'send_email' is not an offered tool (offered: get_weather, now)" in checked[3].error
    assert "not a tool call of the form asked for" in checked[4].error
    assert checked[5].error == "now: the arguments are not a JSON object"
    assert check_calls(calls_in("no calls at all"), tools, schemas) == ()


def test_an_endpoints_openai_tool_calls_are_read_the_same_way():
    tools = parse_tools(TOOLS, SchemaCache())
    message = {
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{broken"}},
        ],
    }  # fmt: skip
    checked = check_calls(openai_calls(message), tools, SchemaCache())
    assert [c.valid for c in checked] == [True, False] and checked[1].arguments == "{broken"
    assert openai_calls({"content": "hi"}) == []


@pytest.mark.parametrize(
    "raw,field,message",
    [
        ([("get weather", "", "")], "tools[0].name", "letters, digits"),
        ([("a" * 65, "", "")], "tools[0].name", "1 to 64 characters"),
        ([("now", "", ""), ("now", "", "")], "tools[1].name", "'now' is given twice"),
        ([("f", "x" * 5000, "")], "tools[0].description", "the limit is 4096"),
        ([("f", "", "{oops")], "tools[0].parameters", "not valid JSON"),
        ([("f", "", '{"type": "string"}')], "tools[0].parameters", "the arguments object"),
        ([("f", "", '{"type": "object", "properties": {"a": {"type": "strnig"}}}')], "tools[0].parameters",
         "not a valid JSON Schema"),
        ([("f", "", '{"type": "object", "$ref": "https://example.com/x.json"}')], "tools[0].parameters",
         "remote references are not fetched"),
        ([(f"f{i}", "", "") for i in range(65)], "tools", "the limit is 64"),
    ],
)  # fmt: skip
def test_bad_tool_definitions_are_refused_by_name(raw, field, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        parse_tools(raw, SchemaCache())
    assert e.value.field == field


def test_the_tools_join_the_system_message():
    tools = parse_tools(TOOLS, SchemaCache())
    plain = [{"role": "user", "content": "weather in Paris?"}]
    assert with_tools(plain, ()) is plain
    [system, user] = with_tools(plain, tools)
    assert system["role"] == "system" and "<tool_call>" in system["content"] and user == plain[0]
    assert '"name": "get_weather"' in system["content"]
    [merged, _] = with_tools([{"role": "system", "content": "Be brief."}, *plain], tools)
    assert merged["content"].startswith("Be brief.\n\nYou may call the following tools")


def _route(*rules):
    data = {
        "routes": [{"name": "r", "primary": "draft", "escalate_to": "target", "escalate_if": list(rules)}]
    }
    return parse_routes(data, "test").routes["r"]


def test_tools_needed_counts_calls_and_schema_invalid_reads_their_arguments():
    schemas = SchemaCache()
    tools = parse_tools(TOOLS, schemas)
    two = _call("get_weather", {"city": "Rome"}) + _call("now", {})
    checked = check_calls(calls_in(two), tools, schemas)
    verdict = check_answer(_route({"tools_needed": "> 1"}), two, None, None, checked)
    assert verdict.reasons == ("tool calls 2 > 1",) and verdict.fired == ("tools_needed",)
    one = check_calls(calls_in(_call("now", {})), tools, schemas)
    assert check_answer(_route({"tools_needed": "> 1"}), "", None, None, one).reasons == ()
    # Without tools offered the rule has nothing to count: it never fires.
    assert check_answer(_route({"tools_needed": "== 0"}), "hello", None, None, None).reasons == ()
    bad = check_calls(calls_in(_call("get_weather", {"city": 3})), tools, schemas)
    verdict = check_answer(_route({"schema_invalid": True}), "", None, None, bad)
    assert verdict.reasons == (
        "schema_invalid: tool call 0: get_weather: at city: 3 is not of type 'string'",
    )
    # An answer that calls tools is judged by its calls, not by json_schema.
    validator = schemas.validator({"type": "object"})
    verdict = check_answer(_route({"schema_invalid": True}), two, None, validator, checked)
    assert verdict.reasons == () and verdict.schema_valid is None
