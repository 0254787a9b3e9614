"""A server running in a thread of this process: for embedding next to other work, the tests and
the load generator. (`specdec serve` runs the same `serve` coroutine on the main thread.)"""

from __future__ import annotations

import asyncio
import threading

from specdec.engine import Engine
from specdec.server.app import ServerConfig, serve


class BackgroundServer:
    def __init__(self, engine: Engine, config: ServerConfig, start_timeout: float = 120.0):
        self.engine = engine
        self.config = config
        self.port = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specdec-grpc", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout) or self.error is not None:
            raise RuntimeError(f"the server did not start: {self.error}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to the constructor or on stop()
            self.error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve(self.engine, self.config, on_ready=self._on_ready, stop_event=self._stop)

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown: in-flight requests finish within the grace period."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
