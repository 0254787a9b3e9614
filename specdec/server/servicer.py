"""The SpecDec gRPC service: requests in, engine outputs out, errors mapped to status codes.

Handlers run on the asyncio loop and never wait on torch: tokenising runs in a worker thread, the
engine runs in its own (EngineLoop). A handler whose client cancels or whose deadline passes is
cancelled by grpc.aio; its `finally` tells the engine to drop the row, freeing the slot at the
next step.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from specdec.engine import Engine
from specdec.errors import SpecdecError
from specdec.request import FinishReason, RequestOutput
from specdec.server import convert
from specdec.server.engine_loop import EngineLoop, Subscription
from specdec.server.status import status_for
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

log = logging.getLogger("specdec.server")


class SpecDecServicer(pb_grpc.SpecDecServicer):
    def __init__(self, engine: Engine, loop: EngineLoop):
        self.engine = engine
        self.engine_loop = loop

    async def _submit(self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Subscription:
        try:
            ids = await asyncio.to_thread(convert.prompt_ids, self.engine, msg)
            request = convert.request_from_proto(self.engine, msg, ids)
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

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        sub = await self._submit(request, context)
        outputs = [out async for out in self._outputs(sub, context)]
        return convert.merged_response(self.engine.tokenizer, outputs)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        sub = await self._submit(request, context)
        async for out in self._outputs(sub, context):
            if out.new_token_ids or out.new_text or out.finished:
                yield convert.response_from_output(self.engine.tokenizer, out)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return convert.model_info(self.engine)
