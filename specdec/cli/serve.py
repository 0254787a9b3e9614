"""`specdec serve`: the models over gRPC (default: the embedded demo pair)."""

from __future__ import annotations

import argparse
import sys

from specdec.assets import resolve_pair
from specdec.cli.options import add_engine_flags, engine_config
from specdec.errors import SpecdecError


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve the models over gRPC (default: the embedded demo pair)")
    add_engine_flags(srv)
    srv.add_argument("--host", default="0.0.0.0")
    srv.add_argument("--port", type=int, default=50051)
    srv.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 = off")
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


def _status(message: str) -> None:
    print(f"specdec: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from specdec.engine import Engine, resolve_device
    from specdec.server.app import ServerConfig, configure_cpu_threads, serve

    target, draft = resolve_pair(args.target, args.draft)
    if args.cpu_threads < 0:
        raise SpecdecError(f"--cpu-threads must be >= 0 (0 = all cores but one), got {args.cpu_threads}")
    config = engine_config(args)
    device = resolve_device(config.device)
    threads = configure_cpu_threads(device, args.cpu_threads)
    if device.type == "cpu":
        _status(f"{threads} torch compute thread(s)")
    _status(f"loading target {target}" + (f" and draft {draft}" if draft else ""))
    engine = Engine(target=target, draft=draft, config=config)  # logs the KV cache's size
    server = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, grace_period=args.grace_period
    )

    def ready(port: int) -> None:
        _status(f"serving on {args.host}:{port} (metrics on :{args.metrics_port or 'off'}); Ctrl-C to stop")

    asyncio.run(serve(engine, server, on_ready=ready))
    return 0
