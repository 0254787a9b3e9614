"""The synchronous scheduler: slots and queues.

Each `step()` reaps cancelled requests, admits waiting ones into free slots, prefills the next
chunks of the admitted prompts (at most `EngineConfig.max_prefill_tokens` per step, so a long
prompt never stalls the running rows for long), asks the planner for every running row's γ, has
the runner run one step, commits the tokens it produced and finishes the rows that stopped. It
returns a `StepReport` - the outputs, the plan, the policy's decision and the passes' timings -
which metrics, the bench and tests read. A step that raises fails only the requests it was working
on (finished with an error naming it; their slots freed) and the scheduler serves the next one. It
knows nothing of threads or gRPC: the engine calls it in a loop, the server runs that loop in a
thread of its own.

A request's life: waiting (no slot) -> prefilling (a slot; its prompt going into the caches chunk
by chunk) -> running (decoding) -> finished. Requests are keyed by a handle of the scheduler's
own; a client's request_id is only a label.

Invariant between steps, for every running sequence: `tokens` holds prompt + committed output; the
target cache holds K/V for tokens[:target_len] (target_len = len(tokens) - 1: the last committed
token is the first input of the next pass); the draft cache holds tokens[:draft_len].
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from specdec.adaptive import Decision
from specdec.config import EngineConfig
from specdec.errors import QueueFullError
from specdec.planner import GammaPlanner, StepPlan
from specdec.request import ConstraintOutcome, FinishReason, Request, RequestOutput, Timing
from specdec.runner import ModelRunner
from specdec.sequence import Sequence
from specdec.speculative import RowOutcome
from specdec.stopping import OutputStopper
from specdec.timing import PassTiming
from specdec.tokenization import TokenPieces
from specdec.validation import RequestLimits, validate

log = logging.getLogger("specdec")


@dataclass(slots=True)
class StepReport:
    """What one `Scheduler.step` did."""

    outputs: list[RequestOutput]  # one per request that produced tokens or finished
    in_flight: int  # requests waiting, prefilling or running when the step began
    prefill_tokens: int = 0  # the prefill pass's size: rows x its widest chunk
    plan: StepPlan | None = None  # None when no row was running after admission
    timings: list[PassTiming] = field(default_factory=list)  # the decode passes
    seconds: float = 0.0  # the whole step, admission and prefill included

    @property
    def decision(self) -> Decision | None:
        return self.plan.decision if self.plan is not None else None

    @property
    def gammas(self) -> list[int]:
        """γ of every target-verified row this step."""
        return [p.gamma for p in self.plan.rows] if self.plan is not None else []


class Scheduler:
    def __init__(
        self, runner: ModelRunner, planner: GammaPlanner, limits: RequestLimits, config: EngineConfig
    ):
        self.runner = runner
        self.planner = planner
        self.limits = limits
        self.config = config
        # Token bytes for every request's detokenizer (one cache for the engine's tokenizer).
        self.pieces = TokenPieces(runner.tokenizer)
        # A min-heap: the lowest free slot first, so the running rows tend to hold one contiguous
        # range of slots, which the forward pass reads as a view instead of a gather.
        self.free_slots: list[int] = list(range(config.max_batch_size))
        # Waiting requests, first come first served within each client (insertion-ordered).
        self.waiting: dict[str, deque[Sequence]] = {}
        self.prefilling: list[Sequence] = []  # hold a slot; prompt not yet all in the caches
        self.running: list[Sequence] = []
        self._by_handle: dict[int, Sequence] = {}
        self._handles = itertools.count()
        self._admissions = itertools.count()
        self._last_admitted: dict[str, int] = {}  # client -> when it last got a slot (fairness)
        self._seeds = random.SystemRandom()

    # ----------------------------------------------------------------------------- requests

    def add_request(self, request: Request, check_queue: bool = True) -> int:
        """Validate and queue a request; return its handle. Raises InvalidRequestError /
        QueueFullError (in-process callers and the server, which do their own admission control,
        pass check_queue=False)."""
        mode = validate(request, self.limits)
        if check_queue and self.num_waiting >= self.config.max_queue:
            raise QueueFullError(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
        handle = next(self._handles)
        params = request.params
        seed = params.seed if params.seed is not None else self._seeds.randrange(2**63)
        stopper = OutputStopper(
            self.pieces,
            request.prompt_ids,
            () if params.ignore_eos else self.runner.eos_ids,
            params.stop_token_ids,
            params.stop,
            params.max_new_tokens,
            self.limits.max_context,
        )
        seq = Sequence(
            request=request,
            handle=handle,
            request_id=request.request_id or f"req-{handle}",
            mode=mode,
            slot=-1,
            seed=seed,
            stopper=stopper,
            tokens=list(request.prompt_ids),
            num_prompt=len(request.prompt_ids),
            timing=Timing(arrival=request.arrival_time),
            external_pending=list(request.external_draft or []),
        )
        if request.constraint is not None:  # compiled (or refused, naming the field) before queueing
            seq.grammar = self.runner.grammars().row(request.constraint)
        self.waiting.setdefault(request.client, deque()).append(seq)
        self._by_handle[handle] = seq
        return handle

    def cancel(self, handle: int) -> bool:
        """Mark a request cancelled; its slot is freed at the start of the next step."""
        seq = self._by_handle.get(handle)
        if seq is None:
            return False
        seq.cancelled = True
        return True

    def is_active(self, handle: int) -> bool:
        """Whether the request is still waiting, prefilling or running."""
        return handle in self._by_handle

    def has_unfinished(self) -> bool:
        return bool(self._by_handle)

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    # ----------------------------------------------------------------------------- the loop

    def step(self) -> StepReport:
        started = time.perf_counter()
        report = StepReport(outputs=[], in_flight=len(self._by_handle))
        self._reap_cancelled(report.outputs)
        self._admit()
        budget = self.config.max_prefill_tokens
        chunks = self._prefill_chunks(budget)
        if chunks:
            report.prefill_tokens = len(chunks) * max(n for _, n in chunks)
            rows = [s for s, _ in chunks]
            try:
                self.runner.prefill(chunks)
            except Exception as e:  # fails the rows being prefilled; the running rows go on
                self._fail_rows(rows, e, "prefilling", report.outputs)
        self._start_prefilled()
        if self.running:
            try:
                self._decode(report, external_budget=max(budget - report.prefill_tokens, 0))
            except Exception as e:  # fails the rows of this step; the scheduler goes on
                self._fail_rows(list(self.running), e, "decoding", report.outputs)
        report.seconds = time.perf_counter() - started
        return report

    def _reap_cancelled(self, outputs: list[RequestOutput]) -> None:
        for seq in [s for s in self._by_handle.values() if s.cancelled]:
            seq.finish_reason = FinishReason.CANCELLED
            outputs.append(self._finish(seq))

    def _admit(self) -> None:
        """Free slots to waiting requests, fairly across clients: next is the longest-waiting
        request of the client that holds the fewest slots, and among those the client served
        longest ago (round robin). First come, first served within a client - and among
        in-process requests, which all share one client."""
        now = time.monotonic()
        held = Counter(s.request.client for s in itertools.chain(self.running, self.prefilling))
        while self.waiting and self.free_slots:
            # Only each client's longest-waiting request is a candidate (handles grow with arrival).
            client = min(
                self.waiting,
                key=lambda c: (held[c], self._last_admitted.get(c, -1), self.waiting[c][0].handle),
            )
            queue = self.waiting[client]
            seq = queue.popleft()
            if not queue:
                del self.waiting[client]
            held[client] += 1
            self._last_admitted[client] = next(self._admissions)
            seq.slot = heapq.heappop(self.free_slots)
            seq.timing.admitted = now
            self.prefilling.append(seq)
        if len(self._last_admitted) > 4096:  # forget clients with nothing in flight (bounded memory)
            present = {s.request.client for s in self._by_handle.values()}
            self._last_admitted = {c: t for c, t in self._last_admitted.items() if c in present}

    def _prefill_chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """The next prompt chunk of each prefilling row, in admission order, within `budget`
        tokens of one padded pass (rows x its widest chunk): a row joins only if the rows before
        it keep their chunks, so one long prompt takes the budget alone and many short ones share
        it."""
        chunks: list[tuple[Sequence, int]] = []
        width = 0
        for seq in self.prefilling:
            left = seq.num_prompt - 1 - seq.prefilled
            if left <= 0:
                continue
            allowed = budget // (len(chunks) + 1)
            if allowed < max(width, 1):
                break
            n = min(left, allowed)
            chunks.append((seq, n))
            width = max(width, n)
        return chunks

    def _start_prefilled(self) -> None:
        """Rows whose prompt is in the caches start decoding (this very step)."""
        done = [s for s in self.prefilling if s.prefill_done]
        if done:
            self.prefilling = [s for s in self.prefilling if not s.prefill_done]
            self.running.extend(done)

    def _decode(self, report: StepReport, external_budget: int) -> None:
        """One speculative step for every running row (plain target and draft-only rows included)."""
        started = time.perf_counter()
        plan = self.planner.plan(self.running, external_budget)
        outcomes, timings = self.runner.decode(plan.rows, plan.draft_only)
        report.plan, report.timings = plan, timings
        externals = {id(p.seq): p.external for p in plan.rows}
        for outcome in outcomes:
            seq = outcome.seq
            if outcome.error is not None:
                self._fail(seq, outcome.error)
                report.outputs.append(self._finish(seq))
                continue
            external = externals.get(id(seq))
            self.planner.observe_acceptance(seq, outcome.gamma, outcome.accepted, external is not None)
            try:
                reason = commit(seq, outcome, external)
            except Exception as e:  # e.g. the tokenizer failing on this row's text: this row only
                self._fail_rows([seq], e, "committing its tokens", report.outputs)
                continue
            if seq.timing.first_token is None and outcome.tokens:
                seq.timing.first_token = time.monotonic()
            if reason is not None:
                seq.finish_reason = reason
                report.outputs.append(self._finish(seq))
            else:
                report.outputs.append(self._delta(seq, final=False))
        self.planner.observe_costs(plan, timings, time.perf_counter() - started)

    # ----------------------------------------------------------------------------- finish

    def _fail_rows(
        self, seqs: list[Sequence], error: Exception, phase: str, outputs: list[RequestOutput]
    ) -> None:
        """After an exception: finish `seqs` with the error (their slots freed) and log it once."""
        log.exception("engine step failed while %s; failing its %d request(s)", phase, len(seqs))
        message = f"internal error while {phase}: {type(error).__name__}: {error}"
        for seq in seqs:
            if seq.handle in self._by_handle:
                self._fail(seq, message)
                outputs.append(self._finish(seq))

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason = FinishReason.ERROR
        seq.error = (
            f"request {seq.request_id}: {message}; the request was stopped (other requests are unaffected)"
        )

    def _delta(self, seq: Sequence, final: bool) -> RequestOutput:
        """The request's output since the last one. Never raises: a final output must always be
        delivered, or its caller would wait for it forever."""
        new_ids = seq.output_ids[seq.reported :]
        seq.reported += len(new_ids)
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        try:
            text = seq.stopper.take_text(final)
        except Exception as e:  # the tokenizer cannot decode this row's tokens
            log.exception("request %s: its text could not be decoded", seq.request_id)
            text = ""
            if final and seq.error is None:
                self._fail(seq, f"internal error while decoding its text: {type(e).__name__}: {e}")
        return RequestOutput(
            request_id=seq.request_id,
            handle=seq.handle,
            new_token_ids=new_ids,
            new_text=text,
            new_logprobs=logprobs,
            finished=final,
            finish_reason=seq.finish_reason if final else None,
            error=seq.error if final else None,
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.output_ids),
            stats=seq.stats,
            timing=seq.timing,
            seed=seq.seed,
            mode=seq.mode,
            constraint=(
                # A stop string or stop token cut the text before the grammar's end: incomplete.
                ConstraintOutcome(
                    seq.grammar.complete and seq.finish_reason is not FinishReason.STOP,
                    seq.grammar.unenforced,
                )
                if final and seq.grammar is not None
                else None
            ),
        )

    def _finish(self, seq: Sequence) -> RequestOutput:
        seq.timing.finished = time.monotonic()
        waiting = self.waiting.get(seq.request.client, ())
        if seq in waiting:
            waiting.remove(seq)
            if not waiting:
                del self.waiting[seq.request.client]
        else:
            for queue in (self.running, self.prefilling):
                if seq in queue:
                    queue.remove(seq)
                    heapq.heappush(self.free_slots, seq.slot)
                    break
        self._by_handle.pop(seq.handle, None)
        return self._delta(seq, final=True)


def commit(seq: Sequence, outcome: RowOutcome, external: list[int] | None) -> FinishReason | None:
    """Append the emitted tokens (cut by the stop conditions), set both caches' lengths, and
    advance the row's external draft. Returns the finish reason if a stop condition fired."""
    before = len(seq.tokens)
    kept, reason = seq.stopper.consume(outcome.tokens)
    seq.tokens.extend(outcome.tokens[:kept])
    if seq.grammar is not None:
        # The grammar's stop tokens are the engine's end-of-sequence ids, which stop the row (a
        # constraint refuses ignore_eos), so a terminated grammar has finished the row already.
        seq.grammar.commit(outcome.tokens[:kept])
    if outcome.logprobs is not None:
        seq.pending_logprobs.extend(outcome.logprobs[:kept])
    seq.stats.record(outcome.gamma, outcome.accepted, outcome.accepted + 1)
    # The last committed token is not in the target cache: it is the next pass's first input.
    seq.target_len = len(seq.tokens) - 1
    if outcome.draft_fed is not None:
        seq.draft_len = before + min(outcome.draft_fed, kept)
    if external is not None:
        rest = seq.external_pending[len(external) :]
        fully_accepted = outcome.accepted == len(external)
        # After a full accept the target's bonus token stands where the next external token
        # would: the external draft goes on only if the two agree.
        if fully_accepted and rest and rest[0] == outcome.tokens[-1]:
            seq.external_pending = rest[1:]
        else:
            seq.external_pending = []
    elif seq.external_pending:
        # The row ran without its external draft this step (no budget left for it): the draft
        # stays aligned only if what was emitted is its next tokens, which verifying it would have
        # accepted anyway; otherwise it was going to be rejected there.
        emitted = outcome.tokens[:kept]
        if seq.external_pending[: len(emitted)] == emitted:
            seq.external_pending = seq.external_pending[len(emitted) :]
        else:
            seq.external_pending = []
    return reason
