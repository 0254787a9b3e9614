"""Property-based fuzzing of the request path: generated requests with every field at and beyond
its limits, and strings of any code point, each either completes or is refused with
INVALID_ARGUMENT naming a field (RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are legitimate under
load), and the server keeps serving. Python's protobuf refuses lone surrogates, so malformed UTF-8
goes as raw bytes."""

from __future__ import annotations

import re

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specdec import Engine
from specdec.config import EngineConfig
from specdec.testing import grpc_stub, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

FIELDS = re.compile(
    r"^(prompt|prompt_token_ids|messages|messages\[\d+\]\.role|max_new_tokens|temperature|top_p|top_k|seed|stop|"
    r"stop_token_ids|mode|num_speculative_tokens|top_logprobs|request_id): "
)
UNDECODABLE = "the request is not a valid specdec.v1.GenerateRequest"
UNDER_LOAD = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any code point but surrogates
FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)


@pytest.fixture(scope="module")
def server(pairs):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target,
        draft=draft,
        config=EngineConfig(max_batch_size=4, max_queue=32, max_context=64, warmup=False),
    )
    srv = serve_in_thread(engine)
    yield srv
    srv.stop()


@st.composite
def requests(draw):
    msg = pb.GenerateRequest()
    which = draw(st.sampled_from(["prompt", "ids", "messages", "none", "two"]))
    if which in ("prompt", "two"):
        msg.prompt = draw(TEXT)
    if which in ("ids", "two"):
        msg.prompt_token_ids.extend(draw(st.lists(st.one_of(st.integers(-3, 400), INT32), max_size=80)))
    if which == "messages":
        roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT)
        for role, content in draw(st.lists(st.tuples(roles, TEXT), max_size=4)):
            msg.messages.add(role=role, content=content)
    optional = {
        "max_new_tokens": st.one_of(st.integers(-2, 70), INT32),
        "temperature": st.one_of(FLOAT, st.sampled_from([0.0, 1e-39, 1e-6, 0.7, 1.0])),
        "top_p": st.one_of(FLOAT, st.sampled_from([0.0, 0.5, 1.0])),
        "top_k": st.one_of(st.integers(-2, 400), INT32),
        "seed": st.integers(0, 2**64 - 1),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            setattr(msg, name, draw(strategy))
    msg.stop.extend(draw(st.lists(TEXT, max_size=18)))
    msg.stop_token_ids.extend(draw(st.lists(st.one_of(st.integers(-2, 400), INT32), max_size=3)))
    msg.mode = draw(st.one_of(st.integers(0, 4), INT32))
    msg.num_speculative_tokens = draw(st.one_of(st.integers(-1, 10), INT32))
    msg.logprobs = draw(st.booleans())
    msg.top_logprobs = draw(st.one_of(st.integers(-1, 22), INT32))
    msg.ignore_eos = draw(st.booleans())
    msg.request_id = draw(st.one_of(TEXT, st.text(max_size=300)))
    return msg


@st.composite
def valid_requests(draw):
    """Requests within every limit, at its edges, with strings of any code point: they must
    complete (or meet load)."""
    msg = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "ids", "messages"]))
    if kind == "prompt":
        msg.prompt = draw(TEXT.filter(bool))
    elif kind == "ids":
        msg.prompt_token_ids.extend(draw(st.lists(st.integers(0, 299), min_size=1, max_size=40)))
    else:
        for role, content in draw(
            st.lists(
                st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT),
                min_size=1,
                max_size=3,
            )
        ):
            msg.messages.add(role=role, content=content)
    msg.max_new_tokens = draw(st.integers(1, 12))
    msg.temperature = draw(st.sampled_from([0.0, 1e-39, 1e-5, 0.5, 1.0, 2.0]))
    msg.top_p = draw(st.sampled_from([1e-6, 0.3, 1.0]))
    msg.top_k = draw(st.integers(0, 310))
    msg.seed = draw(st.integers(0, 2**63 - 1))
    msg.stop.extend(draw(st.lists(TEXT.filter(bool), max_size=3)))
    msg.stop_token_ids.extend(draw(st.lists(st.integers(0, 299), max_size=3)))
    msg.mode = draw(st.integers(0, 3))
    msg.num_speculative_tokens = draw(st.integers(0, 8))
    msg.logprobs = draw(st.booleans())
    msg.top_logprobs = draw(st.integers(0, 20)) if msg.logprobs else 0
    msg.ignore_eos = draw(st.booleans())
    msg.request_id = draw(st.text(max_size=256))
    return msg


def _check(code: grpc.StatusCode, details: str) -> None:
    event(code.name)
    if code == grpc.StatusCode.OK or code in UNDER_LOAD:
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert FIELDS.match(details) or details.startswith(UNDECODABLE), details


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(msg=st.one_of(requests(), valid_requests()), stream=st.booleans())
def test_every_generated_request_completes_or_is_refused_naming_a_field(server, msg, stream):
    stub = grpc_stub(server.address)
    try:
        if stream:
            chunks = list(stub.GenerateStream(msg, timeout=30))
            assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
            event("OK")
        else:
            reply = stub.Generate(msg, timeout=30)
            assert reply.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert len(reply.token_ids) == reply.usage.completion_tokens
            event("OK")
    except grpc.RpcError as e:
        _check(e.code(), e.details() or "")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_any_bytes_complete_or_are_refused_plainly(server, raw):
    channel = grpc.insecure_channel(server.address)
    call = channel.unary_unary(
        "/specdec.v1.SpecDec/Generate", request_serializer=None, response_deserializer=None
    )
    try:
        call(raw, timeout=30)
    except grpc.RpcError as e:
        _check(e.code(), e.details() or "")


def test_the_server_still_serves_after_the_fuzzing(server):
    reply = grpc_stub(server.address).Generate(
        pb.GenerateRequest(prompt_token_ids=[5, 6], max_new_tokens=3, ignore_eos=True)
    )
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH and len(reply.token_ids) == 3
