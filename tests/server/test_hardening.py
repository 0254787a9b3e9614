"""What a hostile newcomer found in the server, each pinned by a test: request ids that are only
labels, an engine thread that cannot die silently, undecodable requests, forged chat roles,
oversized prompts, and what GetModelInfo tells about the host."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.testing import grpc_stub, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

CONFIG = EngineConfig(max_batch_size=4, max_queue=16, max_context=128, warmup=False)


@pytest.fixture(scope="module")
def server(pairs):
    target, draft = pairs("llama-close")
    srv = serve_in_thread(Engine(target=target, draft=draft, config=CONFIG))
    yield srv
    srv.stop()


def _req(prompt, mode="target", **fields):
    fields.setdefault("max_new_tokens", 16)
    fields.setdefault("ignore_eos", True)
    return build_request(prompt, mode, **fields)


def _health(address) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(service="")).status


def test_a_reused_request_id_never_cancels_another_clients_request(server):
    stub = grpc_stub(server.address)
    expected = list(stub.Generate(_req([5, 6, 7], max_new_tokens=40)).token_ids)
    for _ in range(5):
        victim = stub.GenerateStream(_req([5, 6, 7], max_new_tokens=40, request_id="shared"))
        first = next(victim)
        # Another client, the same id: finishes (its cleanup used to cancel by id) and cancels.
        assert (
            stub.Generate(_req([8, 9], max_new_tokens=2, request_id="shared")).finish_reason
            == pb.FINISH_REASON_LENGTH
        )
        other = stub.GenerateStream(_req([8, 9], max_new_tokens=100, request_id="shared"))
        next(other)
        other.cancel()
        chunks = [first, *victim]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert [t for c in chunks for t in c.token_ids] == expected
        assert all(c.request_id == "shared" for c in chunks)


def test_two_requests_in_flight_may_share_an_id(server):
    stub = grpc_stub(server.address)
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(stub.Generate, [_req([5, 6], request_id="x"), _req([7, 8], request_id="x")]))
    assert [r.finish_reason for r in replies] == [pb.FINISH_REASON_LENGTH] * 2


def test_a_failing_observer_does_not_take_the_loop_down(server, monkeypatch, caplog):
    def broken_log(*args):
        raise ZeroDivisionError("a bug in the request log")

    monkeypatch.setattr("specdec.server.app.log_request", broken_log)
    with caplog.at_level(logging.ERROR, logger="specdec.server"):
        reply = grpc_stub(server.address).Generate(_req([5, 6], max_new_tokens=4))
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH and len(reply.token_ids) == 4
    assert "an observer of the engine loop failed" in caplog.text


def test_delivering_to_a_closed_event_loop_is_dropped_quietly():
    import asyncio

    from specdec.request import Request
    from specdec.server.engine_loop import Subscription

    loop = asyncio.new_event_loop()
    sub = Subscription(Request(prompt_ids=[1]), asyncio.Queue(), loop)
    loop.close()
    sub.deliver(None)  # must not raise: the engine thread would die of it


class _Fatal(BaseException):
    """Escapes every `except Exception`: what a bug in the loop itself looks like."""


def test_an_engine_thread_that_dies_fails_its_requests_and_turns_health_off(pairs, monkeypatch, caplog):
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=CONFIG)
    srv = serve_in_thread(engine)
    try:
        stub = grpc_stub(srv.address)
        assert stub.Generate(_req([5, 6], max_new_tokens=2)).finish_reason == pb.FINISH_REASON_LENGTH
        assert _health(srv.address) == health_pb2.HealthCheckResponse.SERVING
        gate = threading.Event()
        step = engine.scheduler.step

        def dying_step():
            if gate.is_set():
                raise _Fatal("injected")
            return step()

        monkeypatch.setattr(engine.scheduler, "step", dying_step)
        call = stub.GenerateStream(_req([5, 6, 7], max_new_tokens=100))
        next(call)
        with caplog.at_level(logging.CRITICAL, logger="specdec.server"):
            gate.set()
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.INTERNAL and "engine stopped" in e.value.details()
            deadline = time.monotonic() + 5
            while _health(srv.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.02)
        assert "the engine thread failed" in caplog.text
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_req([5], max_new_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
