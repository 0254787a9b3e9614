"""The router and tools over the OpenAI HTTP API, end to end with the official `openai` client and
raw HTTP: a routed chat's answer equals its tier alone and carries the route record (whose response
id gRPC `Feedback` takes), a routed stream, an endpoint's tool calls as `message.tool_calls`, tools
and their history reaching a plain chat's prompt, overrides behind their grants, every refusal by
name - and one specdec taking tools as another's endpoint tier."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
import yaml

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.router.endpoints import OpenAIEndpoint
from specdec.router.tools import call_block, parse_tools, with_tools
from specdec.router.validators import SchemaCache
from specdec.testing import ToolCallingEndpoint, free_port, grpc_stub, openai_client, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

MESSAGES = [{"role": "user", "content": "the weather in Paris and in Oslo?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=512))


@pytest.fixture(scope="module")
def tools_api():
    endpoint = ToolCallingEndpoint(["Paris", "Oslo"])
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def server(engine, tools_api, tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-routes")
    routes = {
        "routes": [
            {"name": "careful", "primary": "draft", "escalate_to": "target", "confidence": "mean_prob",
             "escalate_if": [{"confidence_below": 1.0}]},
            {"name": "agent", "primary": "tools", "escalate_to": "target", "escalate_if": [{"tools_needed": "> 2"}]},
        ],
        "endpoints": {"tools": {"kind": "openai", "base_url": tools_api.url,
                                "model": "m", "retries": 0}},
    }  # fmt: skip
    (folder / "routes.yaml").write_text(yaml.safe_dump(routes))
    (folder / "keys").write_text("sk-app\nsk-admin route:force\n")
    srv = serve_in_thread(
        engine, http_port=free_port(), routes=folder / "routes.yaml", api_key_file=folder / "keys"
    )
    yield srv
    srv.stop()


def _client(server, key="sk-app") -> openai.OpenAI:
    return openai_client(server, key)


def _raw(server, body, key="sk-app", path="/v1/chat/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.config.http_port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})  # fmt: skip
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else {}


def _sdk(engine) -> dict:
    """The standard fields, as the openai client takes them (ignore_eos goes in extra_body)."""
    return {"model": engine.target.name, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}


def _chat(engine, **fields) -> dict:
    return {"model": engine.target.name, "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, **fields}  # fmt: skip


def test_a_routed_chat_is_the_tiers_answer_with_its_record(engine, server):
    reply = _client(server).chat.completions.create(
        **_sdk(engine), extra_body={"route": "careful", "ignore_eos": True}
    )
    [alone] = engine.generate([engine.render_chat(MESSAGES)], SamplingParams(max_new_tokens=10, ignore_eos=True),
                              mode="target")  # fmt: skip
    assert reply.choices[0].message.content == alone.text and reply.usage.completion_tokens == 10
    [extra] = reply.model_extra["specdec"]["choices"]
    route = extra["route"]
    assert route["tier"] == "target" and route["escalated"] and extra["mode"] == "target"
    assert route["reasons"] == [f"confidence {route['confidence']:.3f} < 1"]
    assert [s["tier"] for s in route["spent"]] == ["draft", "target"]
    # The response id is the server's, and gRPC Feedback takes it from the same key.
    stub = grpc_stub(server.address)
    auth = (("authorization", "Bearer sk-app"),)
    stub.Feedback(pb.FeedbackRequest(response_id=route["response_id"], correct=True), metadata=auth)


def test_a_routed_stream_is_the_answer_in_one_chunk(engine, server):
    chunks = list(_client(server).chat.completions.create(
        **_sdk(engine), stream=True, stream_options={"include_usage": True},
        extra_body={"route": "careful", "ignore_eos": True},
    ))  # fmt: skip
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = _client(server).chat.completions.create(
        **_sdk(engine), extra_body={"route": "careful", "ignore_eos": True}
    )
    assert content == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_an_endpoints_tool_calls_are_the_messages_tool_calls(engine, server):
    reply = _client(server).chat.completions.create(
        **_sdk(engine), tools=[WEATHER], extra_body={"route": "agent"}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == ["Paris", "Oslo"]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    [extra] = reply.model_extra["specdec"]["choices"]
    assert extra["route"]["tier"] == "tools" and extra["route"]["tool_calls_valid"] is True
    assert [c["valid"] for c in extra["tool_calls"]] == [True, True]


SHORT = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}  # the tiny context


def test_a_routed_stream_with_tool_calls_and_an_endpoint_gets_the_history_as_openais(
    engine, server, tools_api
):
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
    ]  # fmt: skip
    tools_api.bodies.clear()
    stream = _client(server).chat.completions.create(
        **{**_sdk(engine), "messages": history}, tools=[WEATHER], stream=True, extra_body={"route": "agent"}
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert [c.index for c in calls] == [0, 1] and [c.function.name for c in calls] == ["get_weather"] * 2
    # The endpoint got the history in OpenAI's own shape, not the local model's written-out calls.
    [body] = tools_api.bodies
    assistant, tool = body["messages"][1:]
    assert (
        assistant["tool_calls"][0]["function"]["name"] == "get_weather"
        and "<tool_call>" not in assistant["content"]
    )
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c0"}


def test_tools_and_their_history_reach_a_plain_chats_prompt(engine, server):
    question = {"role": "user", "content": "Oslo?"}
    history = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "w", "arguments": '{"c": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
    ]  # fmt: skip
    sdk = {**_sdk(engine), "messages": history}
    reply = _client(server).chat.completions.create(**sdk, tools=[SHORT])
    tools = parse_tools([("w", "", json.dumps({"type": "object"}))], SchemaCache())
    rendered = with_tools(
        [question, {"role": "assistant", "content": call_block("w", {"c": "Oslo"})},
         {"role": "tool", "content": "sunny", "tool_call_id": "c0"}],
        tools,
    )  # fmt: skip
    assert reply.usage.prompt_tokens == len(engine.render_chat(rendered))
    # The tiny model calls nothing: a plain answer, and no verdicts to list.
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    assert reply.model_extra["specdec"]["choices"][0]["tool_calls"] == []
    none = _client(server).chat.completions.create(**sdk, tools=[SHORT], tool_choice="none")
    assert none.usage.prompt_tokens == len(engine.render_chat([question, *rendered[2:]]))  # not offered


def test_overrides_need_their_grant_over_http_too(engine, server):
    body = _chat(engine, route="careful", route_override={"tier": "draft"})
    status, error = _raw(server, body, key="sk-app")
    assert status == 403 and error["error"]["type"] == "permission_error"
    assert (
        error["error"]["param"] == "route_override" and "not granted route:force" in error["error"]["message"]
    )
    status, reply = _raw(server, body, key="sk-admin")
    assert status == 200 and reply["specdec"]["choices"][0]["route"]["tier"] == "draft"
    assert reply["specdec"]["choices"][0]["route"]["overridden"] is True


@pytest.mark.parametrize(
    "fields,param,message",
    [
        ({"route": "nope"}, "route", "unknown route 'nope'"),
        ({"route": "careful", "n": 2}, "n", "answers once"),
        ({"route": "careful", "mode": "target"}, "mode", "a route chooses its tiers' modes"),
        ({"json_schema": {"type": "object"}}, "json_schema", "needs a route"),
        ({"route": "careful", "json_schema": {"type": "strnig"}}, "json_schema", ""),  # named as sent
        ({"route": "careful", "response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format",
         "a constrained answer cannot make tool calls"),
        ({"route_override": {"tier": "target"}}, "route_override", "needs a route"),
        ({"route": "careful", "route_override": {"tier": 3}}, "route_override.tier", "a tier of the route"),
        ({"tools": [WEATHER], "stream": True}, "stream", "tool calls are not streamed yet"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name", "letters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters", "arguments object"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", '"type": "function"'),
        ({"tool_choice": "required", "tools": [WEATHER]}, "tool_choice", "constrained decoding"),
        ({"route": "careful", "max_tokens": 10_000}, "max_tokens", "room"),  # a tier's check, named as sent
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "[" * 50_000}}]}]},
         "messages[0].tool_calls[0].function.arguments", "not valid JSON"),  # nested past the parser: a 400
    ],
)  # fmt: skip
def test_bad_routed_and_tool_fields_are_refused_by_name(engine, server, fields, param, message):
    status, error = _raw(server, _chat(engine, **fields))
    assert status == 400 and error["error"]["param"] == param and message in error["error"]["message"]


def test_a_completion_cannot_be_routed(engine, server):
    status, error = _raw(
        server, {"model": engine.target.name, "prompt": "x", "route": "careful"}, path="/v1/completions"
    )
    assert status == 400 and error["error"]["param"] == "route" and "chat" in error["error"]["message"]


def test_one_specdec_takes_tools_as_anothers_endpoint(engine, server, monkeypatch):
    monkeypatch.setenv("SPECDEC_KEY", "sk-app")
    endpoint = OpenAIEndpoint(name="peer", base_url=f"http://127.0.0.1:{server.config.http_port}/v1",
                              model=engine.target.name, api_key_env="SPECDEC_KEY")  # fmt: skip
    answer = endpoint.chat(MESSAGES, max_tokens=6, temperature=0, tools=[WEATHER])
    assert answer.completion_tokens == 6 and answer.tool_calls == []  # the tiny model calls nothing
