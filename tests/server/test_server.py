"""The gRPC server end to end: modes, streaming, chat, logprobs, concurrency, cancellation,
deadlines, validation, back-pressure, health, reflection, metrics and graceful shutdown."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.scheduler import StepReport
from specdec.testing import free_port, grpc_stub, hf_reference, scrape_metrics, serve_in_thread, serve_process
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

MODES = {"speculative": pb.MODE_SPECULATIVE, "target": pb.MODE_TARGET, "draft": pb.MODE_DRAFT}


@pytest.fixture(scope="module")
def server(pairs):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=8, max_queue=64, max_context=256)
    )
    srv = serve_in_thread(engine)
    yield srv
    srv.stop()


def _req(prompt, mode="speculative", **fields):
    fields.setdefault("max_new_tokens", 16)
    fields.setdefault("ignore_eos", True)
    return build_request(prompt, mode, **fields)


def _stream(stub, msg, **kw):
    return list(stub.GenerateStream(msg, **kw))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_unary_and_streaming_agree_in_every_mode(server, mode):
    stub = grpc_stub(server.address)
    # Seeded sampling reproduces exactly under a fixed γ (docs/ARCHITECTURE.md, adaptive γ).
    msg = _req(
        [5, 6, 7, 8], mode, temperature=0.8, seed=3, num_speculative_tokens=3 if mode == "speculative" else 0
    )
    unary = stub.Generate(msg)
    chunks = _stream(stub, msg)
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH and len(unary.token_ids) == 16
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == 4
    assert unary.seed == 3 and unary.mode == MODES[mode]
    if mode == "speculative":
        assert unary.stats.drafted_tokens > 0 and unary.stats.mean_accepted_length > 0


def test_greedy_speculative_equals_target_only(server):
    stub = grpc_stub(server.address)
    for prompt in ([5, 6, 7], [100, 101, 102, 103, 104], [42]):
        spec = stub.Generate(_req(prompt, "speculative", max_new_tokens=30))
        target = stub.Generate(_req(prompt, "target", max_new_tokens=30))
        assert list(spec.token_ids) == list(target.token_ids)


def test_chat_messages_render_through_the_template(server):
    stub = grpc_stub(server.address)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    reply = stub.Generate(_req(messages, "target", max_new_tokens=8))
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(ids)
    same = stub.Generate(_req(ids, "target", max_new_tokens=8))
    assert list(reply.token_ids) == list(same.token_ids)


@pytest.mark.parametrize("mode", ["speculative", "target", "draft"])
def test_logprobs_are_the_producing_models(server, mode):
    stub = grpc_stub(server.address)
    prompt = [10, 11, 12, 13]
    reply = stub.Generate(
        _req(prompt, mode, max_new_tokens=10, temperature=1.0, seed=5, logprobs=True, top_logprobs=3)
    )
    engine = server.engine
    model = hf_reference((engine.draft if mode == "draft" else engine.target).path)
    seq = prompt + list(reply.token_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :, : engine.vocab_size], -1)
    assert len(reply.logprobs) == len(reply.token_ids)
    for i, (token, lp) in enumerate(zip(reply.token_ids, reply.logprobs)):
        expected = logp[len(prompt) - 1 + i]
        assert lp.token_id == token and math.isclose(lp.logprob, expected[token].item(), abs_tol=1e-4)
        top = expected.topk(3)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert all(math.isclose(t.logprob, v, abs_tol=1e-4) for t, v in zip(lp.top, top.values.tolist()))
        assert lp.token == engine.tokenizer.convert_ids_to_tokens(token)


def test_32_concurrent_streams_complete_and_equal_one_at_a_time(server):
    stub = grpc_stub(server.address)
    g = torch.Generator().manual_seed(0)
    requests = []
    for i in range(32):
        prompt = torch.randint(3, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        mode = ("speculative", "target", "draft")[i % 3]
        requests.append(_req(prompt, mode, max_new_tokens=4 + (i * 7) % 29))
    with ThreadPoolExecutor(32) as pool:
        streamed = list(pool.map(lambda m: _stream(grpc_stub(server.address), m), requests))
    for msg, chunks in zip(requests, streamed):
        alone = stub.Generate(msg)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert [t for c in chunks for t in c.token_ids] == list(alone.token_ids)


def _running(server) -> int:
    return server.engine.scheduler.num_running + server.engine.scheduler.num_waiting


def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _running(server)


def test_cancel_mid_stream_frees_the_slot(server):
    stub = grpc_stub(server.address)
    call = stub.GenerateStream(_req([5, 6, 7], "target", max_new_tokens=200))
    first = next(call)
    assert first.token_ids
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert _wait_idle(server) == 0
    assert stub.Generate(_req([5, 6], max_new_tokens=3)).finish_reason == pb.FINISH_REASON_LENGTH


def test_deadline_exceeded_frees_the_slot(server):
    stub = grpc_stub(server.address)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req([5, 6, 7], "target", max_new_tokens=240), timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(server) == 0
    assert stub.Generate(_req([5, 6], max_new_tokens=3)).finish_reason == pb.FINISH_REASON_LENGTH


BAD = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("two prompts", {"prompt": "x", "prompt_token_ids": [5]}, "prompt_token_ids"),
    ("negative token id", {"prompt_token_ids": [5, -1]}, "prompt_token_ids"),
    ("token id outside the vocabulary", {"prompt_token_ids": [5, 300]}, "prompt_token_ids"),
    ("max_new_tokens zero", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ("max_new_tokens beyond the context", {"prompt": "x", "max_new_tokens": 10_000}, "max_new_tokens"),
    ("negative temperature", {"prompt": "x", "temperature": -1.0}, "temperature"),
    ("NaN temperature", {"prompt": "x", "temperature": float("nan")}, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0.0}, "top_p"),
    ("top_p above one", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("negative top_k", {"prompt": "x", "top_k": -3}, "top_k"),
    ("unknown mode", {"prompt": "x", "mode": 7}, "mode"),
    ("unknown role", {"messages": [pb.ChatMessage(role="wizard", content="hi")]}, "messages[0].role"),
    ("too many stop strings", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("too long a stop string", {"prompt": "x", "stop": ["y" * 300]}, "stop"),
    ("oversized prompt", {"prompt": "z" * 1_000_001}, "prompt"),
    ("prompt longer than the context", {"prompt_token_ids": [5] * 300}, "prompt"),
    ("seed too large", {"prompt": "x", "seed": 2**63}, "seed"),
    ("too many top_logprobs", {"prompt": "x", "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("gamma beyond max", {"prompt": "x", "num_speculative_tokens": 99}, "num_speculative_tokens"),
]


@pytest.mark.parametrize("name,fields,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(server, name, fields, field):
    stub = grpc_stub(server.address)
    msg = pb.GenerateRequest(**fields)
    for call in (stub.Generate, lambda m: list(stub.GenerateStream(m))):
        with pytest.raises(grpc.RpcError) as e:
            call(msg)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.details())
        assert e.value.details().startswith(field), (field, e.value.details())
    assert stub.Generate(_req([5], max_new_tokens=2)).finish_reason == pb.FINISH_REASON_LENGTH


def test_non_finite_logits_fail_one_request_with_internal(server, monkeypatch):
    """A request whose numbers go bad fails alone: the others in the same batch finish."""
    model = server.engine.target.model
    forward = model.forward
    poison = 299
    scheduler = server.engine.scheduler

    def poisoned(batch, cache):
        logits = forward(batch, cache)
        victims = [s.slot for s in list(scheduler.running) if s.request.prompt_ids == [5, 6, poison]]
        if logits is not None and victims:
            rows = torch.isin(batch.slots, torch.tensor(victims))
            logits[rows] = float("nan")
        return logits

    monkeypatch.setattr(model, "forward", poisoned)
    stub = grpc_stub(server.address)
    with ThreadPoolExecutor(4) as pool:
        good = [
            pool.submit(stub.Generate, _req([5, 6, 7 + i], "target", max_new_tokens=20)) for i in range(3)
        ]
        bad = pool.submit(stub.Generate, _req([5, 6, poison], "target", max_new_tokens=20))
        with pytest.raises(grpc.RpcError) as e:
            bad.result()
        assert e.value.code() == grpc.StatusCode.INTERNAL and "non-finite logits" in e.value.details()
        assert all(f.result().finish_reason == pb.FINISH_REASON_LENGTH for f in good)
    monkeypatch.undo()
    assert _wait_idle(server) == 0


def test_model_info(server):
    info = grpc_stub(server.address).GetModelInfo(pb.GetModelInfoRequest())
    assert info.target.architecture == "llama" and info.draft.architecture == "llama"
    assert info.tokenizer_vocab_size == 300 and info.max_context == 256 and info.max_batch_size == 8
    assert set(info.modes) == {pb.MODE_SPECULATIVE, pb.MODE_TARGET, pb.MODE_DRAFT}
    assert info.target.dtype == "float32" and info.target.device == "cpu"


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specdec.v1.SpecDec"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [listing] = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in listing.list_services_response.service}
    assert {"specdec.v1.SpecDec", "grpc.health.v1.Health"} <= names
    [desc] = list(
        reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="specdec.v1.SpecDec")])
        )
    )
    assert desc.file_descriptor_response.file_descriptor_proto


def _metrics(server) -> dict[str, float]:
    return scrape_metrics(server.config.metrics_port)


def test_metrics_are_plausible_after_traffic(server):
    stub = grpc_stub(server.address)
    before = _metrics(server)
    # γ forced: adaptive γ may rightly decide that this tiny pair is not worth drafting for.
    stub.Generate(_req([5, 6, 7], "speculative", max_new_tokens=12, num_speculative_tokens=3))
    stub.Generate(_req([5, 6, 7], "target", max_new_tokens=12))
    _wait_idle(server)
    after = _metrics(server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('specdec_requests_total{mode="speculative",status="OK"}') >= 1
    assert delta('specdec_requests_total{mode="target",status="OK"}') >= 1
    assert delta("specdec_generation_tokens_total") >= 24
    assert delta("specdec_prompt_tokens_total") >= 6
    assert delta("specdec_time_to_first_token_seconds_count") >= 2
    assert delta("specdec_e2e_request_latency_seconds_count") >= 2
    assert delta("specdec_inter_token_latency_seconds_count") >= 1
    assert (
        delta("specdec_spec_decode_num_draft_tokens_total")
        >= delta("specdec_spec_decode_num_accepted_tokens_total")
        > 0
    )
    assert delta('specdec_spec_decode_num_accepted_tokens_per_pos_total{position="0"}') > 0
    assert after["specdec_num_requests_running"] == 0 and after["specdec_num_requests_waiting"] == 0


def test_queue_overflow_is_resource_exhausted(pairs):
    target, draft = pairs("llama-close")
    engine = Engine(
        target=target,
        draft=draft,
        config=EngineConfig(max_batch_size=1, max_queue=1, max_context=256, warmup=False),
    )
    # Until `running` is set the engine thread admits requests but generates nothing, so neither
    # long request can finish (and free its place) before the overflowing one arrives, however
    # fast this machine is.
    running = threading.Event()
    step = engine.scheduler.step

    def gated_step():
        if running.is_set():
            return step()
        time.sleep(0.005)
        return StepReport(outputs=[], in_flight=engine.scheduler.num_running + engine.scheduler.num_waiting)

    engine.scheduler.step = gated_step
    srv = serve_in_thread(engine, max_client_requests=2)  # this test's one client may fill it all
    try:
        stub = grpc_stub(srv.address)
        long_calls = [stub.GenerateStream(_req([5, 6], "target", max_new_tokens=200)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while _running(srv) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _running(srv) == 2
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_req([5], max_new_tokens=2))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in e.value.details()
        for call in long_calls:
            call.cancel()
        running.set()
        assert _wait_idle(srv) == 0
        assert stub.Generate(_req([5], max_new_tokens=2)).finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        srv.stop()


def test_graceful_shutdown_finishes_in_flight_work_and_exits_0(tmp_path):
    """A real `specdec serve` process (the demo pair, so a long request takes seconds): SIGTERM ->
    NOT_SERVING, new requests UNAVAILABLE (HTTP 503), the in-flight requests of both protocols
    complete, exit code 0 - uvicorn does not take SIGTERM from the server's own drain."""
    import http.client

    import specdec

    demo = Path(specdec.__file__).parent / "assets" / "demo"
    target, draft = demo / "target", demo / "draft"
    port, http_port = free_port(), free_port()
    proc, lines = serve_process(
        "--target", str(target), "--draft", str(draft), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "0", "--grace-period", "60", "--http-port", str(http_port),
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SpecDecStub(channel)
        call = stub.GenerateStream(_req([5, 6, 7], "target", max_new_tokens=600))
        received = [next(call)]
        web = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
        body = {
            "model": "target:target",
            "prompt": [5, 6, 7],
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
        }
        web.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        stream = web.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        late.request("POST", "/v1/completions", body=json.dumps({**body, "stream": False}),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        assert late.getresponse().status == 503
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_req([5], max_new_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        received.extend(call)
        assert received[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in received) == 600
        rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
        request_lines = [
            json.loads(line.split(" specdec.requests ", 1)[1])
            for line in (lines + log.splitlines())
            if " specdec.requests " in line
        ]
        assert any(r["completion_tokens"] == 600 and r["status"] == "OK" for r in request_lines), log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
