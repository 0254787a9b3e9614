"""Start-up and shutdown of the gRPC server.

    asyncio.run(serve(engine, ServerConfig(port=50051)))

Serves SpecDec, the standard grpc.health.v1 Health service (SERVING once the models are loaded
and warmed up, NOT_SERVING while draining or once the engine thread has failed) and server
reflection (grpcurl needs no proto file).
The OpenAI-compatible HTTP API (`specdec.server.http`) listens on its own port in the same event
loop, on the same engine loop. Prometheus metrics go to their own HTTP port. SIGTERM or Ctrl-C:
health goes NOT_SERVING (HTTP /health 503), new requests get UNAVAILABLE (HTTP 503), in-flight
requests of both protocols finish within the grace period, the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.engine import Engine
from specdec.errors import SpecdecError
from specdec.request import Mode, RequestOutput
from specdec.router.router import Router
from specdec.router.routes import RoutesConfig, load_routes
from specdec.scheduler import StepReport
from specdec.server.auth import ApiKeyInterceptor, ApiKeys
from specdec.server.engine_loop import EngineLoop, Subscription
from specdec.server.metrics import Metrics, log_request, status_of
from specdec.server.routed import Hooks, RoutedService
from specdec.server.servicer import SpecDecServicer, add_to_server
from specdec.server.tls import server_credentials
from specdec.v1 import specdec_pb2 as pb

log = logging.getLogger("specdec.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecDec"].full_name


# torch's own choice for this machine, taken before anything changes it, so that configuring twice
# gives the same answer.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def configure_cpu_threads(device: torch.device, requested: int = 0, available: int | None = None) -> int:
    """Set torch's compute threads for serving and return the number set.

    On the CPU the model's parallel regions stall whenever one of their threads is preempted,
    and a server always has other threads to run (the gRPC event loop and completion queues, the
    clients on the same host). So by default the compute leaves one core to them. Measured on 2
    cores with the demo pair (docs/BENCHMARKS.md): 1 compute thread served 1.6× the tokens/s of 2
    at one client, 1.03× at sixteen (two load-test runs minutes apart). `requested` > 0 or
    OMP_NUM_THREADS set by the user win. On a GPU the host threads only launch work, so torch's
    default stands. `available`: the threads torch would use (default: its own choice at import)."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (available or _TORCH_DEFAULT_THREADS) - 1))
    return torch.get_num_threads()


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise; "0.0.0.0" exposes the server
    port: int = 50051  # 0: any free port (the bound port is reported through `on_ready`)
    metrics_port: int = 9090  # 0: no metrics endpoint
    metrics_host: str | None = None  # None: the same as `host`
    grace_period: float = 30.0  # seconds in-flight requests get to finish on shutdown
    max_message_bytes: int = 16 * 1024 * 1024
    api_key_file: Path | None = None  # None: no authentication (refused, with a warning, when exposed)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)
    # Requests one client (an API key, or a peer host without keys) may have in flight; 0: half of
    # max_batch_size + max_queue, so one client can never hold every slot and the whole queue.
    max_client_requests: int = 0
    # The OpenAI-compatible HTTP API (specdec.server.http), on `host` like gRPC; 0: off (the
    # default for embedders; `specdec serve --http-port` defaults to 8000).
    http_port: int = 0
    served_model_name: str | None = None  # the `model` id HTTP clients name (default: the target's name)
    routes: Path | None = None  # the router's routes file (specdec.router.routes); None: no routes

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SpecdecError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SpecdecError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")
        if not 0 <= self.http_port <= 65535:
            raise SpecdecError(f"--http-port must be in [0, 65535] (0 = off), got {self.http_port}")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise SpecdecError(
                f"--http-port {self.http_port} is also the gRPC --port or the --metrics-port; give each its own"
            )
        if self.max_client_requests < 0:
            raise SpecdecError(
                f"--max-client-requests must be >= 0 (0 = the default), got {self.max_client_requests}"
            )

    @property
    def exposed(self) -> bool:
        """Listening beyond this machine."""
        return not _is_loopback(self.host) or not _is_loopback(self.metrics_host or self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """The loaded API keys and TLS credentials of a ServerConfig (None: not configured)."""

    keys: ApiKeys | None
    credentials: grpc.ServerCredentials | None

    @staticmethod
    def load(config: ServerConfig) -> Security:
        """Read and check the key file and the PEM files; SpecdecError naming the file on a problem
        (call it before loading the models, so a typo fails in a second, not a minute)."""
        keys = ApiKeys(config.api_key_file) if config.api_key_file else None
        credentials = None
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        return Security(keys, credentials)


def client_cap(config: ServerConfig, engine: Engine) -> int:
    engine_config = engine.config
    return config.max_client_requests or max(1, (engine_config.max_batch_size + engine_config.max_queue) // 2)


def _instrumented_loop(engine: Engine, metrics: Metrics, on_fatal, max_client_requests: int) -> EngineLoop:
    scheduler = engine.scheduler

    def on_step(report: StepReport) -> None:
        # Called on the engine thread, between steps: the scheduler's counts are stable.
        decision = report.decision
        gammas = list(decision.gammas) if decision is not None else []
        metrics.observe_step(
            report.outputs, report.seconds, scheduler.num_running, scheduler.num_waiting, gammas
        )

    def on_output(sub: Subscription, out: RequestOutput, interval: float) -> None:
        if out.new_token_ids and out.completion_tokens > len(out.new_token_ids):
            metrics.observe_tokens(len(out.new_token_ids), interval)  # not the first token: that is TTFT
        if out.finished:
            mode = out.mode or Mode.SPECULATIVE
            status = status_of(out)
            metrics.observe_finish(out, mode, status)
            log_request(out, mode, status, sub.request.client, sub.request.user)

    return EngineLoop(
        scheduler,
        engine.limits,
        on_step=on_step,
        on_output=on_output,
        on_fatal=on_fatal,
        max_client_requests=max_client_requests,
    )


async def serve(
    engine: Engine,
    config: ServerConfig,
    on_ready=None,  # callable(bound_port) once SERVING
    stop_event: asyncio.Event | None = None,  # set it to shut down (signals set it too)
    security: Security | None = None,  # loaded already (Security.load(config)); None: load it here
    routes: RoutesConfig | None = None,  # loaded already (load_routes(config.routes)); None: load it here
) -> None:
    # Everything that can refuse to start does so before anything listens.
    security = security or Security.load(config)
    if routes is None and config.routes is not None:
        routes = load_routes(config.routes)
    router = Router(engine, routes) if routes is not None else None  # what the pair cannot serve, refused
    keys, credentials = security.keys, security.credentials
    if config.exposed and (keys is None or credentials is None):
        missing = " and ".join(
            w for w, absent in (("API keys", keys is None), ("TLS", credentials is None)) if absent
        )
        log.warning(
            "listening beyond this machine (%s, metrics %s) without %s: anyone who can reach the port can "
            "use the models%s", config.host, config.metrics_host or config.host, missing,
            " and read the traffic" if credentials is None else "",
        )  # fmt: skip
    metrics = Metrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.metrics_host or config.host)
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()
    stop = stop_event or asyncio.Event()

    def engine_died(error: BaseException) -> None:
        # On the engine thread, after its requests have failed: health goes NOT_SERVING, so load
        # balancers and probes stop sending here; new requests get UNAVAILABLE.
        async def not_serving() -> None:
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        with contextlib.suppress(RuntimeError):  # the event loop may be gone already
            loop.call_soon_threadsafe(lambda: loop.create_task(not_serving()))

    engine_loop = _instrumented_loop(engine, metrics, engine_died, client_cap(config, engine))
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(keys)] if keys else None,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    hooks = Hooks(metrics.observe_route, metrics.observe_feedback, metrics.observe_route_failure)
    routed = RoutedService(engine, router, keys, hooks)  # both protocols' routed requests
    servicer = SpecDecServicer(engine, engine_loop, keys, routed)
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    http = None
    if config.http_port:
        from specdec.server.http import HttpServer, OpenAIApp

        app = OpenAIApp(engine, engine_loop, keys, config.max_message_bytes, config.served_model_name, routed)
        http = HttpServer(
            app, config.host, config.http_port, config.tls_cert, config.tls_key, config.tls_client_ca
        )
        try:
            await http.start()
        except BaseException:
            await server.stop(grace=None)
            raise
    engine_loop.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "specdec serving on %s:%d (%s, %s; OpenAI HTTP API on :%s; metrics on :%s)", config.host, port,
        "mTLS" if config.tls_client_ca else "TLS" if credentials else "plaintext",
        f"{keys.count} API key(s)" if keys else "no API keys", config.http_port or "off",
        config.metrics_port or "off",
    )  # fmt: skip
    if on_ready is not None:
        on_ready(port)

    # Not possible off the main thread (tests run servers in threads; they use stop_event).
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if keys is not None:
            loop.add_signal_handler(signal.SIGHUP, keys.reload)
    await stop.wait()

    log.info("draining: NOT_SERVING, new requests get UNAVAILABLE, %d in flight", engine_loop.in_flight)
    await health_servicer.enter_graceful_shutdown()
    engine_loop.drain()
    deadline = loop.time() + config.grace_period

    def busy() -> bool:  # rows running, or HTTP streams still writing what their rows produced
        return bool(engine_loop.in_flight or (http is not None and http.app.open_streams))

    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if engine_loop.in_flight:
        log.warning(
            "grace period over with %d requests still in flight; they are cancelled", engine_loop.in_flight
        )
    # The engine stops first: what is still running fails as cancelled, so its clients get an
    # error (gRPC UNAVAILABLE, an SSE error event) rather than a connection cut mid-answer.
    await asyncio.to_thread(engine_loop.stop)
    if http is not None:
        flushed = loop.time() + 1.0
        while http.app.open_streams and loop.time() < flushed:
            await asyncio.sleep(0.02)
        await http.stop()
    await server.stop(grace=1.0)
    log.info("specdec stopped")
