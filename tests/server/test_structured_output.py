"""Constrained output through the servers: gRPC's json_schema + constrain, json_object, regex and
grammar fields, and the OpenAI API's response_format - the output valid, speculative equal to the
target alone, the constraint's result on the last message, and every mistake named."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.testing import free_port, grpc_stub, openai_client, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}


ROUTES = {  # "always": the small tier answers first and always escalates, drafting the big one
    "routes": [
        {"name": "always", "primary": "draft", "escalate_to": "speculative",
         "escalate_if": [{"confidence_below": 1.0}, {"schema_invalid": True}]},
    ],
}  # fmt: skip
CHAT = [{"role": "user", "content": "Who?"}]


@pytest.fixture(scope="module")
def server(pairs, tmp_path_factory):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=8, max_queue=64, max_context=256)
    )
    routes = tmp_path_factory.mktemp("constrained-routes") / "routes.yaml"
    routes.write_text(json.dumps(ROUTES))  # JSON is YAML
    srv = serve_in_thread(engine, http_port=free_port(), routes=routes)
    yield srv
    srv.stop()


def test_grpc_constrained_speculative_equals_target_and_reports_the_constraint(server):
    stub = grpc_stub(server.address)
    replies = {}
    for mode in ("target", "speculative"):
        msg = build_request("name:", mode, max_new_tokens=60, json_schema=json.dumps(SCHEMA), constrain=True)
        replies[mode] = stub.Generate(msg, timeout=60)
    assert list(replies["speculative"].token_ids) == list(replies["target"].token_ids)
    reply = replies["speculative"]
    assert reply.HasField("constraint") and reply.constraint.complete
    jsonschema.validate(json.loads(reply.text), SCHEMA)
    stream = list(
        stub.GenerateStream(
            build_request("x", "speculative", max_new_tokens=30, regex=r"[ab]{2,4}!"), timeout=60
        )
    )
    assert re.fullmatch(r"[ab]{2,4}!", "".join(m.text for m in stream))
    assert stream[-1].constraint.complete and not any(m.HasField("constraint") for m in stream[:-1])


def test_grpc_a_cut_output_says_it_is_incomplete(server):
    reply = grpc_stub(server.address).Generate(
        build_request("x", "speculative", max_new_tokens=2, grammar='root ::= "[" [a-c]+ ("," [a-c]+)* "]"'),
        timeout=60,
    )
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert not reply.constraint.complete


@pytest.mark.parametrize(
    "fields,field,fragment",
    [
        ({"regex": "(ab"}, "regex", "parenthesis"),
        ({"grammar": "root ::= nope"}, "grammar", "not defined"),
        ({"json_schema": '{"type": "nope"}', "constrain": True}, "json_schema", "cannot be compiled"),
        ({"constrain": True}, "constrain", "needs a json_schema"),
        ({"regex": "a", "json_object": True}, "regex", "at most one constraint"),
        ({"regex": "a", "ignore_eos": True}, "ignore_eos", "end-of-sequence"),
    ],
)
def test_grpc_bad_constraints_are_invalid_argument_naming_the_field(server, fields, field, fragment):
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(server.address).Generate(
            build_request("x", "speculative", max_new_tokens=4, **fields), timeout=60
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field) and fragment in e.value.details(), e.value.details()


def test_openai_response_format_json_schema_and_json_object(server):
    client = openai_client(server)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Who?"}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "who", "schema": SCHEMA, "strict": True},
        },
    )
    choice = reply.choices[0]
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert reply.model_extra["specdec"]["choices"][0]["constraint"] == {"complete": True, "unenforced": []}
    # The completions endpoint takes it too (as vLLM's does; OpenAI's client passes it as an extra).
    reply = client.completions.create(
        model=model,
        prompt="x",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    text = reply.choices[0].text
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert (
            text.startswith("{")
            and reply.model_extra["specdec"]["choices"][0]["constraint"]["complete"] is False
        )


def test_openai_stream_carries_the_constraint_on_its_finishing_chunk(server):
    client = openai_client(server)
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=40,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    done = last.model_extra["specdec"]["choices"][0]["constraint"]
    assert done["complete"] is (last.choices[0].finish_reason == "stop")
    if done["complete"]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_grpc_a_constrained_route_constrains_every_tier_and_reports_the_answers_constraint(server):
    stub = grpc_stub(server.address)
    fields = {"max_new_tokens": 60, "json_schema": json.dumps(SCHEMA), "constrain": True}
    routed = stub.Generate(build_request(CHAT, None, route="always", **fields), timeout=60)
    alone = stub.Generate(build_request(CHAT, "target", **fields), timeout=60)
    assert routed.route.tier == "speculative" and routed.route.escalated
    assert list(routed.token_ids) == list(alone.token_ids)  # the big tier's own constrained answer
    assert routed.constraint == alone.constraint and routed.constraint.complete
    assert routed.route.schema_valid and routed.route.spent[1].draft_tokens_reused > 0
    jsonschema.validate(json.loads(routed.text), SCHEMA)
    # A regex works on a route of local tiers as well.
    reply = stub.Generate(
        build_request(CHAT, None, route="always", max_new_tokens=30, regex=r"[ab]{2,4}!"), timeout=60
    )
    assert re.fullmatch(r"[ab]{2,4}!", reply.text) and reply.constraint.complete
    with pytest.raises(grpc.RpcError) as e:  # compiled before any tier runs, named as on a plain request
        stub.Generate(build_request(CHAT, None, route="always", max_new_tokens=4, regex="(ab"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("regex")


def test_openai_a_routed_response_format_constrains_every_tier(server):
    client = openai_client(server)
    model = client.models.list().data[0].id
    schema_format = {"type": "json_schema", "json_schema": {"name": "who", "schema": SCHEMA}}
    common = {
        "model": model,
        "messages": CHAT,
        "max_tokens": 60,
        "temperature": 0,
        "response_format": schema_format,
    }
    routed = client.chat.completions.create(**common, extra_body={"route": "always"})
    alone = client.chat.completions.create(**common, extra_body={"mode": "target"})
    extra = routed.model_extra["specdec"]["choices"][0]
    assert extra["route"]["tier"] == "speculative" and extra["constraint"] == {
        "complete": True,
        "unenforced": [],
    }
    assert routed.choices[0].message.content == alone.choices[0].message.content
    jsonschema.validate(json.loads(routed.choices[0].message.content), SCHEMA)
