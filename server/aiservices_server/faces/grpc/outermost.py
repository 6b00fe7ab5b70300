"""The outermost interceptor: the first and the last thing every ToolService call meets.

It runs the call inside the shared envelope (request id, drain, timing, metrics, access line)
and owns the one mapping from domain errors to gRPC status, details and trailers. An exception
no rule covers (a failing limiter store, a bug, a response that does not serialize) becomes
INTERNAL with a support id, never UNKNOWN with the exception's text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiservices.v1 import tool_service_pb2 as pb
from aiservices_server.core.headers import REQUEST_ID_HEADER, Headers
from aiservices_server.errors import ServiceError
from aiservices_server.faces.envelope import Envelope
from aiservices_server.faces.grpc.rpc import GrpcContext, Handler, Rpc
from aiservices_server.faces.grpc.status import to_grpc_status

GrpcHandler = Callable[[Any, GrpcContext], Awaitable[bytes]]
"""What grpc.aio runs for a unary method: the request and grpc's context in, response bytes
out (serialized here, so a response that does not serialize is an error seen here too)."""


def headers_of(context: GrpcContext) -> Headers:
    """The call's text metadata (binary `-bin` values are no headers the core reads), with
    the names sent more than once."""
    pairs = context.invocation_metadata() or ()
    return Headers.from_pairs((name, value) for name, value in pairs if isinstance(value, str))


def _expired(context: GrpcContext) -> bool:
    """Whether the caller's deadline has passed (never, when it set none)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class OutermostInterceptor:
    def __init__(self, envelope: Envelope) -> None:
        self._envelope = envelope

    def wrap(self, method: str, handler: Handler) -> GrpcHandler:
        envelope = self._envelope
        drain = envelope.drain

        async def run(request: Any, context: GrpcContext) -> bytes:
            headers = headers_of(context)
            record = envelope.open("grpc", method, headers)
            rpc = Rpc(method, record.request_id, headers, context, record.traceparent)
            if isinstance(request, pb.CallToolRequest):
                record.tool = request.name
            trailers = {REQUEST_ID_HEADER: rpc.request_id}
            try:
                drain.enter()
                try:
                    reply = await handler(request, rpc)
                    data = reply.message.SerializeToString()
                finally:
                    drain.leave()
                    record.caller = rpc.caller
                context.set_trailing_metadata(tuple({**trailers, **reply.headers}.items()))
                # A reply ready after the caller's deadline reaches nobody: the caller got
                # DEADLINE_EXCEEDED, and so say the access line and the metrics.
                record.code = "DEADLINE_EXCEEDED" if _expired(context) else "OK"
                record.outcome = reply.outcome
                return data
            except asyncio.CancelledError:
                record.code = "DEADLINE_EXCEEDED" if _expired(context) else "CANCELLED"
                raise
            except ServiceError as refusal:
                record.refused(refusal)
                status = to_grpc_status(refusal, trailers)
            except Exception as exc:
                status = to_grpc_status(envelope.unexpected(exc, record), trailers)
            finally:
                envelope.finish(record)
            await context.abort(status.code, status.details, status.trailing_metadata)
            raise AssertionError("context.abort returned")  # pragma: no cover

        return run
