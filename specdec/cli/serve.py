"""`specdec serve`: the models over gRPC and the OpenAI-compatible HTTP API (default: the default pair)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.assets import resolve_pair
from specdec.cli.options import add_engine_flags, engine_config
from specdec.errors import SpecdecError


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve", help="serve the models over gRPC and the OpenAI HTTP API (default: the default pair)"
    )
    add_engine_flags(srv)
    srv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default loopback only; 0.0.0.0 exposes it)"
    )
    srv.add_argument("--port", type=int, default=50051)
    srv.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /v1/models), on --host "
        "like gRPC; 0 = off (default 8000)",
    )
    srv.add_argument(
        "--served-model-name",
        default=None,
        help="the model id HTTP clients name (default: the target's name)",
    )
    srv.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 = off")
    srv.add_argument("--metrics-host", default=None, help="address of the metrics endpoint (default: --host)")
    srv.add_argument(
        "--routes",
        type=Path,
        default=None,
        help="the router's routes file (YAML, docs/ROUTING.md): requests naming a route are routed",
    )
    srv.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="API keys, one per line (# comments); clients send 'authorization: Bearer KEY'; SIGHUP re-reads it",
    )
    srv.add_argument("--tls-cert", type=Path, default=None, help="serve TLS with this certificate (PEM)")
    srv.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    srv.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (mTLS)",
    )
    srv.add_argument(
        "--max-client-requests",
        type=int,
        default=0,
        help="requests one client (API key, or peer host) may have in flight; 0 = half of batch + queue",
    )
    srv.add_argument(
        "--grace-period", type=float, default=30.0, help="seconds in-flight requests get on shutdown"
    )
    srv.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="torch compute threads on the CPU; 0 = all cores but one, left to the gRPC threads",
    )
    srv.set_defaults(func=run)


def server_config(args: argparse.Namespace):
    """The ServerConfig the serve flags ask for (checks that need no files, before models load)."""
    from specdec.server.app import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        grace_period=args.grace_period,
        api_key_file=args.api_key_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_client_requests=args.max_client_requests,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
        routes=args.routes,
    )


def _status(message: str) -> None:
    print(f"specdec: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from specdec.engine import Engine, resolve_device
    from specdec.models.quantize import describe_weights, stored_bytes
    from specdec.router.routes import load_routes
    from specdec.server.app import Security, configure_cpu_threads, serve

    server = server_config(args)
    security = Security.load(server)  # a bad key or certificate file fails before the models load
    routes = load_routes(server.routes) if server.routes else None  # and so does a bad routes file
    target, draft = resolve_pair(args.target, args.draft, args.demo)
    if args.cpu_threads < 0:
        raise SpecdecError(f"--cpu-threads must be >= 0 (0 = all cores but one), got {args.cpu_threads}")
    config = engine_config(args)
    device = resolve_device(config.device)
    threads = configure_cpu_threads(device, args.cpu_threads)
    if device.type == "cpu":
        _status(f"{threads} torch compute thread(s)")
    _status(f"loading target {target}" + (f" and draft {draft}" if draft else ""))
    engine = Engine(target=target, draft=draft, config=config)  # logs the models and the KV cache plan
    _status(
        f"loaded: target {describe_weights(engine.target)}"
        + (
            f"; draft {describe_weights(engine.draft)}; together "
            f"{stored_bytes(engine.target.model, engine.draft.model) / 1e6:.1f} MB (what the draft borrows, once)"
            if engine.draft
            else ""
        )
    )

    def ready(port: int) -> None:
        _status(
            f"serving on {args.host}:{port} (gRPC; OpenAI HTTP API on :{args.http_port or 'off'}, metrics on "
            f":{args.metrics_port or 'off'}); Ctrl-C to stop"
        )

    try:
        asyncio.run(serve(engine, server, on_ready=ready, security=security, routes=routes))
    except OSError as e:  # a port taken or an address not on this machine: nothing started
        raise SpecdecError(f"{e}; choose other ports with --port / --http-port / --metrics-port "
                           "(--http-port 0 turns the HTTP API off)") from None  # fmt: skip
    return 0
