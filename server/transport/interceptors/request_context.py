"""Request id and access log: the outermost interceptor, so it sees every outcome."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from random import getrandbits
from typing import Any

import grpc

from server.logs import emit_json
from server.metrics import Metrics
from server.transport.interceptors.base import Behaviour, Context, UnaryInterceptor
from server.transport.state import CallState, begin_call

access_log = logging.getLogger("aiservices.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


_NONE: frozenset[str] = frozenset()


def _repeated(pairs: Sequence[tuple[str, str | bytes]]) -> frozenset[str]:
    """Text metadata names sent more than once (ambiguous for credentials and identities)."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for name, value in pairs:
        if isinstance(value, str):
            if name in seen:
                repeated.add(name)
            seen.add(name)
    return frozenset(repeated)


def _status_name(context: Context, fallback: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return fallback


class RequestContextInterceptor(UnaryInterceptor):
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        metrics = self._metrics

        async def run(request: Any, context: Context) -> Any:
            pairs = context.invocation_metadata() or ()
            metadata = {name: value for name, value in pairs if value.__class__ is str}
            # Fewer entries than pairs: a name sent twice, or a binary (-bin) value.
            repeated = _repeated(pairs) if len(metadata) < len(pairs) else _NONE
            given = metadata.get("x-request-id")
            # An identifier, not a secret: 128 random bits without a system call per RPC.
            request_id = (
                given if given and _REQUEST_ID.fullmatch(given) else f"{getrandbits(128):032x}"
            )
            state = CallState(
                method=method, request_id=request_id, metadata=metadata, repeated=repeated
            )
            series = None if metrics is None else metrics.rpc_started(method)
            state.trailers["x-request-id"] = request_id
            begin_call(state)
            code = "UNKNOWN"
            try:
                response = await behaviour(request, context)
                context.set_trailing_metadata(tuple(state.trailers.items()))
                code = "OK"
                return response
            except grpc.aio.AbortError:
                code = _status_name(context, "UNKNOWN")
                raise
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = (
                    "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                )
                raise
            finally:
                duration = time.perf_counter() - state.started
                if metrics is not None and series is not None:
                    metrics.rpc_handled(series, code, duration)
                _log_access(state, code, duration)

        return run


def _log_access(state: CallState, code: str, duration: float) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": state.request_id,
        "method": state.method,
        "code": code,
        # To the microsecond; round() to an int is several times cheaper than round(x, 3).
        "duration_ms": round(duration * 1e6) / 1000,
        "key_id": state.principal.key_id,
    }
    principal = state.principal
    if principal.user_id is not None:
        fields["user_id"] = principal.user_id
    if principal.organization is not None:
        fields["organization"] = principal.organization
    if state.tool:
        fields["tool"] = state.tool
    if state.tool_outcome:
        fields["outcome"] = state.tool_outcome
    if state.upstream_status is not None:
        fields["upstream_status"] = state.upstream_status
    if state.upstream_latency is not None:
        fields["upstream_ms"] = round(state.upstream_latency * 1e6) / 1000
    if state.trace_id:
        fields["trace_id"] = state.trace_id
    if state.payload is not None:
        fields["payload"] = state.payload
    emit_json(access_log, "rpc", fields)
