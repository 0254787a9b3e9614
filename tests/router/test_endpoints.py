"""The router's `kind: openai` endpoint: against a second specdec serving the OpenAI HTTP API on
loopback (one specdec escalating to another), and against a stub server for the retry rules."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from specdec import Engine, SamplingParams
from specdec.config import EngineConfig
from specdec.errors import SpecdecError
from specdec.router.endpoints import EndpointError, OpenAIEndpoint
from specdec.testing import free_port, serve_in_thread

MESSAGES = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def second_specdec(pairs, tmp_path_factory):
    target, draft = pairs("llama-close")
    engine = Engine(target=target, draft=draft, config=EngineConfig(max_batch_size=4, max_context=256))
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("sk-frontier\n")
    srv = serve_in_thread(engine, http_port=free_port(), api_key_file=keys)
    yield engine, srv
    srv.stop()


def _endpoint(srv, engine, **kw) -> OpenAIEndpoint:
    return OpenAIEndpoint(
        name="frontier", base_url=f"http://127.0.0.1:{srv.config.http_port}/v1",
        model=engine.target.name + ":target", api_key_env="FRONTIER_API_KEY", **kw,
    )  # fmt: skip


def test_one_specdec_answers_another(second_specdec, monkeypatch):
    engine, srv = second_specdec
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-frontier")
    answer = _endpoint(srv, engine).chat(MESSAGES, max_tokens=12, temperature=0, ignore_eos=True)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    [local] = engine.generate([engine.render_chat(MESSAGES)], params, mode="target")
    assert answer.text == local.text and answer.completion_tokens == 12 and answer.attempts == 1
    assert answer.finish_reason == "length" and answer.raw["specdec"]["choices"][0]["mode"] == "target"


def test_a_wrong_or_missing_key_fails_at_once_naming_the_endpoint(second_specdec, monkeypatch):
    engine, srv = second_specdec
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-wrong")
    with pytest.raises(EndpointError) as e:
        _endpoint(srv, engine).chat(MESSAGES, max_tokens=2)
    assert e.value.status == 401 and "endpoint frontier" in str(e.value) and "API key" in str(e.value)
    monkeypatch.delenv("FRONTIER_API_KEY")
    with pytest.raises(EndpointError, match="FRONTIER_API_KEY is not set"):
        _endpoint(srv, engine).chat(MESSAGES, max_tokens=2)


def test_bad_requests_are_not_retried(second_specdec, monkeypatch):
    engine, srv = second_specdec
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-frontier")
    started = time.monotonic()
    with pytest.raises(EndpointError) as e:
        _endpoint(srv, engine, retries=3, backoff_s=1.0).chat(MESSAGES, max_tokens=10**6)
    assert e.value.status == 400 and "max_tokens" in str(e.value)
    assert time.monotonic() - started < 1.0  # no backoff was waited


class _Flaky(http.server.BaseHTTPRequestHandler):
    """503 (with Retry-After) for the first `failures` calls, then a chat completion."""

    failures = 2
    calls = 0

    def do_POST(self):  # the stdlib handler's name for it
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            body = json.dumps({"error": {"message": "busy", "type": "service_unavailable"}}).encode()
            self.send_response(503)
            self.send_header("Retry-After", "0.05")
        else:
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()  # fmt: skip
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    _Flaky.calls, _Flaky.failures = 0, 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_retryable_statuses_are_retried_after_retry_after(flaky):
    endpoint = OpenAIEndpoint(
        "flaky", f"http://127.0.0.1:{flaky.server_port}/v1", "m", retries=2, backoff_s=5.0
    )
    answer = endpoint.chat(MESSAGES)
    assert answer.text == "ok" and answer.attempts == 3 and answer.seconds < 2.0  # Retry-After, not 5 s


def test_retries_run_out(flaky):
    endpoint = OpenAIEndpoint("flaky", f"http://127.0.0.1:{flaky.server_port}/v1", "m", retries=1)
    with pytest.raises(EndpointError) as e:
        endpoint.chat(MESSAGES)
    assert e.value.status == 503 and "2 attempt(s)" in str(e.value) and "busy" in str(e.value)


def test_an_endpoint_that_is_not_there():
    dead = OpenAIEndpoint("dead", f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError) as e:
        dead.chat(MESSAGES)
    assert e.value.status is None and "ConnectionRefusedError" in str(e.value)


def test_an_endpoint_that_keeps_failing_cools_down_then_tries_again(flaky):
    """Two failed calls in a row (retries spent) start a cool-down: calls then fail at once without
    reaching the server; after it the next call is sent, and a success resets the count."""
    _Flaky.failures = 2
    endpoint = OpenAIEndpoint(
        "flaky",
        f"http://127.0.0.1:{flaky.server_port}/v1",
        "m",
        retries=0,
        failures_to_cool=2,
        cooldown_s=0.5,
    )
    for _ in range(2):
        with pytest.raises(EndpointError, match="HTTP 503: busy"):
            endpoint.chat(MESSAGES)
    assert _Flaky.calls == 2
    started = time.monotonic()
    with pytest.raises(
        EndpointError,
        match=r"flaky: cooling down for 0\.\d s more after 2 failed calls in a row \(last: .*busy",
    ):
        endpoint.chat(MESSAGES)
    assert _Flaky.calls == 2 and time.monotonic() - started < 0.1  # no request, no wait
    time.sleep(0.55)
    assert endpoint.chat(MESSAGES).text == "ok" and _Flaky.calls == 3
    _Flaky.failures, _Flaky.calls = 1, 0  # one failure after a success does not cool it down
    with pytest.raises(EndpointError, match="HTTP 503"):
        endpoint.chat(MESSAGES)
    assert endpoint.chat(MESSAGES).text == "ok"


def test_bad_requests_do_not_count_toward_a_cool_down(second_specdec, monkeypatch):
    engine, srv = second_specdec
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-frontier")
    endpoint = _endpoint(srv, engine, retries=0, failures_to_cool=1, cooldown_s=60)
    with pytest.raises(EndpointError) as e:
        endpoint.chat(MESSAGES, max_tokens=10**6)
    assert e.value.status == 400
    assert endpoint.chat(MESSAGES, max_tokens=4).text  # not cooling down


@pytest.mark.parametrize(
    "fields,fragment",
    [
        ({"base_url": "ftp://x/v1"}, "base_url"),
        ({"model": ""}, "model"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"failures_to_cool": -2}, "failures_to_cool"),
    ],
)
def test_bad_endpoint_settings_are_refused_naming_them(fields, fragment):
    settings = {"name": "e", "base_url": "http://127.0.0.1:1/v1", "model": "m", **fields}
    with pytest.raises(SpecdecError, match=fragment):
        OpenAIEndpoint(**settings)
