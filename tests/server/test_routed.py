"""Routed requests over real gRPC: the route record, the escalation's answer equal to the tier
alone, a routed stream, every bad field refused by name, an endpoint down as UNAVAILABLE, and a bad
routes file stopping start-up."""

from __future__ import annotations

import json

import grpc
import pytest
import yaml

from specdec import Engine
from specdec.client import build_request
from specdec.config import EngineConfig
from specdec.testing import free_port, grpc_stub, scrape_metrics, serve_in_thread
from specdec.v1 import specdec_pb2 as pb

MESSAGES = [{"role": "user", "content": "tell me something"}]
ROUTES = {
    "routes": [
        {"name": "careful", "primary": "draft", "escalate_to": "target", "confidence": "mean_prob",
         "escalate_if": [{"confidence_below": 1.0}]},
        {"name": "easy", "primary": "draft", "escalate_to": "speculative",
         "escalate_if": [{"confidence_below": 0.0}, {"schema_invalid": True}]},
        {"name": "remote", "primary": "draft", "escalate_to": "down", "escalate_if": [{"confidence_below": 1.0}]},
    ],
    "endpoints": {"down": {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m", "retries": 0}},
}  # fmt: skip


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(
        target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_queue=8, max_context=256)
    )


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(yaml.safe_dump(ROUTES))
    srv = serve_in_thread(engine, routes=path)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    return grpc_stub(server.address)


def _req(route="careful", mode=None, **fields):
    fields.setdefault("max_new_tokens", 12)
    fields.setdefault("ignore_eos", True)
    return build_request(MESSAGES, mode, route=route, **fields)


def test_an_escalated_answer_is_the_tiers_own_with_its_record(stub):
    routed = stub.Generate(_req())
    alone = stub.Generate(build_request(MESSAGES, "target", max_new_tokens=12, ignore_eos=True))
    assert list(routed.token_ids) == list(alone.token_ids) and routed.text == alone.text
    record = routed.route
    assert record.route == "careful" and record.tier == "target" and record.escalated
    assert record.HasField("confidence") and list(record.reasons) == [
        f"confidence {record.confidence:.3f} < 1"
    ]
    assert [s.tier for s in record.spent] == ["draft", "target"] and record.spent[0].completion_tokens == 12
    assert not record.HasField("schema_valid") and routed.mode == pb.MODE_TARGET
    assert routed.usage.completion_tokens == 12 and routed.finish_reason == pb.FINISH_REASON_LENGTH
    assert not routed.logprobs  # asked for internally (confidence), returned only when the client asks
    assert len(stub.Generate(_req(logprobs=True)).logprobs) == 12


def test_a_passing_answer_stands_and_a_stream_is_one_message(stub):
    schema = json.dumps(True)  # asks for nothing
    [message] = list(stub.GenerateStream(_req("easy", json_schema=schema)))
    assert message.route.tier == "draft" and not message.route.escalated and not message.route.reasons
    assert message.route.schema_valid and message.mode == pb.MODE_DRAFT
    alone = stub.Generate(build_request(MESSAGES, "draft", max_new_tokens=12, ignore_eos=True))
    assert list(message.token_ids) == list(alone.token_ids)


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"route": "nope"}, "route: unknown route 'nope'; known: careful, easy, remote"),
        ({"mode": "target"}, "mode: a route chooses"),
        ({"num_speculative_tokens": 2}, "num_speculative_tokens: a route chooses"),
        ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
        ({"json_schema": json.dumps({"type": "strnig"})}, "json_schema: not a valid JSON Schema"),
        (
            {"json_schema": json.dumps({"$ref": "http://example.com/s.json"})},
            "remote references are not fetched",
        ),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_routed_fields_are_invalid_argument_naming_them(stub, fields, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req(**{"route": "careful", **fields}))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_routed_requests_need_messages_and_schemas_need_a_route(stub):
    for msg, field in (
        (build_request("a raw prompt", None, route="careful"), "messages: a routed request is a chat"),
        (build_request(MESSAGES, None, json_schema="{}"), "json_schema: needs a route"),
        (
            build_request(MESSAGES, None, route="careful", prompt_token_ids=[5, 6]),
            "messages: a routed request is a chat",
        ),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(msg)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_an_endpoint_that_is_down_is_unavailable_with_its_message(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req("remote"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "endpoint down" in e.value.details() and "ConnectionRefusedError" in e.value.details()
    assert stub.Generate(_req()).route.tier == "target"  # the server goes on serving


def test_a_server_without_routes_refuses_routed_requests(engine):
    srv = serve_in_thread(engine)
    try:
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(srv.address).Generate(_req())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "route: this server serves no routes (start it with --routes FILE)" in e.value.details()
    finally:
        srv.stop()


def test_a_bad_routes_file_stops_start_up_naming_the_problem(engine, tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"routes": [{"name": "x", "primary": "small"}]}))
    with pytest.raises(RuntimeError, match=r"route 'x': primary: unknown tier 'small'"):
        serve_in_thread(engine, routes=path)


def test_route_metrics_count_tiers_reasons_confidence_and_tokens(server, stub):
    before = scrape_metrics(server.config.metrics_port)
    stub.Generate(_req())  # escalates on confidence
    stub.Generate(_req("easy", json_schema="true"))  # answered by the draft, schema valid
    after = scrape_metrics(server.config.metrics_port)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('specdec_route_requests_total{route="careful",tier="target"}') == 1
    assert delta('specdec_route_requests_total{route="easy",tier="draft"}') == 1
    assert delta('specdec_route_escalations_total{reason="confidence_below",route="careful"}') == 1
    assert delta('specdec_route_confidence_count{route="careful"}') == 1
    assert delta('specdec_route_schema_checks_total{route="easy",valid="true"}') == 1
    assert delta('specdec_route_tokens_total{kind="completion",route="careful",tier="draft"}') == 12
    assert delta('specdec_route_tokens_total{kind="completion",route="careful",tier="target"}') == 12
    assert after['specdec_route_escalation_rate{route="careful"}'] == 1.0


def test_failed_routed_requests_are_counted_by_route_and_status(server, stub):
    before = scrape_metrics(server.config.metrics_port)
    for request in (_req("remote"), _req(temperature=-1.0), _req("made-up-route")):
        with pytest.raises(grpc.RpcError):
            stub.Generate(request)
    after = scrape_metrics(server.config.metrics_port)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('specdec_route_failures_total{code="unavailable",route="remote"}') == 1
    assert delta('specdec_route_failures_total{code="invalid_argument",route="careful"}') == 1
    assert not any("made-up-route" in name for name in after)  # a client's name is no label


def test_drift_flags_an_escalation_rate_that_left_its_baseline():
    from prometheus_client import generate_latest

    from specdec.router.router import RouteRecord
    from specdec.router.routes import Drift
    from specdec.server.metrics import Metrics

    metrics = Metrics()

    def record(escalated):
        return RouteRecord("r", "target" if escalated else "draft", escalated, (), (), 0.5, None, None)

    def gauge(name):
        for line in generate_latest(metrics.registry).decode().splitlines():
            if line.startswith(f'{name}{{route="r"}}'):
                return float(line.rsplit(" ", 1)[1])
        return None

    drift = Drift(window=10, tolerance=0.2)
    for i in range(10):  # the first window: 2 of 10 escalate, the baseline
        metrics.observe_route(record(i < 2), drift)
    assert gauge("specdec_route_escalation_baseline") == pytest.approx(0.2)
    assert gauge("specdec_route_drift") == 0.0
    for _ in range(5):  # the window now holds 5 of 10: 0.5 - 0.2 > 0.2
        metrics.observe_route(record(True), drift)
    assert (
        gauge("specdec_route_escalation_rate") == pytest.approx(0.5) and gauge("specdec_route_drift") == 1.0
    )
    for _ in range(10):  # back to none escalating: 0.0 vs 0.2 is within the tolerance
        metrics.observe_route(record(False), drift)
    assert gauge("specdec_route_drift") == 0.0
    forced = Metrics()  # a caller's override is not the traffic's drift: it stays out of the window
    metrics, before = forced, None
    for _ in range(10):
        forced.observe_route(record(False), drift)
    before = gauge("specdec_route_escalation_rate")
    forced.observe_route(RouteRecord("r", "target", True, (), (), 0.5, None, None, overridden=True), drift)
    assert gauge("specdec_route_escalation_rate") == before == 0.0
    fixed = Metrics()  # a configured baseline applies from the first full window
    for _ in range(10):
        fixed.observe_route(record(True), Drift(window=10, tolerance=0.1, baseline=0.3))
    metrics = fixed
    assert (
        gauge("specdec_route_escalation_baseline") == pytest.approx(0.3)
        and gauge("specdec_route_drift") == 1.0
    )


def test_feedback_names_a_response_by_its_server_issued_id_and_moves_the_quality_gauge(server, stub):
    first, second = stub.Generate(_req()), stub.Generate(_req(request_id="mine"))
    ids = {first.route.response_id, second.route.response_id}
    assert len(ids) == 2 and all(i.startswith("resp_") and len(i) > 20 for i in ids)
    stub.Feedback(pb.FeedbackRequest(response_id=first.route.response_id, score=0.25))
    stub.Feedback(pb.FeedbackRequest(response_id=second.route.response_id, correct=True))
    metrics = scrape_metrics(server.config.metrics_port)
    assert metrics['specdec_route_quality{route="careful",tier="target"}'] == pytest.approx(0.625)
    assert metrics['specdec_route_feedback_total{route="careful",tier="target"}'] >= 2
    for request, code, message in (
        (pb.FeedbackRequest(response_id=first.route.response_id, score=1.0), "NOT_FOUND", "already labelled"),
        (pb.FeedbackRequest(response_id="mine", score=1.0), "NOT_FOUND", "no routed response with this id"),
        (
            pb.FeedbackRequest(response_id="x", score=1.5),
            "INVALID_ARGUMENT",
            "score: a quality in [0, 1], got 1.5",
        ),
        (pb.FeedbackRequest(response_id="x"), "INVALID_ARGUMENT", "give exactly one of score"),
        (pb.FeedbackRequest(response_id="x", score=0.5, correct=True), "INVALID_ARGUMENT", "exactly one"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Feedback(request)
        assert e.value.code() == getattr(grpc.StatusCode, code) and message in e.value.details()


def test_a_response_id_is_scoped_to_the_caller_and_memory_is_bounded():
    from specdec.errors import NotFoundError
    from specdec.router.feedback import ResponseLedger

    ledger = ResponseLedger(size=2)
    mine = ledger.issue("key:alice", "r", "draft")
    with pytest.raises(NotFoundError):
        ledger.take(mine, "key:bob")  # another caller's id is as unknown as a made-up one
    assert ledger.take(mine, "key:alice").tier == "draft"
    ids = [ledger.issue("key:alice", "r", "draft") for _ in range(3)]
    assert len(ledger) == 2
    with pytest.raises(NotFoundError):
        ledger.take(ids[0], "key:alice")  # the oldest was forgotten
    assert ledger.take(ids[2], "key:alice").route == "r"
