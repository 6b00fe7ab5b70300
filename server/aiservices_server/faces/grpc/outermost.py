"""The outermost interceptor: the first and the last thing every ToolService call meets.

It owns the request id, draining, the RPC metrics, the access line and the one mapping from
domain errors to gRPC status, details and trailers. An exception no rule covers (a failing
limiter store, a bug, a response that does not serialize) becomes INTERNAL with a support id,
never UNKNOWN with the exception's text. What the caller sees, the access line and the metrics
agree, because all three are decided here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiservices.v1 import tool_service_pb2 as pb
from aiservices_server.core.drain import Drain
from aiservices_server.core.headers import REQUEST_ID_HEADER, Headers, request_id_for
from aiservices_server.errors import ServiceError, report_unexpected
from aiservices_server.faces.access import access_log, log_access
from aiservices_server.faces.grpc.rpc import GrpcContext, Handler, Reply, Rpc
from aiservices_server.faces.grpc.status import status_code_for, to_grpc_status
from aiservices_server.logs import LineSampler
from aiservices_server.metrics import Metrics

GrpcHandler = Callable[[Any, GrpcContext], Awaitable[bytes]]
"""What grpc.aio runs for a unary method: the request and grpc's context in, response bytes
out (serialized here, so a response that does not serialize is an error seen here too)."""


def log_suppressed_unauthenticated(count: int) -> None:
    """The summary line for access lines of UNAUTHENTICATED calls that were not written."""
    access_log.info("suppressed unauthenticated calls", extra={"suppressed": count})


def headers_of(context: GrpcContext) -> Headers:
    """The call's text metadata (binary `-bin` values are no headers the core reads), with
    the names sent more than once."""
    pairs = context.invocation_metadata() or ()
    return Headers.from_pairs((name, value) for name, value in pairs if isinstance(value, str))


class OutermostInterceptor:
    """Access lines of UNAUTHENTICATED calls go through `unauthenticated_lines`, so a flood of
    them cannot flood the log; the metrics count every one."""

    def __init__(
        self, metrics: Metrics, drain: Drain, *, unauthenticated_lines: LineSampler | None = None
    ) -> None:
        self._metrics = metrics
        self.drain = drain
        self.unauthenticated_lines = unauthenticated_lines or LineSampler(
            log_suppressed_unauthenticated
        )

    def wrap(self, method: str, handler: Handler) -> GrpcHandler:
        metrics = self._metrics
        drain = self.drain
        sampler = self.unauthenticated_lines

        async def run(request: Any, context: GrpcContext) -> bytes:
            started = time.perf_counter()
            labels = metrics.rpc_started(method)
            headers = headers_of(context)
            rpc = Rpc(method, request_id_for(headers), headers, context)
            trailers = {REQUEST_ID_HEADER: rpc.request_id}
            code = "UNKNOWN"
            reply: Reply | None = None
            refusal: ServiceError | None = None
            try:
                drain.enter()
                try:
                    reply = await handler(request, rpc)
                    data = reply.message.SerializeToString()
                finally:
                    drain.leave()
                context.set_trailing_metadata(tuple({**trailers, **reply.headers}.items()))
                code = "OK"
                return data
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
                raise
            except Exception as exc:
                refusal = (
                    exc if isinstance(exc, ServiceError) else report_unexpected(exc, rpc.request_id)
                )
                code = status_code_for(refusal).name
                status = to_grpc_status(refusal, trailers)
                await context.abort(status.code, status.details, status.trailing_metadata)
                raise AssertionError("context.abort returned") from None  # pragma: no cover
            finally:
                duration = time.perf_counter() - started
                metrics.rpc_handled(labels, code, duration)
                tool = request.name if isinstance(request, pb.CallToolRequest) else None
                key_id = _key_id(rpc, refusal)
                if reply is not None and reply.outcome is not None and tool is not None:
                    metrics.tool_call(
                        tool, reply.outcome.code, key_id, "grpc", reply.outcome.upstream
                    )
                if code != "UNAUTHENTICATED" or sampler.admit():
                    outcome = reply.outcome if reply is not None else None
                    log_access(
                        transport="grpc",
                        request_id=rpc.request_id,
                        method=method,
                        code=code,
                        duration=duration,
                        key_id=key_id,
                        caller=rpc.caller,
                        tool=tool,
                        outcome=outcome.code if outcome is not None else "",
                        trace_id=outcome.trace_id if outcome is not None else "",
                        upstream=outcome.upstream if outcome is not None else None,
                        payload=outcome.payload if outcome is not None else None,
                    )

        return run


def _key_id(rpc: Rpc, refusal: ServiceError | None) -> str:
    caller = rpc.caller
    if caller is not None:
        return caller.key_id
    if refusal is not None and refusal.key_id is not None:
        return refusal.key_id
    return "anonymous"
