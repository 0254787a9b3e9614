"""Tools and per-request overrides of routed requests, over real gRPC with API keys: an endpoint's
tool calls come back checked, `tools_needed` and bad arguments escalate, the tools reach a local
tier's prompt and an endpoint's `tools` field, bad definitions are refused by name, and only keys
granted them may force a tier or move a threshold."""

from __future__ import annotations

import json

import grpc
import pytest
import yaml

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.router.tools import tools_message, with_tools
from specdec.testing import ToolCallingEndpoint, grpc_stub, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

MESSAGES = [{"role": "user", "content": "what is the weather in Paris and Oslo"}]
WEATHER = pb.Tool(
    name="get_weather",
    description="The forecast for a city.",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)


@pytest.fixture(scope="module")
def endpoint():
    tools_api = ToolCallingEndpoint()
    yield tools_api
    tools_api.close()


@pytest.fixture(scope="module")
def server(pairs, endpoint, tmp_path_factory):
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=512))
    folder = tmp_path_factory.mktemp("routed-tools")
    routes = {
        "routes": [
            {"name": "agent", "primary": "tools-api", "escalate_to": "target",
             "escalate_if": [{"tools_needed": "> 1"}, {"schema_invalid": True}]},
            {"name": "chat", "primary": "draft", "escalate_to": "target",
             "escalate_if": [{"confidence_below": 0.0}]},
        ],
        "endpoints": {"tools-api": {"kind": "openai", "base_url": endpoint.url, "model": "m", "retries": 0}},
    }  # fmt: skip
    (folder / "routes.yaml").write_text(yaml.safe_dump(routes))
    (folder / "keys").write_text("sk-app\nsk-ops route:threshold\nsk-admin route:force route:threshold\n")
    srv = serve_in_thread(engine, routes=folder / "routes.yaml", api_key_file=folder / "keys")
    yield engine, srv
    srv.stop()


def _call(stub, key, route="agent", **fields):
    fields.setdefault("max_new_tokens", 10)
    fields.setdefault("ignore_eos", True)
    request = build_request(MESSAGES, None, route=route, **fields)
    return stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),))


def test_an_endpoints_tool_calls_come_back_checked_and_several_escalate(server, endpoint):
    engine, srv = server
    stub = grpc_stub(srv.address)
    endpoint.cities, endpoint.bodies[:] = ["Paris"], []
    one = _call(stub, "sk-app", tools=[WEATHER])
    assert one.route.tier == "tools-api" and not one.route.escalated and one.route.tool_calls_valid
    [call] = one.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.valid
    # The endpoint got the tools in OpenAI's own field, and the client's messages unchanged.
    [body] = endpoint.bodies
    assert body["tools"][0]["function"]["name"] == "get_weather" and body["messages"] == MESSAGES

    endpoint.cities = ["Paris", "Oslo"]
    two = _call(stub, "sk-app", tools=[WEATHER])
    assert (
        two.route.tier == "target" and two.route.escalated and list(two.route.reasons) == ["tool calls 2 > 1"]
    )
    # The local tier read the tools in its prompt: its answer is the target's own for that prompt.
    prompt = engine.render_chat(with_tools(MESSAGES, _tools(engine)))
    [alone] = engine.generate([prompt], _params(), mode="target")
    assert list(two.token_ids) == alone.token_ids and two.usage.prompt_tokens == len(prompt)

    endpoint.cities = [7]  # a city that is not a string
    bad = _call(stub, "sk-app", tools=[WEATHER])
    assert bad.route.tier == "target" and bad.route.reasons[0].startswith(
        "schema_invalid: tool call 0: get_weather: at city: 7 is not of type 'string'"
    )


def _tools(engine):
    from specdec.router.tools import parse_tools
    from specdec.router.validators import SchemaCache

    return parse_tools([(WEATHER.name, WEATHER.description, WEATHER.parameters)], SchemaCache())


def _params():
    from specdec import SamplingParams

    return SamplingParams(max_new_tokens=10, ignore_eos=True)


def test_the_tools_message_is_documented_as_sent():
    from pathlib import Path

    line = '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>'
    docs = (Path(__file__).resolve().parents[2] / "docs" / "ROUTING.md").read_text()
    assert line in tools_message(()) and line in docs


