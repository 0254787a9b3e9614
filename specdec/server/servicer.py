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
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from specdec.engine import Engine, merge_outputs
from specdec.errors import SpecdecError
from specdec.request import FinishReason, GenerationResult, Request, RequestOutput
from specdec.server import convert
from specdec.server.auth import ApiKeys
from specdec.server.engine_loop import EngineLoop, Subscription
from specdec.server.routed import RoutedService
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
    def __init__(self, engine: Engine, loop: EngineLoop, keys: ApiKeys | None, routed: RoutedService):
        self.engine = engine
        self.engine_loop = loop
        self.keys = keys
        self.routed = routed  # routed requests and their feedback (shared with the HTTP API)

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
            if request.constraint is not None:  # compiled off the event loop (then cached)
                await asyncio.to_thread(self.engine.check_constraint, request.constraint)
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
        """A request naming a route: the router answers (`routed.RoutedService`), each local tier's
        request through the engine loop like any other (same queue, same per-client limit,
        cancelled with the call)."""
        client = self._client(context)
        loop = asyncio.get_running_loop()

        async def run(request: Request) -> GenerationResult:
            request.client = client
            request.request_id = msg.request_id
            sub = self.engine_loop.submit(request, loop)
            return merge_outputs([out async for out in self._outputs(sub, context)])

        try:
            fields = convert.routed_fields(msg, self.routed.schemas)
            convert.check_text_fits(self.engine, msg)
            ids = await self.routed.prompt(fields, client)
            params = convert.request_from_proto(self.engine, msg, ids).params
            routed, response_id = await self.routed.answer(fields, ids, params, client, run)
        except SpecdecError as e:
            code = status_for(e)
            self.routed.failed(msg.route, code.name.lower())
            await context.abort(code, str(e))
            raise  # unreachable: abort raises
        except Exception:
            # A tier's request aborted the call already: its row failed, or the server stopped it.
            code = context.code()
            self.routed.failed(
                msg.route,
                (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL).name.lower(),
            )
            raise
        response = convert.routed_response(self.engine.tokenizer, routed, msg)
        response.route.response_id = response_id
        return response

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        try:
            self.routed.feedback(
                request.response_id,
                request.score if request.HasField("score") else None,
                request.correct if request.HasField("correct") else None,
                self._client(context),
            )
        except SpecdecError as e:
            await context.abort(status_for(e), str(e))
            raise  # unreachable: abort raises
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
