"""What surrounds every call on either face, written once: the request id, draining, timing, the
report of an unexpected error, the metrics and the access line.

A face opens a `CallRecord` when a request arrives, fills in what it learns (who called, which
tool, what came of it, the code its caller got), and hands it to `Envelope.finish` when the
answer has gone out. The access line and the metrics are decided there, from the record alone,
so what the caller saw, the log and the metrics agree, and both faces use the same words: the
gRPC code name (`OK`, `RESOURCE_EXHAUSTED`, ...) for how the request ended, and `outcome`, OK or
the tool error code, for a tool call that ran.

When traces are on (`tracing`), the record holds the call's server span, started with the record
and ended with it, described from the record alone too; `traced_tool_call` is the tool span both
faces run a tool call in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from aiservices_server import errors
from aiservices_server.call import Call, Principal
from aiservices_server.core.drain import Drain
from aiservices_server.core.headers import Headers, request_id_for, traceparent_in
from aiservices_server.core.service import MAX_NAME_SHOWN, ToolService
from aiservices_server.logs import LineSampler
from aiservices_server.metrics import Metrics, RpcLabels
from aiservices_server.tools.base import JsonObject, ToolFailure, ToolResult
from aiservices_server.tracing import NO_SPAN, NO_TRACER, Span, Tracer
from aiservices_server.upstream.refiner import UpstreamAttempt

access_log = logging.getLogger("aiservices.access")

# The code each refusal comes to, in gRPC's names, whichever face answered it.
_CODES: dict[type[errors.ServiceError], str] = {
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.PermissionDenied: "PERMISSION_DENIED",
    errors.ToolNotFound: "NOT_FOUND",
    errors.FeatureDisabled: "FAILED_PRECONDITION",
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.RateLimited: "RESOURCE_EXHAUSTED",
    errors.Overloaded: "UNAVAILABLE",
    errors.ShuttingDown: "UNAVAILABLE",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
}


def code_of(error: errors.ServiceError) -> str:
    """The gRPC code name a refusal comes to (INTERNAL for any error no rule names)."""
    for kind in type(error).__mro__:
        code = _CODES.get(kind)
        if code is not None:
            return code
    return "INTERNAL"


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What a tool call that ran came to: `code` is OK or the tool error code; `payload` holds
    arguments and result only when payload logging is on."""

    code: str
    trace_id: str = ""
    upstream: UpstreamAttempt | None = None
    payload: dict[str, Any] | None = None


@dataclass(slots=True)
class CallRecord:
    """One request as its face learns it, from arrival to answer."""

    transport: str
    method: str
    request_id: str
    started: float
    code: str = "UNKNOWN"
    caller: Principal | None = None
    key_id: str = "anonymous"
    tool: str | None = None
    outcome: ToolOutcome | None = None
    labels: RpcLabels = ("", "", "")  # the gRPC method's metric labels, found once per call
    span: Span = NO_SPAN  # the server span, when traces are on
    # What the call passes on: the server span's traceparent when traces are on, else the
    # caller's (well formed, or None).
    traceparent: str | None = None

    def refused(self, error: errors.ServiceError) -> None:
        """The request ended with `error`: its code, and its key when it named one."""
        self.code = code_of(error)
        if self.caller is None and error.key_id is not None:
            self.key_id = error.key_id


def log_suppressed_unauthenticated(count: int) -> None:
    """The summary line for access lines of UNAUTHENTICATED calls that were not written."""
    access_log.info("suppressed unauthenticated calls", extra={"suppressed": count})


