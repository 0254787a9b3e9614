"""A real server on a loopback port, run in a thread of the test process."""

from __future__ import annotations

import socket

import grpc

from specdec import Engine
from specdec.server.app import ServerConfig
from specdec.server.background import BackgroundServer
from specdec.v1 import specdec_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread(BackgroundServer):
    def __init__(self, engine: Engine, grace_period: float = 10.0):
        self.metrics_port = free_port()
        super().__init__(
            engine,
            ServerConfig(host="127.0.0.1", port=0, metrics_port=self.metrics_port, grace_period=grace_period),
        )

    def stub(self) -> pb_grpc.SpecDecStub:
        return pb_grpc.SpecDecStub(grpc.insecure_channel(self.address))
