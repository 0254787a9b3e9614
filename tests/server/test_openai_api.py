"""The OpenAI-compatible HTTP API end to end, with the official `openai` client (a client nobody
here wrote) and raw HTTP for the error paths: models, completions and chat completions unary and
streamed, greedy text equal to gRPC Generate, n > 1, logprobs in each endpoint's shape, specdec's
extra figures, every error status, and a client that leaves freeing its slot."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.testing import free_port, grpc_stub, openai_client, scrape_metrics, serve_in_thread


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=8, max_queue=64, max_context=256)
    )


@pytest.fixture(scope="module")
def server(engine):
    srv = serve_in_thread(engine, http_port=free_port())
    yield srv
    srv.stop()


def _client(server, key: str = "unused") -> openai.OpenAI:
    return openai_client(server, key)


def _model(engine, mode: str | None = None) -> str:
    return engine.target.name + (f":{mode}" if mode else "")


def _raw(server, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.config.http_port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else {}


def _events(server, path: str, body: dict) -> list:
    """The parsed `data:` payloads of a streamed response ("[DONE]" kept as the string)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.config.http_port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in response.read().decode().split("\n"):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return events


# ------------------------------------------------------------------------------ models


def test_models_lists_the_served_name_and_one_id_per_mode(server, engine):
    ids = [m.id for m in _client(server).models.list()]
    assert ids == [
        _model(engine),
        _model(engine, "target"),
        _model(engine, "speculative"),
        _model(engine, "draft"),
    ]
    assert _client(server).models.retrieve(_model(engine, "draft")).id == _model(engine, "draft")
    status, body = _raw(server, "GET", "/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_health(server):
    assert _raw(server, "GET", "/health") == (200, {"status": "serving"})


# ------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("mode", ["speculative", "target", "draft"])
def test_greedy_completion_equals_grpc_generate(server, engine, mode):
    prompt = "def add(a, b):"
    reply = _client(server).completions.create(
        model=_model(engine, mode),
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    grpc_reply = grpc_stub(server.address).Generate(
        build_request(prompt, mode, max_new_tokens=24, ignore_eos=True)
    )
    [choice] = reply.choices
    assert choice.text == grpc_reply.text and choice.finish_reason == "length"
    assert reply.object == "text_completion" and reply.model == _model(engine, mode)
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens == grpc_reply.usage.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    extra = reply.model_extra["specdec"]["choices"][0]
    assert extra["mode"] == mode and extra["seed"] is not None
    if mode == "speculative":
        assert extra["stats"]["drafted_tokens"] > 0


def test_greedy_chat_equals_grpc_generate_and_speculative_equals_target(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    client = _client(server)
    replies = {
        mode: client.chat.completions.create(
            model=_model(engine, mode),
            messages=messages,
            max_completion_tokens=20,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        for mode in ("speculative", "target")
    }
    grpc_reply = grpc_stub(server.address).Generate(
        build_request(messages, "target", max_new_tokens=20, ignore_eos=True)
    )
    for reply in replies.values():
        [choice] = reply.choices
        assert choice.message.role == "assistant" and choice.message.content == grpc_reply.text
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_streams_match_unary_and_end_with_usage_and_done(server, engine):
    client = _client(server)
    # γ forced: adaptive γ may rightly decide this tiny pair is not worth drafting for.
    common = dict(model=_model(engine), max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True, "num_speculative_tokens": 2})  # fmt: skip
    unary = client.completions.create(prompt="x = 1", **common).choices[0].text
    chunks = list(
        client.completions.create(
            prompt="x = 1", stream=True, stream_options={"include_usage": True}, **common
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "x = 1"}]
    unary_chat = client.chat.completions.create(messages=messages, **common).choices[0].message.content
    chat_chunks = list(client.chat.completions.create(messages=messages, stream=True, **common))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == unary_chat
    assert chat_chunks[-1].choices[0].finish_reason == "length"
    assert chat_chunks[-1].model_extra["specdec"]["choices"][0]["stats"]["verify_steps"] > 0

    raw = _events(server, "/v1/chat/completions", {"model": _model(engine), "messages": messages, "max_tokens": 4,
                                                   "stream": True})  # fmt: skip
    assert raw[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in raw[:-1])
    assert all("usage" not in e for e in raw[:-1])  # only with include_usage


def test_n_choices_are_batched_seeded_and_reproducible(server, engine):
    client = _client(server)
    # The target alone: a seed reproduces under a fixed γ, not under adaptive γ (docs/API.md, Seeds).
    kwargs = dict(model=_model(engine, "target"), prompt="import os", max_tokens=12, temperature=0.9, seed=5, n=3,
                  extra_body={"ignore_eos": True})  # fmt: skip
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # choice i samples with seed + i
    seeds = [x["seed"] for x in first.model_extra["specdec"]["choices"]]
    assert seeds == [5, 6, 7]
    assert first.usage.completion_tokens == 36
    # Several prompts: choices are prompt-major.
    multi = client.completions.create(
        model=_model(engine), prompt=["a", "b"], n=2, max_tokens=3, temperature=0
    )
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text  # greedy: n copies alike


def test_logprobs_in_each_endpoints_shape(server, engine):
    client = _client(server)
    completion = client.completions.create(
        model=_model(engine, "target"), prompt="for i in", max_tokens=10, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    [choice] = completion.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Greedy: the chosen token is the best alternative.
    assert all(
        max(top.values()) == pytest.approx(v, abs=1e-5) for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )

    chat = client.chat.completions.create(
        model=_model(engine, "target"), messages=[{"role": "user", "content": "for i in"}], max_tokens=10,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 10 and all(len(t.top_logprobs) == 2 for t in content)
    # The bytes of the tokens spell the text exactly, even where a token is part of a character.
    assert (
        b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace")
        == chat.choices[0].message.content
    )
    status, body = _raw(
        server, "POST", "/v1/completions", {"model": _model(engine), "prompt": "a", "logprobs": 6}
    )
    assert status == 400 and body["error"]["param"] == "logprobs"
    status, body = _raw(server, "POST", "/v1/chat/completions",
                        {"model": _model(engine), "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "top_logprobs"


def test_prediction_is_verified_as_an_external_draft(server, engine):
    """OpenAI's Predicted Outputs: the text goes to the target as drafts to verify, so the output
    is the target's whatever the prediction (right, or wrong), and the prediction was verified."""
    client = _client(server)
    messages = [{"role": "user", "content": "count"}]
    common = dict(messages=messages, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(model=_model(engine, "target"), **common).choices[0].message.content
    for prediction in (text, "something else entirely"):
        reply = client.chat.completions.create(
            model=_model(engine, "speculative"),
            prediction={"type": "content", "content": prediction},
            **common,
        )
        assert reply.choices[0].message.content == text  # exact: the target verified it
        stats = reply.model_extra["specdec"]["choices"][0]["stats"]
        predicted = len(engine.tokenizer.encode(prediction, add_special_tokens=False))
        assert stats["drafted_tokens"] >= min(predicted, 15)  # the prediction was drafted
    status, body = _raw(server, "POST", "/v1/chat/completions", {"model": _model(engine, "draft"), "messages": messages,
                        "prediction": {"type": "content", "content": "x"}})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "prediction"  # the draft alone verifies nothing


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "path,extra,param,fragment",
    [
        ("/v1/completions", {"frequency_penalty": 0.5}, "frequency_penalty", "only"),
        ("/v1/completions", {"echo": True}, "echo", "echo"),
        ("/v1/completions", {"best_of": 3}, "best_of", "n"),
        ("/v1/completions", {"temperature": "hot"}, "temperature", "number"),
        ("/v1/completions", {"max_tokens": 10_000}, "max_tokens", "room"),
        ("/v1/completions", {"wibble": 1}, "wibble", "unknown field"),
        ("/v1/completions", {"route": "triage"}, "route", "only on /v1/chat/completions"),
        ("/v1/completions", {"n": 17}, "n", "[1, 16]"),
        ("/v1/completions", {"mode": "wizard"}, "mode", "unknown mode"),
        ("/v1/completions", {"num_speculative_tokens": 99}, "num_speculative_tokens", "[0,"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"top_p": 0}, "top_p", "(0, 1]"),
        ("/v1/chat/completions", {"max_completion_tokens": 10_000}, "max_completion_tokens", "room"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema", "cannot be compiled"),
        ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema.name", "required"),
        ("/v1/chat/completions", {"route": "triage"}, "route", "this server serves no routes"),
        ("/v1/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "auto or none"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]", "text parts"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)  # fmt: skip
def test_bad_fields_get_400_naming_them(server, engine, path, extra, param, fragment):
    body = {"model": _model(engine), "max_tokens": 4}
    body.update(
        {"prompt": "a"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    )
    body.update(extra)
    if "max_completion_tokens" in extra:
        del body["max_tokens"]
    status, reply = _raw(server, "POST", path, body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert fragment in error["message"] and error["message"].startswith(param), error


def test_no_op_values_stock_clients_send_are_accepted(server, engine):
    reply = _client(server).chat.completions.create(
        model=_model(engine), messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}],
        max_tokens=2, n=1, frequency_penalty=0, presence_penalty=0, logit_bias=None, response_format={"type": "text"},
        user="alice", tool_choice="none", stream=False,
    )  # fmt: skip
    assert len(reply.choices) == 1


def test_other_error_statuses(server, engine):
    assert _raw(server, "POST", "/v1/completions", b"{not json")[0] == 400
    assert _raw(server, "POST", "/v1/completions", [1, 2])[0] == 400
    status, body = _raw(server, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "a"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        _client(server).completions.create(model="gpt-4", prompt="a")
    status, body = _raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in body
    assert _raw(server, "GET", "/v1/completions")[0] == 405


def test_api_keys_guard_every_route_but_health_and_bodies_are_bounded(engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-good\n")
    srv = serve_in_thread(engine, http_port=free_port(), api_key_file=keys, max_message_bytes=4096)
    try:
        big = {"model": _model(engine), "prompt": "a" * 5000}
        status, body = _raw(srv, "POST", "/v1/completions", big, {"Authorization": "Bearer sk-good"})
        assert status == 413 and "4096" in body["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "sk-bad").models.list()
        assert _raw(srv, "GET", "/v1/models")[0] == 401
        assert _raw(srv, "GET", "/health")[0] == 200
        assert (
            _client(srv, "sk-good").completions.create(model=_model(engine), prompt="a", max_tokens=2).choices
        )
    finally:
        srv.stop()


def _slow_stream(server, engine, max_tokens: int = 200):
    """An open streaming request (reads the first event and keeps the connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.config.http_port, timeout=60)
    body = {
        "model": _model(engine, "target"),
        "prompt": "a",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    response.readline()
    return conn, response


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_full_server_gets_429_and_draining_gets_503(pairs):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=1, max_queue=0, max_context=256)
    )
    srv = serve_in_thread(engine, http_port=free_port(), grace_period=30)
    status, body = _raw(srv, "POST", "/v1/completions", {"model": _model(engine), "prompt": "b", "n": 2})
    assert status == 400 and body["error"]["param"] == "n"  # more rows than it may ever hold: not a 429
    conn, response = _slow_stream(srv, engine)
    with pytest.raises(openai.RateLimitError) as e:
        _client(srv).completions.create(model=_model(engine), prompt="b", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    assert _wait(lambda: _raw(srv, "GET", "/health")[0] == 503)
    status, body = _raw(
        srv, "POST", "/v1/completions", {"model": _model(engine), "prompt": "b", "max_tokens": 2}
    )
    assert status == 503 and "draining" in body["error"]["message"]
    # The stream in flight still finishes, whole, before the server stops.
    rest = response.read().decode()
    conn.close()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
    stopper.join(60)


def test_a_client_that_leaves_frees_its_slot(server, engine):
    scheduler = engine.scheduler
    series = 'specdec_requests_total{mode="target",status="CANCELLED"}'

    def cancelled() -> float:
        return scrape_metrics(server.config.metrics_port).get(series, 0.0)

    before = cancelled()
    conn, _ = _slow_stream(server, engine, max_tokens=220)
    assert scheduler.num_running == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait(lambda: scheduler.num_running == 0, timeout=5)
    assert _wait(lambda: cancelled() == before + 1)  # stopped, not run to its end
    # A unary request whose client leaves is cancelled too.
    sock = socket.create_connection(("127.0.0.1", server.config.http_port))
    body = json.dumps(
        {"model": _model(engine, "target"), "prompt": "a", "max_tokens": 220, "ignore_eos": True}
    ).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    assert _wait(lambda: scheduler.num_running == 1)
    sock.close()
    assert _wait(lambda: scheduler.num_running == 0, timeout=5)
    assert _wait(lambda: cancelled() == before + 2)


def test_a_taken_http_port_fails_start_up_naming_it(engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot bind the HTTP API to 127.0.0.1:{port}"):
            serve_in_thread(engine, http_port=port)


def test_a_request_whose_numbers_go_bad_is_a_500_and_the_others_finish(server, engine, monkeypatch):
    """Unary: 500 server_error; streamed: an error event, then [DONE]; the rows beside it finish."""
    import torch

    model, scheduler = engine.target.model, engine.scheduler
    forward = model.forward
    poison = [5, 6, 299]

    def poisoned(batch, cache):
        logits = forward(batch, cache)
        victims = [s.slot for s in list(scheduler.running) if s.request.prompt_ids == poison]
        if logits is not None and victims:
            logits[torch.isin(batch.slots, torch.tensor(victims))] = float("nan")
        return logits

    monkeypatch.setattr(model, "forward", poisoned)
    body = {"model": _model(engine, "target"), "max_tokens": 20, "ignore_eos": True}
    good = threading.Thread(
        target=lambda: results.append(_raw(server, "POST", "/v1/completions", {**body, "prompt": [5, 6, 7]}))
    )
    results: list = []
    good.start()
    status, reply = _raw(server, "POST", "/v1/completions", {**body, "prompt": poison})
    assert (
        status == 500
        and reply["error"]["type"] == "server_error"
        and "non-finite" in reply["error"]["message"]
    )
    events = _events(server, "/v1/completions", {**body, "prompt": poison, "stream": True})
    assert "error" in events[-2] and "non-finite" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    good.join(30)
    assert results and results[0][0] == 200 and results[0][1]["choices"][0]["finish_reason"] == "length"
    monkeypatch.undo()
