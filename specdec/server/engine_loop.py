"""The engine's step loop in a thread of its own, talking to asyncio handlers through queues.

gRPC handlers run on an asyncio event loop that must never wait on torch. A handler `submit`s a
Request and gets a Subscription: an asyncio.Queue its RequestOutputs arrive on (pushed with
``loop.call_soon_threadsafe``). The loop thread takes new requests and cancellations between steps
(a thread-safe inbox), runs `scheduler.step()` while there is work, and sleeps on a condition
variable when there is none. Cancelling frees the row's slot at the next step. A Subscription is
its request's only key: a client's request_id labels the request and keys nothing, so no client
can cancel, block or probe another's request by naming it.

Admission control is synchronous: a request is validated in the caller's thread against the
engine's frozen `RequestLimits` (the caller never touches the scheduler) and refused at once with
QueueFullError when the server already holds `max_batch_size + max_queue` requests, or when its
client (`Request.client`) already has `max_client_requests` in flight; draining refuses everything
with ShuttingDownError.

If anything escapes the loop, the thread does not die silently: it logs the error, fails every
request in flight with an error (INTERNAL), refuses new ones and calls `on_fatal` (the server turns
its health to NOT_SERVING there). Callbacks that only observe (metrics, logs) cannot take the
loop down: their errors are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.errors import QueueFullError, ShuttingDownError
from specdec.request import FinishReason, Request, RequestOutput, SpecStats, Timing
from specdec.scheduler import Scheduler, StepReport
from specdec.validation import RequestLimits, validate

log = logging.getLogger("specdec.server")


@dataclass(eq=False)
class Subscription:
    request: Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    handle: int | None = None  # the scheduler's, once the loop thread has added the request
    last_output_time: float = field(default_factory=time.monotonic)

    def deliver(self, item: RequestOutput) -> None:
        # The handler's event loop may be gone (the server shut down under it): nobody is left to
        # tell, and that must not take the engine thread down.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        limits: RequestLimits,
        on_step: Callable[[StepReport], None] | None = None,
        on_output: Callable[[Subscription, RequestOutput, float], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        max_client_requests: int | None = None,
    ):
        self.scheduler = scheduler  # touched only by the loop thread
        self.limits = limits
        self.on_step = on_step  # metrics: each step's report
        self.on_output = on_output  # metrics and logs: each output, with seconds since the previous one
        self.on_fatal = on_fatal  # the loop thread is gone (called on that thread, once)
        self.capacity = scheduler.config.max_batch_size + scheduler.config.max_queue
        self.max_client_requests = max_client_requests or self.capacity
        self._per_client: Counter[str] = Counter()  # in flight per Request.client
        self._inbox: list[Subscription] = []
        self._cancels: list[Subscription] = []
        self._subs: set[Subscription] = set()  # in flight: submitted and not yet finished
        self._by_handle: dict[int, Subscription] = {}  # the loop thread's
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)

    # -------------------------------------------------------------------- handler side (any thread)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._subs)

    @property
    def state(self) -> str:
        """serving | draining | failed | stopped (what health checks report)."""
        with self._cond:
            if self.fatal is not None:
                return "failed"
            if self._stopping:
                return "stopped"
            return "draining" if self._draining else "serving"

    def submit(
        self, request: Request, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None
    ) -> Subscription:
        """Validate and enqueue; raises InvalidRequestError, QueueFullError or ShuttingDownError.
        `queue`: where the outputs go (default: a queue of its own); several requests may share
        one (the HTTP API's n choices), their outputs told apart by request_id."""
        validate(request, self.limits)
        with self._cond:
            if self.fatal is not None:
                raise ShuttingDownError(f"the engine stopped after an internal error: {self.fatal!r}")
            if self._draining or self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            if len(self._subs) >= self.capacity:
                raise QueueFullError(
                    f"the server is full ({self.scheduler.config.max_batch_size} running + "
                    f"{self.scheduler.config.max_queue} queued requests); retry later"
                )
            if self._per_client[request.client] >= self.max_client_requests:
                raise QueueFullError(
                    f"this client already has {self.max_client_requests} requests in flight, the most one "
                    "client may have (--max-client-requests); retry when one has finished"
                )
            sub = Subscription(request, queue if queue is not None else asyncio.Queue(), loop)
            self._subs.add(sub)
            self._per_client[request.client] += 1
            self._inbox.append(sub)
            self._cond.notify()
        return sub

    def cancel(self, sub: Subscription) -> None:
        """Drop the request; its slot is freed at the next step (idempotent, any thread)."""
        with self._cond:
            if sub in self._subs:
                self._cancels.append(sub)
                self._cond.notify()

    def drain(self) -> None:
        """Refuse new requests from now on; in-flight ones continue."""
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -------------------------------------------------------------------- the loop thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            log.critical("the engine thread failed; failing every request in flight", exc_info=True)
            with self._cond:
                self.fatal = e
            self._fail_all(
                f"internal error: the engine stopped ({type(e).__name__}: {e})", FinishReason.ERROR
            )
            if self.on_fatal is not None:
                try:
                    self.on_fatal(e)
                except Exception:
                    log.exception("on_fatal failed")
            return
        # Stopping: whatever is left learns it will not be served.
        self._fail_all("the server stopped before this request finished", FinishReason.CANCELLED)

    def _serve(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and not self._inbox
                    and not self._cancels
                    and not scheduler.has_unfinished()
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for sub in inbox:
                try:
                    sub.handle = scheduler.add_request(sub.request, check_queue=False)
                except Exception as e:  # validated already; a race with limits, or a bug
                    self._finish(sub, _failure(sub, str(e), FinishReason.ERROR))
                    continue
                self._by_handle[sub.handle] = sub
            for sub in cancels:
                if sub.handle is not None:
                    scheduler.cancel(sub.handle)
            if not scheduler.has_unfinished():
                continue
            report = scheduler.step()  # a failing step fails its own requests and returns
            self._observe(self.on_step, report)
            for out in report.outputs:
                sub = self._by_handle.get(out.handle)
                if sub is None:
                    continue
                now = time.monotonic()
                self._observe(self.on_output, sub, out, now - sub.last_output_time)
                sub.last_output_time = now
                if out.finished:
                    del self._by_handle[out.handle]
                    self._finish(sub, out)
                else:
                    sub.deliver(out)

    def _observe(self, callback: Callable | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("an observer of the engine loop failed (the request goes on)")

    def _finish(self, sub: Subscription, out: RequestOutput) -> None:
        with self._cond:
            self._release(sub)
        sub.deliver(out)

    def _release(self, sub: Subscription) -> None:
        """With the lock held: `sub` is no longer in flight."""
        if sub in self._subs:
            self._subs.discard(sub)
            client = sub.request.client
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

    def _fail_all(self, message: str, reason: FinishReason) -> None:
        with self._cond:
            left = list(self._subs)
            for sub in left:
                self._release(sub)
            self._inbox.clear()
        self._by_handle.clear()
        for sub in left:
            sub.deliver(_failure(sub, message, reason))


def _failure(sub: Subscription, message: str, reason: FinishReason) -> RequestOutput:
    return RequestOutput(
        request_id=sub.request.request_id,
        handle=sub.handle if sub.handle is not None else -1,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason=reason,
        error=message,
        stats=SpecStats(),
        timing=Timing(arrival=sub.request.arrival_time, finished=time.monotonic()),
    )
