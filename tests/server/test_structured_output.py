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


@pytest.fixture(scope="module")
def server(pairs):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=8, max_queue=64, max_context=256)
    )
    srv = serve_in_thread(engine, http_port=free_port())
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
