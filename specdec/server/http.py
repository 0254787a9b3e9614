"""The OpenAI-compatible HTTP API: Starlette handlers on uvicorn, beside gRPC, on the same engine.

    GET  /health                liveness and readiness (200 serving, 503 draining or failed)
    GET  /v1/models             the served model ids (openai_protocol.ServedModels)
    POST /v1/completions        text completion, unary or server-sent events
    POST /v1/chat/completions   chat completion (the checkpoint's chat template), unary or SSE

It runs in the same event loop as the gRPC server and submits to the same EngineLoop, so both
protocols share the models, the queue, the per-client limits, the metrics and the drain; an HTTP
client and a gRPC client from one host (without API keys) are one client. API keys are gRPC's:
`Authorization: Bearer KEY` on every route but /health; with no keys configured the header (the
`openai` client always sends one) is ignored. Errors are OpenAI's error object with the status code
of `status.http_status_for`.

A client that goes away stops its rows: a stream's generator is closed when a send fails or the
disconnect arrives (Starlette), and a unary handler races its outputs against the disconnect
message; either way the requests are cancelled and their slots freed at the next step.

uvicorn's own signal handling is switched off (`_Uvicorn`): SIGTERM belongs to `serve()`, which
drains both protocols and only then stops this server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from specdec.engine import Engine, merge_outputs
from specdec.errors import InvalidRequestError, ShuttingDownError, SpecdecError
from specdec.request import FinishReason, GenerationResult, Request, RequestOutput
from specdec.router.router import Override
from specdec.router.tools import Tool, calls_in, check_calls, parse_tools, with_tools
from specdec.server import openai_protocol as oa
from specdec.server.auth import UNAUTHENTICATED_MESSAGE, ApiKeys
from specdec.server.engine_loop import EngineLoop, Subscription
from specdec.server.routed import RoutedFields, RoutedService
from specdec.server.status import http_error_for, status_for
from specdec.validation import check_prompt_chars, validate

log = logging.getLogger("specdec.server")


class _ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


class _HttpError(Exception):
    def __init__(
        self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


class OpenAIApp:
    """The ASGI application (`self.app`) and its handlers."""

    def __init__(
        self,
        engine: Engine,
        engine_loop: EngineLoop,
        keys: ApiKeys | None,
        max_body_bytes: int,
        served_name: str | None = None,
        routed: RoutedService | None = None,
    ):
        self.engine = engine
        self.engine_loop = engine_loop
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.routed = routed or RoutedService(engine, None, keys)  # None: no routes are served
        self.models = oa.ServedModels.of(engine, served_name)
        self.pieces = engine.scheduler.pieces  # the detokenizer's token bytes: one cache
        self.created = oa.now()
        # Streams whose response is still being written: their rows may have finished (the engine
        # loop no longer counts them) while events wait to be sent; the drain waits for these too.
        self.open_streams = 0
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ------------------------------------------------------------------------- routes

    async def health(self, request: Any) -> Any:
        state = self.engine_loop.state
        return JSONResponse({"status": state}, status_code=200 if state == "serving" else 503)

    async def list_models(self, request: Any) -> Any:
        return await self._handle(request, lambda client: self._json(self.models.listing(self.created)))

    async def get_model(self, request: Any) -> Any:
        async def one(client: str) -> Any:
            model = request.path_params["model"]
            self.models.mode_of(model)  # ModelNotFoundError -> 404
            return self._json(
                {"id": model, "object": "model", "created": self.created, "owned_by": "specdec"}
            )

        return await self._handle(request, one)

    async def completions(self, request: Any) -> Any:
        return await self._handle(request, lambda client: self._generate(request, client, chat=False))

    async def chat_completions(self, request: Any) -> Any:
        return await self._handle(request, lambda client: self._generate(request, client, chat=True))

    # ------------------------------------------------------------------------- plumbing

    async def _handle(self, request: Any, handler: Any) -> Any:
        try:
            client = self._authorize(request)
            result = handler(client)
            return await result if asyncio.iscoroutine(result) else result
        except _HttpError as e:
            return _error_response(e.status, e.kind, str(e), e.param, e.code)
        except SpecdecError as e:
            status, kind, code = http_error_for(e)
            param = getattr(e, "field", None)  # the field an InvalidRequest- or PermissionDeniedError names
            return _error_response(status, kind, str(e), param, code)
        except ClientDisconnect:  # gone while sending its body: nobody reads an answer
            return _error_response(499, "invalid_request_error", "client disconnected")
        except Exception:  # a bug: this request fails, the server goes on
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return _error_response(500, "server_error", "internal error (logged on the server)")

    def _authorize(self, request: Any) -> str:
        """The client (API key digest, or without keys the peer host, as gRPC names it)."""
        if self.keys is not None:
            client = self.keys.client_of([("authorization", request.headers.get("authorization", ""))])
            if client is None:
                raise _HttpError(401, "authentication_error", UNAUTHENTICATED_MESSAGE, code="invalid_api_key")
            return client
        host = request.client.host if request.client else "unknown"
        return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"

    async def _body(self, request: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _HttpError(413, "invalid_request_error", self._too_large(int(declared)))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _HttpError(413, "invalid_request_error", self._too_large(size))
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequestError("body", f"not valid JSON ({e})") from None
        except RecursionError:
            raise InvalidRequestError("body", "JSON nested too deeply") from None

    def _too_large(self, size: int) -> str:
        return f"body: {size} bytes, more than the {self.max_body_bytes} this server accepts"

    @staticmethod
    def _json(body: Any, status: int = 200) -> Any:
        return JSONResponse(body, status_code=status)

    async def _not_found(self, request: Any, exc: Exception) -> Any:
        return _error_response(404, "invalid_request_error", f"no route {request.url.path}", code="not_found")

    async def _not_allowed(self, request: Any, exc: Exception) -> Any:
        return _error_response(
            405, "invalid_request_error", f"{request.method} is not allowed on {request.url.path}"
        )

    # ------------------------------------------------------------------------- generation

    async def _generate(self, request: Any, client: str, chat: bool) -> Any:
        if self.engine_loop.state != "serving":  # before reading and tokenizing what is refused anyway
            raise ShuttingDownError(f"the server is {self.engine_loop.state} and takes no new requests")
        body = await self._body(request)
        parsed = oa.parse_chat(body, self.models) if chat else oa.parse_completion(body, self.models)
        rid, created = oa.new_id(chat), oa.now()
        try:
            tools = parse_tools(parsed.tools, self.routed.schemas)
        except InvalidRequestError as e:
            raise oa.tool_field(e) from None
        if parsed.route:
            return await self._routed(request, parsed, tools, client, rid, created)
        try:
            prompts = await asyncio.to_thread(self._prompt_ids, parsed, tools)
            prediction = await asyncio.to_thread(self._prediction_ids, parsed)
            if parsed.constraint is not None:  # compiled off the event loop (then cached)
                await asyncio.to_thread(self.engine.check_constraint, parsed.constraint)
            subs, queue, index_of = self._submit(parsed, prompts, prediction, client, rid)
        except InvalidRequestError as e:
            raise parsed.wire_field(e) from None
        prompt_tokens = sum(len(p) for p in prompts)
        if parsed.stream:
            events = self._events(parsed, subs, queue, index_of, rid, created, prompt_tokens)
            self.open_streams += 1

            def closed() -> None:
                self.open_streams -= 1
                self._cancel(subs)

            return _EventStream(events, closed)
        try:
            choices = await self._collect(request, subs, queue, index_of)
        except _ClientGone:
            return self._json({}, status=499)  # nobody reads it
        failed = next(
            (c.last for c in choices if c.last and c.last.finish_reason is FinishReason.ERROR), None
        )
        if failed is not None:
            raise _HttpError(500, "server_error", failed.error or "internal error")
        cancelled = next(
            (c.last for c in choices if c.last and c.last.finish_reason is FinishReason.CANCELLED), None
        )
        if cancelled is not None:
            raise _HttpError(
                503, "service_unavailable", cancelled.error or "the server cancelled this request"
            )
        want_logprobs = parsed.logprobs is not None
        calls = None
        if tools:
            calls = {c.index: check_calls(calls_in(c.text), tools, self.routed.schemas) for c in choices}
        body = oa.response_body(
            chat, rid, created, parsed.model, choices, prompt_tokens, self.pieces, want_logprobs, calls
        )
        return self._json(body)

    async def _routed(
        self,
        request: Any,
        parsed: oa.ParsedRequest,
        tools: tuple[Tool, ...],
        client: str,
        rid: str,
        created: int,
    ) -> Any:
        """A chat naming a route: the router answers (`routed.RoutedService`, as over gRPC), each
        local tier's request through the engine loop like any other; a client that leaves cancels
        the tier running. A stream is the answer in one chunk, once its tier is decided."""
        fields = RoutedFields(
            parsed.route,
            parsed.messages,
            parsed.json_schema,
            tools,
            Override(*parsed.override),
            parsed.endpoint_messages,
            parsed.constraint,
        )
        loop = asyncio.get_running_loop()

        async def run(tier_request: Request) -> GenerationResult:
            tier_request.client, tier_request.request_id, tier_request.user = client, rid, parsed.user
            queue: asyncio.Queue = asyncio.Queue()
            sub = self.engine_loop.submit(tier_request, loop, queue)
            outputs: list[RequestOutput] = []
            try:
                while not outputs or not outputs[-1].finished:
                    outputs.append(await queue.get())
            finally:
                self.engine_loop.cancel(sub)
            return merge_outputs(outputs)

        try:
            try:
                prompt = await self.routed.prompt(fields, client)
                params = dataclasses.replace(
                    parsed.params, max_new_tokens=parsed.max_tokens_for(len(prompt), self.engine.max_context)
                )
                answering = asyncio.ensure_future(self.routed.answer(fields, prompt, params, client, run))
            except InvalidRequestError as e:
                raise parsed.wire_field(e) from None
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                done, _ = await asyncio.wait({answering, gone}, return_when=asyncio.FIRST_COMPLETED)
                if answering not in done:
                    answering.cancel()
                    return self._json({}, status=499)  # nobody reads it
                try:
                    routed, response_id = answering.result()
                except InvalidRequestError as e:  # a tier's request refused (max_tokens past the room, ...)
                    raise parsed.wire_field(e) from None
            finally:
                gone.cancel()
        except SpecdecError as e:
            self.routed.failed(parsed.route, status_for(e).name.lower())
            raise
        body = oa.routed_body(
            rid, created, parsed.model, routed, response_id, self.pieces, parsed.logprobs is not None
        )
        if not parsed.stream:
            return self._json(body)
        return _EventStream(_routed_events(body, parsed.include_usage), lambda: None)

    def _prompt_ids(self, parsed: oa.ParsedRequest, tools: tuple[Tool, ...] = ()) -> list[list[int]]:
        """Token ids of each prompt (a worker thread: the event loop never waits on a tokenizer)."""
        if parsed.chat:
            return [self.engine.render_chat(with_tools(parsed.messages, tools))]
        out = []
        for i, prompt in enumerate(parsed.prompts):
            if isinstance(prompt, str):
                check_prompt_chars(
                    len(prompt), self.engine.limits, f"prompt[{i}]" if len(parsed.prompts) > 1 else "prompt"
                )
                out.append(self.engine.encode(prompt))
            else:
                out.append(prompt)
        return out

    def _prediction_ids(self, parsed: oa.ParsedRequest) -> list[int] | None:
        if parsed.prediction is None:
            return None
        check_prompt_chars(len(parsed.prediction), self.engine.limits, "prediction")
        return list(self.engine.tokenizer.encode(parsed.prediction, add_special_tokens=False)) or None

    def _submit(
        self,
        parsed: oa.ParsedRequest,
        prompts: list[list[int]],
        prediction: list[int] | None,
        client: str,
        rid: str,
    ) -> tuple[list[Subscription], asyncio.Queue, dict[str, int]]:
        """One Request per choice (prompt x n), all checked before any is submitted, and all
        submitted or none (a full server refusing one cancels the ones already in). Choice i's
        request_id is `rid-i`: the response's id, in the request log."""
        loop = asyncio.get_running_loop()
        cap = min(self.engine_loop.capacity, self.engine_loop.max_client_requests)
        if len(prompts) * parsed.n > cap:
            # Never a 429: retrying could not help.
            raise InvalidRequestError(
                "n", f"{len(prompts)} prompt(s) x n = {parsed.n} is {len(prompts) * parsed.n} rows, more than "
                f"the {cap} this server lets one client have in flight",
            )  # fmt: skip
        requests = []
        for p, ids in enumerate(prompts):
            params = dataclasses.replace(
                parsed.params, max_new_tokens=parsed.max_tokens_for(len(ids), self.engine.max_context)
            )
            for j in range(parsed.n):
                request = Request(
                    prompt_ids=ids,
                    params=dataclasses.replace(params, seed=oa.choice_seed(params.seed, j)),
                    mode=parsed.mode,
                    num_speculative_tokens=parsed.num_speculative_tokens,
                    request_id=f"{rid}-{p * parsed.n + j}",
                    external_draft=list(prediction) if prediction else None,
                    client=client,
                    user=parsed.user,
                    constraint=parsed.constraint,
                )
                validate(request, self.engine.limits)
                requests.append(request)
        queue: asyncio.Queue = asyncio.Queue()
        subs: list[Subscription] = []
        try:
            for request in requests:
                subs.append(self.engine_loop.submit(request, loop, queue))
        except BaseException:
            self._cancel(subs)
            raise
        index_of = {request.request_id: i for i, request in enumerate(requests)}
        return subs, queue, index_of

    def _cancel(self, subs: list[Subscription]) -> None:
        """Stop these rows (a no-op for finished ones): their slots free at the next step."""
        for sub in subs:
            self.engine_loop.cancel(sub)

    async def _collect(
        self, request: Any, subs: list[Subscription], queue: asyncio.Queue, index_of: dict[str, int]
    ) -> list[oa.Choice]:
        """Every choice's whole output; _ClientGone (and the rows cancelled) if the client leaves."""
        choices = {i: oa.Choice(i) for i in index_of.values()}
        left = len(subs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while left:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise _ClientGone
                out: RequestOutput = get.result()
                choices[index_of[out.request_id]].add(out)
                left -= out.finished
        finally:
            gone.cancel()
            self._cancel(subs)
        return [choices[i] for i in sorted(choices)]

    async def _events(
        self,
        parsed: oa.ParsedRequest,
        subs: list[Subscription],
        queue: asyncio.Queue,
        index_of: dict[str, int],
        rid: str,
        created: int,
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        """The server-sent events of a stream: chunks as the engine emits, then usage (if asked)
        and `data: [DONE]`. A client that leaves closes it early (_EventStream cancels the rows)."""
        chat, model = parsed.chat, parsed.model
        extra = {"usage": None} if parsed.include_usage else {}
        offsets = dict.fromkeys(index_of.values(), 0)  # completions' text_offset per choice
        completion_tokens, left = 0, len(subs)
        if chat:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in sorted(offsets)]  # fmt: skip
            yield _sse(oa.stream_chunk(True, rid, created, model, first, **extra))
        while left:
            out: RequestOutput = await queue.get()
            index = index_of[out.request_id]
            left -= out.finished
            completion_tokens += len(out.new_token_ids)
            if out.finished and out.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                failed = out.finish_reason is FinishReason.ERROR
                status, kind = (500, "server_error") if failed else (503, "service_unavailable")
                yield _sse({"error": _error_object(status, out.error or "request failed", None, None, kind)})
                break
            if out.new_token_ids or out.new_text:
                yield _sse(
                    oa.stream_chunk(
                        chat, rid, created, model, [self._delta(parsed, out, index, offsets)], **extra
                    )
                )
            if out.finished:
                end = {
                    "index": index,
                    "logprobs": None,
                    "finish_reason": oa.finish_reason(out.finish_reason),
                }
                end.update({"delta": {}} if chat else {"text": ""})
                yield _sse(oa.stream_chunk(chat, rid, created, model, [end], **extra,
                                           specdec={"choices": [oa.specdec_extra(index, out)]}))  # fmt: skip
        else:
            if parsed.include_usage:
                yield _sse(
                    oa.stream_chunk(
                        chat, rid, created, model, [], usage=oa.usage(prompt_tokens, completion_tokens)
                    )
                )
        yield "data: [DONE]\n\n"

    def _delta(
        self, parsed: oa.ParsedRequest, out: RequestOutput, index: int, offsets: dict[int, int]
    ) -> dict[str, Any]:
        want = parsed.logprobs is not None
        if parsed.chat:
            logprobs = {"content": oa.chat_logprobs(self.pieces, out.new_logprobs)} if want else None
            return {
                "index": index,
                "delta": {"content": out.new_text},
                "logprobs": logprobs,
                "finish_reason": None,
            }
        logprobs = None
        if want:
            logprobs = oa.completion_logprobs(self.pieces, out.new_logprobs, offsets[index])
            # text_offset counts token texts, as the unary response's does.
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        return {"index": index, "text": out.new_text, "logprobs": logprobs, "finish_reason": None}


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends: finished, the client gone
    (Starlette cancels the send), or cancelled before the first event (when the events' generator
    never started, so no `finally` of its own would run)."""

    def __init__(self, events: AsyncIterator[str], on_close: Any):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _routed_events(body: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """A routed stream: the whole answer (`oa.routed_body`) as chunks - role and content, the
    finish with the route record, usage if asked - then [DONE]."""
    [choice] = body["choices"]
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return oa.stream_chunk(True, body["id"], body["created"], body["model"], choices, **more)

    delta = {k: v for k, v in choice["message"].items() if v is not None}
    if "tool_calls" in delta:  # a stream's tool calls carry their index (OpenAI's chunk schema)
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
    yield _sse(
        chunk([{"index": 0, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}], **extra)
    )
    end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
    yield _sse(chunk([end], **extra, specdec=body["specdec"]))
    if include_usage:
        yield _sse(chunk([], usage=body["usage"]))
    yield "data: [DONE]\n\n"


async def _disconnected(request: Any) -> None:
    """Returns when the client has disconnected (the body has been read, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _error_object(
    status: int, message: str, param: str | None, code: str | None, kind: str | None = None
) -> dict[str, Any]:
    return {
        "message": message,
        "type": kind or "server_error",
        "param": param,
        "code": code if code is not None else status,
    }


def _error_response(
    status: int, kind: str, message: str, param: str | None = None, code: str | None = None
) -> Any:
    # Full or draining: clients that honour Retry-After (the openai package does) back off a second.
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(
        {"error": _error_object(status, message, param, code, kind)}, status_code=status, headers=headers
    )


# ----------------------------------------------------------------------------- the server


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: `serve()` owns SIGTERM and SIGINT (it drains gRPC and
    HTTP together, then stops this server)."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind the HTTP API to {host}:{port}: {e.strerror}") from None
    return sock


class HttpServer:
    """uvicorn serving an OpenAIApp in the running event loop."""

    def __init__(
        self,
        app: OpenAIApp,
        host: str,
        port: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
    ):
        options: dict[str, Any] = {}
        if tls_cert is not None:
            options.update(ssl_certfile=str(tls_cert), ssl_keyfile=str(tls_key))
            if tls_client_ca is not None:
                options.update(ssl_ca_certs=str(tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app.app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,  # specdec's logging stands
            timeout_graceful_shutdown=2,  # serve() has let in-flight requests finish already
            **options,
        )
        self.app = app
        self.server = _Uvicorn(config)
        self.host, self.port = host, port
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; return the bound port. The socket is bound here, not by uvicorn, which exits the
        process (SystemExit) when it cannot bind: a taken port must be an OSError naming it."""
        sock = _bind(self.host, self.port)
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP API on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
