"""The engine's step loop in a thread of its own, talking to asyncio handlers through queues.

gRPC handlers run on an asyncio event loop that must never wait on torch. A handler `submit`s a
Request and gets a Subscription: an asyncio.Queue its RequestOutputs arrive on (pushed with
``loop.call_soon_threadsafe``). The loop thread takes new requests and cancellations between steps
(a thread-safe inbox), runs `scheduler.step()` while there is work, and sleeps on a condition
variable when there is none. Cancelling frees the row's slot at the next step.

Admission control is synchronous: a request is validated in the caller's thread against the
engine's frozen `RequestLimits` (the caller never touches the scheduler) and refused at once with QueueFullError when the server already holds
`max_batch_size + max_queue` requests; draining refuses everything with ShuttingDownError.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.errors import InvalidRequestError, QueueFullError, ShuttingDownError
from specdec.request import FinishReason, Request, RequestOutput, SpecStats, Timing
from specdec.scheduler import Scheduler, StepReport
from specdec.validation import RequestLimits, validate

log = logging.getLogger("specdec.server")


@dataclass(eq=False)
class Subscription:
    request_id: str
    request: Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    last_output_time: float = field(default_factory=time.monotonic)

    def deliver(self, item: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        limits: RequestLimits,
        on_step: Callable[[StepReport], None] | None = None,
        on_output: Callable[[Subscription, RequestOutput, float], None] | None = None,
    ):
        self.scheduler = scheduler  # touched only by the loop thread
        self.limits = limits
        self.on_step = on_step  # metrics: each step's report
        self.on_output = (
            on_output  # metrics and logs: each output, with seconds since the request's previous one
        )
        self.capacity = scheduler.config.max_batch_size + scheduler.config.max_queue
        self._inbox: list[Subscription] = []
        self._cancels: set[str] = set()
        self._subs: dict[str, Subscription] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)
        self._ids = 0

    # -------------------------------------------------------------------- handler side (any thread)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._subs)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Subscription:
        """Validate and enqueue; raises InvalidRequestError, QueueFullError or ShuttingDownError."""
        validate(request, self.limits)
        with self._cond:
            if self._draining or self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            if len(self._subs) >= self.capacity:
                raise QueueFullError(
                    f"the server is full ({self.scheduler.config.max_batch_size} running + "
                    f"{self.scheduler.config.max_queue} queued requests); retry later"
                )
            if not request.request_id:
                self._ids += 1
                request.request_id = f"req-{self._ids}"
            if request.request_id in self._subs:
                raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
            sub = Subscription(request.request_id, request, asyncio.Queue(), loop)
            self._subs[sub.request_id] = sub
            self._inbox.append(sub)
            self._cond.notify()
        return sub

    def cancel(self, request_id: str) -> None:
        """Drop the request; its slot is freed at the next step (idempotent, any thread)."""
        with self._cond:
            if request_id in self._subs:
                self._cancels.add(request_id)
                self._cond.notify()

    def drain(self) -> None:
        """Refuse new requests from now on; in-flight ones continue."""
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -------------------------------------------------------------------- the loop thread

    def _run(self) -> None:
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
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            for sub in inbox:
                try:
                    scheduler.add_request(sub.request, check_queue=False)
                except Exception as e:  # validated already; a race with limits, or a bug
                    self._fail(sub, e)
            for request_id in cancels:
                scheduler.cancel(request_id)
            if not scheduler.has_unfinished():
                continue
            try:
                report = scheduler.step()
            except Exception as e:  # a bug, not a request's bad numbers (those are flagged per row)
                log.error("engine step failed; failing every in-flight request:\n%s", traceback.format_exc())
                self._fail_all(e)
                continue
            if self.on_step is not None:
                self.on_step(report)
            for out in report.outputs:
                with self._cond:
                    sub = self._subs.get(out.request_id)
                    if sub is not None and out.finished:
                        del self._subs[out.request_id]
                if sub is None:
                    continue
                now = time.monotonic()
                if self.on_output is not None:
                    self.on_output(sub, out, now - sub.last_output_time)
                sub.deliver(out)
                sub.last_output_time = now
        # Stopping: whatever is left learns it will not be served.
        with self._cond:
            left = list(self._subs.values())
            self._subs.clear()
        for sub in left:
            sub.deliver(
                _failure(sub, "the server stopped before this request finished", FinishReason.CANCELLED)
            )

    def _fail(self, sub: Subscription, error: Exception) -> None:
        with self._cond:
            self._subs.pop(sub.request_id, None)
        sub.deliver(_failure(sub, str(error), FinishReason.ERROR))

    def _fail_all(self, error: Exception) -> None:
        """After an unexpected exception: reset the scheduler's rows and fail their requests."""
        scheduler = self.scheduler
        for seq in list(scheduler.running) + list(scheduler.waiting):
            scheduler.cancel(seq.request_id)
        try:
            scheduler.step()  # reaps the cancelled rows and frees their slots
        except Exception:
            log.exception("could not reap rows after a failed step")
        with self._cond:
            subs = list(self._subs.values())
            self._subs.clear()
        for sub in subs:
            sub.deliver(_failure(sub, f"internal error: {error}", FinishReason.ERROR))


def _failure(sub: Subscription, message: str, reason: FinishReason) -> RequestOutput:
    return RequestOutput(
        request_id=sub.request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason=reason,
        error=message,
        stats=SpecStats(),
        timing=Timing(arrival=sub.request.arrival_time, finished=time.monotonic()),
    )
