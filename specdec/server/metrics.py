"""Prometheus metrics, served on their own HTTP port, and the per-request log line.

Speculative counters follow vLLM's spec-decode metrics (drafts, drafted tokens, accepted tokens,
accepted tokens per position): rates are derived from counters, never stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from specdec.request import FinishReason, Mode, RequestOutput

if TYPE_CHECKING:
    from specdec.router.router import RouteRecord
    from specdec.router.routes import Drift

request_log = logging.getLogger("specdec.requests")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "specdec_requests", "Finished requests by mode and final status", ["mode", "status"], registry=r
        )
        self.ttft = Histogram(
            "specdec_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "specdec_inter_token_latency_seconds",
            "Time between output tokens",
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "specdec_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY, registry=r
        )
        self.queue = Histogram(
            "specdec_queue_time_seconds", "Arrival to admission", buckets=_LATENCY, registry=r
        )
        self.running = Gauge("specdec_num_requests_running", "Requests holding a slot", registry=r)
        self.waiting = Gauge("specdec_num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.step_seconds = Histogram(
            "specdec_step_seconds", "Duration of one engine step", buckets=_TOKEN_LATENCY, registry=r
        )
        self.prompt_tokens = Counter(
            "specdec_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter("specdec_generation_tokens", "Generated tokens", registry=r)
        self.tokens_per_second = Gauge(
            "specdec_generation_tokens_per_second", "Generated tokens per second, smoothed", registry=r
        )
        self.spec_drafts = Counter(
            "specdec_spec_decode_num_drafts", "Verify passes that checked drafts", registry=r
        )
        self.spec_draft_tokens = Counter(
            "specdec_spec_decode_num_draft_tokens", "Drafted tokens verified", registry=r
        )
        self.spec_accepted = Counter(
            "specdec_spec_decode_num_accepted_tokens", "Drafted tokens accepted", registry=r
        )
        self.spec_accepted_pos = Counter(
            "specdec_spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafts by draft position",
            ["position"],
            registry=r,
        )
        self.gamma = Histogram(
            "specdec_spec_decode_gamma", "γ chosen per row per step", buckets=tuple(range(0, 17)), registry=r
        )
        # The router, per route (docs/ROUTING.md).
        self.route_requests = Counter(
            "specdec_route_requests", "Routed requests by route and the tier that answered", ["route", "tier"],
            registry=r,
        )  # fmt: skip
        self.route_escalations = Counter(
            "specdec_route_escalations",
            "Rules that fired, by route and rule",
            ["route", "reason"],
            registry=r,
        )
        self.route_confidence = Histogram(
            "specdec_route_confidence", "The primary's confidence (raw)", ["route"],
            buckets=tuple(i / 20 for i in range(1, 21)), registry=r,
        )  # fmt: skip
        self.route_schema = Counter(
            "specdec_route_schema_checks",
            "Answers checked against a json_schema",
            ["route", "valid"],
            registry=r,
        )
        self.route_tokens = Counter(
            "specdec_route_tokens", "Tokens each tier spent", ["route", "tier", "kind"], registry=r
        )
        self.route_fallbacks = Counter(
            "specdec_route_fallbacks",
            "Answers returned because every escalation failed",
            ["route"],
            registry=r,
        )
        self.route_failures = Counter(
            "specdec_route_failures",
            "Routed requests that failed, by route and status (an endpoint down: unavailable)",
            ["route", "code"],
            registry=r,
        )
        self.route_escalation_rate = Gauge(
            "specdec_route_escalation_rate", "Escalated share of the route's last window of requests", ["route"],
            registry=r,
        )  # fmt: skip
        self.route_escalation_baseline = Gauge(
            "specdec_route_escalation_baseline", "The escalation rate the window is compared with", ["route"],
            registry=r,
        )  # fmt: skip
        self.route_drift = Gauge(
            "specdec_route_drift", "1: the escalation rate left its baseline by more than the tolerance", ["route"],
            registry=r,
        )  # fmt: skip
        self.route_feedback = Counter(
            "specdec_route_feedback", "Feedback labels received, by route and the tier that answered", ["route", "tier"],
            registry=r,
        )  # fmt: skip
        self.route_quality = Gauge(
            "specdec_route_quality", "Mean quality (feedback, in [0, 1]) of the last 200 labelled answers",
            ["route", "tier"], registry=r,
        )  # fmt: skip
        self._qualities: dict[tuple[str, str], deque[float]] = {}
        self._windows: dict[str, _EscalationWindow] = {}
        self._route_lock = threading.Lock()
        self._rate = 0.0
        self._rate_time = time.monotonic()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_step(
        self, outputs: list[RequestOutput], seconds: float, running: int, waiting: int, gammas: list[int]
    ) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.step_seconds.observe(seconds)
        for g in gammas:
            self.gamma.observe(g)
        tokens = sum(len(out.new_token_ids) for out in outputs)
        now = time.monotonic()
        self.generation_tokens.inc(tokens)
        elapsed = now - self._rate_time
        if elapsed > 0:
            alpha = min(1.0, elapsed / 5.0)  # about a 5-second window
            self._rate = (1 - alpha) * self._rate + alpha * tokens / elapsed
            self.tokens_per_second.set(self._rate)
        self._rate_time = now

    def observe_tokens(self, n: int, interval: float) -> None:
        """n tokens delivered to one request `interval` seconds after its previous delivery: the
        tokens of one speculative step arrive together, so the interval is spread over them."""
        for _ in range(n):
            self.itl.observe(interval / n)

    def observe_finish(self, out: RequestOutput, mode: Mode, status: str) -> None:
        self.requests.labels(mode=mode.value, status=status).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        timing, stats = out.timing, out.stats
        if timing is not None:
            self.e2e.observe(timing.total_seconds)
            if timing.admitted is not None:
                self.queue.observe(timing.queue_seconds)
            if timing.first_token is not None:
                self.ttft.observe(timing.time_to_first_token_seconds)
        if stats is not None and stats.drafted_tokens:
            self.spec_drafts.inc(stats.verify_steps)
            self.spec_draft_tokens.inc(stats.drafted_tokens)
            self.spec_accepted.inc(stats.accepted_tokens)
            for position, count in enumerate(stats.accepted_by_position):
                self.spec_accepted_pos.labels(position=str(position)).inc(count)

    def observe_route(self, record: RouteRecord, drift: Drift) -> None:
        """One routed answer (router.RouteRecord) of a route with these drift settings (routes.Drift)."""
        route = record.route
        self.route_requests.labels(route=route, tier=record.tier).inc()
        for rule in record.fired:
            self.route_escalations.labels(route=route, reason=rule).inc()
        if record.confidence is not None:
            self.route_confidence.labels(route=route).observe(record.confidence)
        if record.schema_valid is not None:
            self.route_schema.labels(route=route, valid=str(record.schema_valid).lower()).inc()
        for spent in record.spent:
            self.route_tokens.labels(route=route, tier=spent.tier, kind="prompt").inc(spent.prompt_tokens)
            self.route_tokens.labels(route=route, tier=spent.tier, kind="completion").inc(
                spent.completion_tokens
            )
        if record.fallback:
            self.route_fallbacks.labels(route=route).inc()
        if record.overridden:
            # The caller chose the tier or the threshold: not the traffic's drift, so not in the window.
            return
        with self._route_lock:
            window = self._windows.setdefault(route, _EscalationWindow(drift.window, drift.baseline))
            rate, baseline = window.add(record.escalated)
        self.route_escalation_rate.labels(route=route).set(rate)
        if baseline is not None:
            self.route_escalation_baseline.labels(route=route).set(baseline)
            full = window.full
            self.route_drift.labels(route=route).set(float(full and abs(rate - baseline) > drift.tolerance))

    def observe_route_failure(self, route: str, code: str) -> None:
        """A routed request of a configured route that failed with this status (its name, lower case)."""
        self.route_failures.labels(route=route, code=code).inc()

    def observe_feedback(self, route: str, tier: str, quality: float) -> None:
        self.route_feedback.labels(route=route, tier=tier).inc()
        with self._route_lock:
            scores = self._qualities.setdefault((route, tier), deque(maxlen=200))
            scores.append(quality)
            mean = sum(scores) / len(scores)
        self.route_quality.labels(route=route, tier=tier).set(mean)


class _EscalationWindow:
    """The last `size` escalation flags of one route, and its baseline: given, or the rate of its
    first `size` requests (fixed once they are in)."""

    def __init__(self, size: int, baseline: float | None):
        self.flags: deque[bool] = deque(maxlen=size)
        self.baseline = baseline

    @property
    def full(self) -> bool:
        return len(self.flags) == self.flags.maxlen

    def add(self, escalated: bool) -> tuple[float, float | None]:
        self.flags.append(escalated)
        rate = sum(self.flags) / len(self.flags)
        if self.baseline is None and self.full:  # the first full window
            self.baseline = rate
        return rate, self.baseline


def status_of(out: RequestOutput) -> str:
    if out.finish_reason is FinishReason.ERROR:
        return "INTERNAL"
    if out.finish_reason is FinishReason.CANCELLED:
        return "CANCELLED"
    return "OK"


def log_request(out: RequestOutput, mode: Mode, status: str, client: str = "", user: str = "") -> None:
    """One structured line per finished request (`client`: an API key's digest prefix or a peer
    host, never a key; `user`: the end user the client named, if it did)."""
    stats, timing = out.stats, out.timing
    record = {
        "event": "request",
        "request_id": out.request_id,
        "client": client,
        **({"user": user} if user else {}),
        "mode": mode.value,
        "status": status,
        "finish_reason": out.finish_reason.value if out.finish_reason else None,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "seed": out.seed,
    }
    if timing is not None:
        record.update(
            queue_s=round(timing.queue_seconds, 4),
            ttft_s=round(timing.time_to_first_token_seconds, 4),
            total_s=round(timing.total_seconds, 4),
        )
    if stats is not None and stats.drafted_tokens:
        record.update(
            drafted=stats.drafted_tokens,
            accepted=stats.accepted_tokens,
            acceptance=round(stats.acceptance_rate, 4),
        )
    if out.error:
        record["error"] = out.error
    request_log.info(json.dumps(record))
