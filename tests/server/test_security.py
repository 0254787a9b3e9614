"""API keys, TLS and mTLS, safe defaults, per-client limits and fair admission."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec import Engine
from specdec.client import Client, build_request
from specdec.config import EngineConfig
from specdec.errors import SpecdecError
from specdec.server.app import Security, ServerConfig
from specdec.server.auth import ApiKeys
from specdec.testing import free_port, grpc_stub, serve_in_thread, serve_process
from specdec.v1 import specdec_pb2 as pb

SPECDEC = str(Path(sys.executable).parent / "specdec")
CONFIG = EngineConfig(max_batch_size=2, max_queue=8, max_context=128, warmup=False)


def _req(prompt=(5, 6, 7), **fields):
    fields.setdefault("max_new_tokens", 4)
    return build_request(list(prompt), "target", **fields)


def _auth(key):
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def engine(pairs):
    target, draft = pairs("llama-close")
    return Engine(target=target, draft=draft, config=CONFIG)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated monthly\nalpha-key-1\n\n  beta-key-2  \n")
    return path


# ------------------------------------------------------------------------------------------ keys


def test_key_files_are_parsed_and_an_empty_one_never_means_authentication_off(tmp_path, key_file):
    keys = ApiKeys(key_file)
    assert keys.count == 2
    assert keys.client_of(_auth("alpha-key-1")) == keys.client_of([("Authorization", "bearer alpha-key-1")])
    assert keys.client_of(_auth("beta-key-2")) is not None and keys.client_of(_auth("gamma")) is None
    assert keys.client_of(None) is None and keys.client_of([("authorization", "alpha-key-1")]) is None
    assert "alpha" not in keys.client_of(_auth("alpha-key-1"))  # the name does not reveal the key
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(SpecdecError, match=r"--api-key-file .*empty: holds no key"):
        ApiKeys(empty)
    with pytest.raises(SpecdecError, match=r"--api-key-file .*missing: cannot read it"):
        ApiKeys(tmp_path / "missing")


def test_keys_carry_their_grants(tmp_path):
    path = tmp_path / "keys"
    path.write_text("plain-key  # may call\nadmin#key route:force route:threshold\nops-key route:threshold\n")
    keys = ApiKeys(path)
    assert keys.count == 3
    assert keys.grants(keys.client_of(_auth("plain-key"))) == frozenset()
    assert keys.grants(keys.client_of(_auth("admin#key"))) == {"route:force", "route:threshold"}
    assert keys.grants(keys.client_of(_auth("ops-key"))) == {"route:threshold"}
    assert keys.grants("ipv4:127.0.0.1") == frozenset()
    path.write_text("a-key route:everything\n")
    with pytest.raises(SpecdecError, match=r"line 1: unknown grant 'route:everything'; known: route:force"):
        ApiKeys(path)


def test_a_failed_reload_keeps_the_old_keys(key_file, caplog):
    keys = ApiKeys(key_file)
    key_file.write_text("\n# all gone\n")
    with caplog.at_level(logging.ERROR, logger="specdec.server"):
        assert not keys.reload()
    assert "the 2 loaded before stay valid" in caplog.text
    key_file.unlink()
    assert not keys.reload()
    assert keys.client_of(_auth("alpha-key-1")) is not None
    key_file.write_text("gamma-key-3\n")
    assert keys.reload()
    assert keys.client_of(_auth("alpha-key-1")) is None and keys.client_of(_auth("gamma-key-3")) is not None


def test_calls_need_a_valid_key_except_health(engine, key_file):
    server = serve_in_thread(engine, api_key_file=key_file)
    try:
        stub = grpc_stub(server.address)
        for metadata in (None, _auth("wrong"), _auth(""), (("authorization", "alpha-key-1"),)):
            for call in (
                lambda md: stub.Generate(_req(), metadata=md),
                lambda md: list(stub.GenerateStream(_req(), metadata=md)),
                lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert (
                    e.value.details()
                    == "missing or invalid API key: send the metadata 'authorization: Bearer <key>'"
                )
        for key in ("alpha-key-1", "beta-key-2"):
            assert stub.Generate(_req(), metadata=_auth(key)).finish_reason == pb.FINISH_REASON_LENGTH
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:
            list(reflect.ServerReflectionInfo(iter([listing])))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        [reply] = list(reflect.ServerReflectionInfo(iter([listing]), metadata=_auth("beta-key-2")))
        assert "specdec.v1.SpecDec" in {s.name for s in reply.list_services_response.service}
        with Client(server.address, api_key="alpha-key-1") as client:  # the bundled client
            assert client.generate([5, 6], max_new_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for loopback, a client certificate, and a stranger's CA."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    stranger = other.issue_cert("mallory@example.com")
    files = {}
    for name, blob in (
        ("ca", ca.cert_pem), ("server.crt", server.cert_chain_pems[0]), ("server.key", server.private_key_pem),
        ("client.crt", client.cert_chain_pems[0]), ("client.key", client.private_key_pem),
        ("stranger.crt", stranger.cert_chain_pems[0]), ("stranger.key", stranger.private_key_pem),
        ("other.key", other.issue_cert("x").private_key_pem),
    ):  # fmt: skip
        blob.write_to_path(str(root / name))
        files[name] = root / name
    return files


def test_tls_serves_only_tls_clients(engine, pki):
    server = serve_in_thread(engine, tls_cert=pki["server.crt"], tls_key=pki["server.key"])
    try:
        with Client(server.address, tls_ca=pki["ca"]) as client:
            assert client.generate([5, 6], max_new_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(server.address).Generate(_req(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext client gets nothing
    finally:
        server.stop()


def test_mtls_requires_a_client_certificate_from_the_ca(engine, pki):
    server = serve_in_thread(
        engine, tls_cert=pki["server.crt"], tls_key=pki["server.key"], tls_client_ca=pki["ca"]
    )
    try:
        with Client(
            server.address, tls_ca=pki["ca"], tls_cert=pki["client.crt"], tls_key=pki["client.key"]
        ) as c:
            assert c.generate([5, 6], max_new_tokens=2).finish_reason == pb.FINISH_REASON_LENGTH
        for cert, key in ((None, None), (pki["stranger.crt"], pki["stranger.key"])):
            with Client(server.address, tls_ca=pki["ca"], tls_cert=cert, tls_key=key, timeout=5) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.generate([5, 6], max_new_tokens=2)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_bad_pem_files_stop_start_up_naming_the_file(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cases = [
        (dict(tls_cert=garbage, tls_key=pki["server.key"]), rf"--tls-cert {garbage}: not a PEM certificate"),
        (dict(tls_cert=pki["server.crt"], tls_key=garbage), rf"--tls-key {garbage}: not a PEM private key"),
        (dict(tls_cert=pki["server.crt"], tls_key=pki["other.key"]), r"--tls-key .*other.key: not the private key of --tls-cert"),
        (dict(tls_cert=tmp_path / "nope.crt", tls_key=pki["server.key"]), r"--tls-cert .*nope.crt: cannot read it"),
        (dict(tls_cert=pki["server.crt"], tls_key=pki["server.key"], tls_client_ca=garbage), rf"--tls-client-ca {garbage}"),
    ]  # fmt: skip
    for fields, message in cases:
        with pytest.raises(SpecdecError, match=message):
            Security.load(ServerConfig(**fields))
    with pytest.raises(SpecdecError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=pki["server.crt"])


def test_the_cli_refuses_a_bad_certificate_before_loading_models(tmp_path):
    garbage = tmp_path / "cert.pem"
    garbage.write_text("hello")
    started = time.monotonic()
    out = subprocess.run(
        [SPECDEC, "serve", "--tls-cert", str(garbage), "--tls-key", str(garbage), "--port", str(free_port()),
         "--http-port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and f"--tls-cert {garbage}: not a PEM certificate" in out.stderr
    assert "loading target" not in out.stderr and time.monotonic() - started < 60


# ------------------------------------------------------------------------------------------ defaults


def test_the_server_listens_on_loopback_unless_told_and_warns_when_exposed(engine, caplog):
    from specdec.cli import build_parser
    from specdec.cli.serve import server_config

    config = server_config(build_parser().parse_args(["serve"]))
    assert config.host == "127.0.0.1" and config.metrics_host is None and not config.exposed
    assert server_config(build_parser().parse_args(["serve", "--host", "0.0.0.0"])).exposed
    assert server_config(build_parser().parse_args(["serve", "--metrics-host", "0.0.0.0"])).exposed
    with caplog.at_level(logging.WARNING, logger="specdec.server"):
        server = serve_in_thread(engine, metrics_host="0.0.0.0")
        server.stop()
    assert "listening beyond this machine" in caplog.text and "without API keys and TLS" in caplog.text


# ------------------------------------------------------------------------------------------ limits


def _gate(engine, monkeypatch):
    """Hold the engine's steps until the returned event is set (the engine thread admits nothing)."""
    from specdec.scheduler import StepReport

    go = threading.Event()
    step = engine.scheduler.step

    def gated():
        if go.is_set():
            return step()
        time.sleep(0.005)
        return StepReport(outputs=[], in_flight=engine.scheduler.num_running + engine.scheduler.num_waiting)

    monkeypatch.setattr(engine.scheduler, "step", gated)
    return go