class Envelope:
    """Shared by the faces of one server. Access lines of UNAUTHENTICATED requests go through
    `unauthenticated_lines`, so a flood of them cannot flood the log; the metrics count every
    one."""

    def __init__(
        self,
        metrics: Metrics,
        drain: Drain,
        *,
        unauthenticated_lines: LineSampler | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.metrics = metrics
        self.drain = drain
        self.tracer = tracer
        self.unauthenticated_lines = unauthenticated_lines or LineSampler(
            log_suppressed_unauthenticated
        )

    def open(self, transport: str, method: str, headers: Headers) -> CallRecord:
        """A request has arrived: its record, with its request id (the caller's, when usable)."""
        record = CallRecord(transport, method, request_id_for(headers), time.perf_counter())
        if transport == "grpc":
            record.labels = self.metrics.rpc_started(method)
        parent = traceparent_in(headers)
        if self.tracer.enabled:
            record.span = _server_span(self.tracer, record, parent)
        record.traceparent = record.span.traceparent(parent)
        return record

    def unexpected(self, exc: BaseException, record: CallRecord) -> errors.Internal:
        """An error no rule covers: logged with a support id, which the caller is given."""
        internal = errors.report_unexpected(exc, record.request_id)
        record.refused(internal)
        return internal

    def finish(self, record: CallRecord) -> None:
        """The answer has gone out: count it, and write its access line."""
        duration = time.perf_counter() - record.started
        metrics = self.metrics
        if record.transport == "grpc":
            metrics.rpc_handled(record.labels, record.code, duration)
        else:
            metrics.mcp_request(record.method, record.code, duration)
        key_id = record.caller.key_id if record.caller is not None else record.key_id
        outcome = record.outcome
        if outcome is not None and record.tool is not None:
            metrics.tool_call(record.tool, outcome.code, key_id, record.transport, outcome.upstream)
        if record.span.recording:
            _end_server_span(record)
        if record.code == "UNAUTHENTICATED" and not self.unauthenticated_lines.admit():
            return
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("rpc", extra=_access_fields(record, key_id, duration))


def _access_fields(record: CallRecord, key_id: str, duration: float) -> dict[str, Any]:
    """The access line's fields: who called, what was asked, how it ended, how long it took,
    and what the upstream did."""
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "transport": record.transport,
        "method": record.method,
        "code": record.code,
        "duration_ms": round(duration * 1e6) / 1000,
        "key_id": key_id,
    }
    caller = record.caller
    if caller is not None and caller.user_id is not None:
        fields["user_id"] = caller.user_id
    if caller is not None and caller.organization is not None:
        fields["organization"] = caller.organization
    if record.tool:
        fields["tool"] = record.tool[:MAX_NAME_SHOWN]
    outcome = record.outcome
    if outcome is not None:
        fields["outcome"] = outcome.code
        if outcome.upstream is not None:
            upstream = outcome.upstream
            fields["upstream_status"] = upstream.status
            fields["upstream_ms"] = round(upstream.seconds * 1e6) / 1000
            if upstream.tokens is not None:
                fields["prompt_tokens"], fields["completion_tokens"] = upstream.tokens
        if outcome.trace_id:
            fields["upstream_trace_id"] = outcome.trace_id
        if outcome.payload is not None:
            fields["payload"] = outcome.payload
    ids = record.span.ids()
    if ids is not None:
        fields["trace_id"], fields["span_id"] = ids
    return fields


# gRPC's status codes by name, for `rpc.grpc.status_code`.
_GRPC_CODES = {
    name: number
    for number, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


def _server_span(tracer: Tracer, record: CallRecord, parent: str | None) -> Span:
    """The server span of a request just arrived, child of the caller's traceparent."""
    if record.transport == "grpc":
        _, service, name = record.labels
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        return tracer.server(record.method.lstrip("/"), parent, attributes)
    return tracer.server(
        "POST /mcp",
        parent,
        {"http.request.method": "POST", "url.path": "/mcp", "network.protocol.name": "http"},
    )


def _end_server_span(record: CallRecord) -> None:
    """Describes the server span from the record (never arguments or prompt text) and ends
    it; a request that did not end OK is a failed span with its code as `error.type`."""
    span = record.span
    if record.transport == "grpc":
        span.set({"rpc.grpc.status_code": _GRPC_CODES.get(record.code, 2)})
    elif record.method != "http":
        named = f"{record.method} {record.tool[:MAX_NAME_SHOWN]}" if record.tool else record.method
        span.rename(named)
        span.set({"mcp.method.name": record.method})
    if record.tool:
        span.set({"gen_ai.tool.name": record.tool[:MAX_NAME_SHOWN]})
    if record.outcome is not None:
        span.set({"aiservices.tool.outcome": record.outcome.code})
    span.end(None if record.code == "OK" else record.code)


async def traced_tool_call(
    tracer: Tracer, service: ToolService, call: Call, name: str, arguments: JsonObject
) -> ToolResult:
    """`service.call`, in a tool span (child of the call's server span) when traces are on;
    the upstream's client spans are its children. A tool failure or a refusal fails the span
    with the tool error code or the refusal's code as `error.type`."""
    if not tracer.enabled:
        return await service.call(call, name, arguments)
    shown = name[:MAX_NAME_SHOWN]
    span = tracer.child(
        f"execute_tool {shown}",
        call.traceparent,
        {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": shown},
        client=False,
    )
    error_type: str | None = None
    try:
        return await service.call(
            replace(call, traceparent=span.traceparent(None)), name, arguments
        )
    except ToolFailure as failure:
        error_type = failure.code.value
        raise
    except errors.ServiceError as refusal:
        error_type = code_of(refusal)
        raise
    except BaseException as exc:
        error_type = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
        raise
    finally:
        span.end(error_type)
