"""The SpecDec gRPC service: requests in, engine outputs out, errors mapped to status codes.

Handlers run on the asyncio loop and never wait on torch: tokenising runs in a worker thread, the
engine runs in its own (EngineLoop). A handler whose client cancels or whose deadline passes is
cancelled by grpc.aio; its `finally` tells the engine to drop the row, freeing the slot at the
next step.

`add_to_server` registers the handlers with deserializers that do not raise: a request that is not
valid protobuf (truncated, garbage, invalid UTF-8 in a string field) reaches its handler as
`Undecodable` and is refused with INVALID_ARGUMENT and a plain message, where grpc itself would
answer with a Python exception's text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from specdec.engine import Engine, merge_outputs
from specdec.errors import InvalidRequestError, PermissionDeniedError, SpecdecError
from specdec.request import FinishReason, GenerationResult, Request, RequestOutput
from specdec.router.feedback import ResponseLedger, quality
from specdec.router.router import Override, Router, RouteRecord
from specdec.router.routes import Drift
from specdec.router.tools import with_tools
from specdec.server import convert
from specdec.server.auth import ApiKeys
from specdec.server.engine_loop import EngineLoop, Subscription
from specdec.server.status import status_for
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

log = logging.getLogger("specdec.server")

SERVICE = pb.DESCRIPTOR.services_by_name["SpecDec"]


@dataclass(frozen=True)
class Undecodable:
    """What a request that did not parse is handed to its handler as."""

    message: str


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return Undecodable(
                f"the request is not a valid {message_class.DESCRIPTOR.full_name}: truncated or "
                "malformed protobuf, or a string field that is not valid UTF-8"
            )

    return parse


def _refusing_undecodable(method, streaming: bool):
    if streaming:

        @functools.wraps(method)
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in method(request, context):
                yield item

        return stream

    @functools.wraps(method)
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return unary


def add_to_server(servicer: SpecDecServicer, server: grpc.aio.Server) -> None:
    """Register every method of the SpecDec service (from its descriptor) on `server`."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _refusing_undecodable(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=_lenient(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def peer_host(peer: str) -> str:
    """The host part of grpc's peer string: "ipv4:10.0.0.7:53120" -> "ipv4:10.0.0.7",
    "ipv6:[::1]:53120" -> "ipv6:[::1]" (the port is per connection, not per client)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        address = address.rsplit(":", 1)[0]
    return f"{kind}:{address}"


class SpecDecServicer(pb_grpc.SpecDecServicer):
    def __init__(
        self,
        engine: Engine,
        loop: EngineLoop,
        keys: ApiKeys | None = None,
        router: Router | None = None,
        on_routed: Callable[[RouteRecord, Drift], None] | None = None,
        on_feedback: Callable[[str, str, float], None] | None = None,
        on_route_failed: Callable[[str, str], None] | None = None,
    ):
        self.engine = engine
        self.engine_loop = loop
        self.keys = keys
        self.router = router  # None: no --routes; a request naming a route is refused
        self.on_routed = on_routed  # metrics: each routed answer's record
        self.on_feedback = on_feedback  # metrics: (route, tier, quality) of each label
        self.on_route_failed = on_route_failed  # metrics: (route, status) of each failed routed request
        self.ledger = ResponseLedger()  # routed responses that may get feedback, and whose they are

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling, for per-client limits and fair admission: the API key (the interceptor
        let only valid ones through), or without keys the peer's host."""
        if self.keys is not None:
            client = self.keys.client_of(context.invocation_metadata())
            if client is not None:
                return client
        return peer_host(context.peer() or "unknown")

    async def _submit(self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Subscription:
        try:
            # Text that cannot fit is refused here, at once; only text that may fit goes to a
            # worker thread to be tokenized (the event loop never waits on a tokenizer).
            convert.check_text_fits(self.engine, msg)
            ids = await asyncio.to_thread(convert.prompt_ids, self.engine, msg)
            request = convert.request_from_proto(self.engine, msg, ids)
            request.client = self._client(context)
            return self.engine_loop.submit(request, asyncio.get_running_loop())
        except SpecdecError as e:
            await context.abort(status_for(e), str(e))
            raise  # unreachable: abort raises

    async def _outputs(self, sub: Subscription, context: grpc.aio.ServicerContext):
        """The request's outputs until the last one; a failed request aborts with its status."""
        try:
            while True:
                out: RequestOutput = await sub.queue.get()
                if out.finished and out.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error or "internal error")
                if out.finished and out.finish_reason is FinishReason.CANCELLED:
                    # This client did not cancel (its handler would be gone): the server did, and
                    # a request it stopped is never reported as a success.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, out.error or "the server cancelled this request"
                    )
                yield out
                if out.finished:
                    return
        finally:
            # Client gone, deadline passed, or done: in the first two cases the row is still
            # running; cancelling a finished request is a no-op.
            self.engine_loop.cancel(sub)

    async def _routed(
        self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        """A request naming a route: the router answers, each local tier's request through the
        engine loop like any other (same queue, same per-client limit, cancelled with the call)."""
        client = self._client(context)
        loop = asyncio.get_running_loop()

        async def run(request: Request) -> GenerationResult:
            request.client = client
            request.request_id = msg.request_id
            sub = self.engine_loop.submit(request, loop)
            return merge_outputs([out async for out in self._outputs(sub, context)])

        try:
            if self.router is None:
                raise InvalidRequestError(
                    "route", "this server serves no routes (start it with --routes FILE)"
                )
            fields = convert.routed_fields(msg, self.router.schemas)
            self._check_grants(fields.override, client)
            convert.check_text_fits(self.engine, msg)
            ids = await asyncio.to_thread(self.engine.render_chat, with_tools(fields.messages, fields.tools))
            params = convert.request_from_proto(self.engine, msg, ids).params
            routed = await self.router.agenerate(
                msg.route, fields.messages, params, fields.json_schema, run,
                prompt=ids, tools=fields.tools, override=fields.override,
            )  # fmt: skip
        except SpecdecError as e:
            code = status_for(e)
            self._route_failed(msg.route, code)
            await context.abort(code, str(e))
            raise  # unreachable: abort raises
        except (
            Exception
        ):  # a tier's request aborted the call already (its row failed, or the server stopped it)
            code = context.code()
            self._route_failed(
                msg.route, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL
            )
            raise
        if self.on_routed is not None:
            self.on_routed(routed.record, self.router.route(msg.route).drift)
        response = convert.routed_response(self.engine.tokenizer, routed, msg)
        response.route.response_id = self.ledger.issue(client, routed.record.route, routed.record.tier)
        return response

    def _route_failed(self, route: str, code: grpc.StatusCode) -> None:
        # Only a configured route is a label: a client's made-up name must not grow the metrics.
        if (
            self.on_route_failed is not None
            and self.router is not None
            and route in self.router.config.routes
        ):
            self.on_route_failed(route, code.name.lower())

    def _check_grants(self, override: Override, client: str) -> None:
        """A request's route_override needs its API key granted what it overrides."""
        needed = [grant for grant, asked in (
            ("route:force", override.tier is not None),
            ("route:threshold", override.confidence_below is not None),
        ) if asked]  # fmt: skip
        if not needed:
            return
        if self.keys is None:
            raise PermissionDeniedError(
                "route_override",
                f"needs an API key granted {needed[0]}; this server has no --api-key-file",
            )
        missing = [g for g in needed if g not in self.keys.grants(client)]
        if missing:
            raise PermissionDeniedError(
                "route_override", f"this API key is not granted {missing[0]} (the key file grants it)"
            )

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        try:
            score = quality(
                request.score if request.HasField("score") else None,
                request.correct if request.HasField("correct") else None,
            )
            answered = self.ledger.take(request.response_id, self._client(context))
        except SpecdecError as e:
            await context.abort(status_for(e), str(e))
            raise  # unreachable: abort raises
        if self.on_feedback is not None:
            self.on_feedback(answered.route, answered.tier, score)
        return pb.FeedbackResponse()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        if convert.is_routed(request):
            return await self._routed(request, context)
        sub = await self._submit(request, context)
        outputs = [out async for out in self._outputs(sub, context)]
        return convert.merged_response(self.engine.tokenizer, outputs)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if convert.is_routed(request):
            # A routed answer is known only once its tier is decided: the stream is that answer,
            # in one message, when it is (docs/ROUTING.md).
            yield await self._routed(request, context)
            return
        sub = await self._submit(request, context)
        async for out in self._outputs(sub, context):
            if out.new_token_ids or out.new_text or out.finished:
                yield convert.response_from_output(self.engine.tokenizer, out)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return convert.model_info(self.engine)