def test_one_client_cannot_take_every_slot_and_the_queue(engine, key_file, monkeypatch):
    server = serve_in_thread(engine, api_key_file=key_file, max_client_requests=2)
    go = _gate(engine, monkeypatch)
    try:
        stub = grpc_stub(server.address)
        held = [stub.GenerateStream(_req(max_new_tokens=50), metadata=_auth("alpha-key-1")) for _ in range(2)]
        deadline = time.monotonic() + 10
        while server.engine.scheduler.num_waiting + server.engine.scheduler.num_running < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_req(), metadata=_auth("alpha-key-1"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this client already has 2 requests in flight" in e.value.details()
        other = stub.Generate.future(_req(), metadata=_auth("beta-key-2"))  # another client is let in
        go.set()
        assert other.result(timeout=30).finish_reason == pb.FINISH_REASON_LENGTH
        for call in held:
            assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert stub.Generate(_req(), metadata=_auth("alpha-key-1")).finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        server.stop()


def test_waiting_requests_are_admitted_fairly_across_clients(engine):
    """Client a queues four requests, then b one: with one slot free at a time, b's is served second,
    not fifth."""
    from specdec.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    scheduler = engine.scheduler
    order = []
    handles = {}
    for client in ("a", "a", "a", "a", "b"):
        request = engine.make_request([5, 6, 7], params, "target")
        request.client = client
        handles[scheduler.add_request(request)] = client
    while scheduler.has_unfinished():
        for out in scheduler.step().outputs:
            if out.finished:
                order.append(handles[out.handle])
    # Two slots: a and a start; when they finish, b (holding none, served longest ago) goes first.
    assert order.index("b") < 3, order


# ------------------------------------------------------------------------------------------ rotation


@pytest.mark.slow
def test_sighup_reloads_the_keys_of_a_running_server(llama_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    port = free_port()
    proc, _ = serve_process(
        "--target", str(llama_path), "--port", str(port), "--metrics-port", "0", "--max-context", "128",
        "--api-key-file", str(keys), "--http-port", "0",
    )  # fmt: skip
    try:
        stub = grpc_stub(f"127.0.0.1:{port}")
        assert stub.Generate(_req(), metadata=_auth("old-key")).finish_reason == pb.FINISH_REASON_LENGTH
        keys.write_text("old-key\nnew-key\n")  # rotation: both valid while clients move over
        proc.send_signal(signal.SIGHUP)
        _eventually(lambda: stub.Generate(_req(), metadata=_auth("new-key")))
        keys.write_text("new-key\n")
        proc.send_signal(signal.SIGHUP)
        _eventually(lambda: _refused(stub, "old-key"))
        assert stub.Generate(_req(), metadata=_auth("new-key")).finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        proc.kill()


def _refused(stub, key):
    try:
        stub.Generate(_req(), metadata=_auth(key))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return True
    raise AssertionError("still accepted")


def _eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (grpc.RpcError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