@pytest.mark.parametrize(
    "tool,field",
    [
        (pb.Tool(name="get weather"), "tools[0].name"),
        (pb.Tool(name="f", parameters="{oops"), "tools[0].parameters: not valid JSON"),
        (pb.Tool(name="f", parameters='{"type": "object", "required": "city"}'), "tools[0].parameters: not a valid JSON Schema"),
        (pb.Tool(name="f", parameters="[" * 50_000), "tools[0].parameters: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_tool_definitions_are_invalid_argument_naming_them(server, tool, field):
    stub = grpc_stub(server[1].address)
    with pytest.raises(grpc.RpcError) as e:
        _call(stub, "sk-app", tools=[tool])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _call(stub, "sk-app", route="", tools=[WEATHER])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools: needs a route" in e.value.details()


def test_overrides_need_a_key_granted_them(server):
    engine, srv = server
    stub = grpc_stub(srv.address)
    force = pb.RouteOverride(tier="target")
    threshold = pb.RouteOverride(confidence_below=1.0)
    for key, override, grant in (("sk-app", force, "route:force"), ("sk-app", threshold, "route:threshold"),
                                 ("sk-ops", force, "route:force")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            _call(stub, key, route="chat", route_override=override)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"route_override: this API key is not granted {grant}" in e.value.details()

    plain = _call(stub, "sk-app", route="chat")
    assert plain.route.tier == "draft" and not plain.route.overridden  # threshold 0: never escalates
    moved = _call(stub, "sk-ops", route="chat", route_override=threshold)
    assert moved.route.tier == "target" and moved.route.overridden
    assert moved.route.reasons[0].startswith("confidence ") and moved.route.reasons[0].endswith("< 1")
    forced = _call(stub, "sk-admin", route="chat", route_override=force)
    assert forced.route.tier == "target" and list(forced.route.reasons) == ["route_override.tier target"]
    assert [s.tier for s in forced.route.spent] == ["target"] and forced.route.overridden
    assert [s.tier for s in moved.route.spent] == ["draft", "target"]
    [alone] = engine.generate([engine.render_chat(MESSAGES)], _params(), mode="target")
    assert list(forced.token_ids) == alone.token_ids

    for override, message in (
        (
            pb.RouteOverride(tier="draft-ish"),
            "route_override.tier: 'draft-ish' is not a tier of route 'chat'",
        ),
        (pb.RouteOverride(confidence_below=1.5), "route_override.confidence_below: a threshold in [0, 1]"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            _call(stub, "sk-admin", route="chat", route_override=override)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the agent route's primary is an endpoint: no confidence
        _call(stub, "sk-admin", route="agent", route_override=threshold)
    assert "has no local primary" in e.value.details()


def test_without_a_key_file_no_override_is_taken(pairs, tmp_path):
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=2, max_context=256))
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": [{"name": "chat", "primary": "draft", "escalate_to": "target",
                                                  "escalate_if": [{"confidence_below": 0.0}]}]}))  # fmt: skip
    srv = serve_in_thread(engine, routes=routes)
    try:
        request = build_request(MESSAGES, None, route="chat", route_override=pb.RouteOverride(tier="target"))
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(srv.address).Generate(request)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs an API key granted route:force; this server has no --api-key-file" in e.value.details()
    finally:
        srv.stop()


def test_a_tool_conversations_history_reaches_the_endpoint_in_openais_shape(server, endpoint):
    _engine, srv = server
    stub = grpc_stub(srv.address)
    endpoint.cities, endpoint.bodies[:] = ["Oslo"], []
    history = [
        pb.ChatMessage(role="user", content="weather in Oslo?"),
        pb.ChatMessage(
            role="assistant",
            tool_calls=[pb.ToolCall(name="get_weather", arguments='{"city": "Oslo"}', id="c7")],
        ),
        pb.ChatMessage(role="tool", content="sunny", tool_call_id="c7"),
    ]
    request = pb.GenerateRequest(route="agent", max_new_tokens=4, tools=[WEATHER])
    request.messages.extend(history)
    reply = stub.Generate(request, metadata=(("authorization", "Bearer sk-app"),))
    assert reply.route.tier == "tools-api"
    [body] = endpoint.bodies
    assert body["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}  # fmt: skip
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "c7"}
    # A local model reads the earlier call written out in the format it is asked for.
    from specdec.server import convert

    local = convert.chat_messages(request)
    assert (
        local[1]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    bad = pb.GenerateRequest(route="agent")
    bad.messages.extend([pb.ChatMessage(role="user", content="x", tool_calls=[pb.ToolCall(name="f")])])
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(bad, metadata=(("authorization", "Bearer sk-app"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].tool_calls: only an assistant message makes tool calls" in e.value.details()
