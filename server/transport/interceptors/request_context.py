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

from server.errors import ServiceError
from server.logs import LineSampler
from server.metrics import Metrics
from server.transport.interceptors.base import Behaviour, Context, UnaryInterceptor
from server.transport.state import CallState, begin_call
from server.transport.status import abort, report_unexpected, status_code_for

access_log = logging.getLogger("aiservices.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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


def log_suppressed_unauthenticated(count: int) -> None:
    """The summary line for access lines of UNAUTHENTICATED calls that were not written."""
    access_log.info("suppressed unauthenticated calls", extra={"suppressed": count})


class RequestContextInterceptor(UnaryInterceptor):
    """Gives each call its state and request id, and records how it ended, in the access log
    and the metrics, as the caller sees it.

    Being outermost, it is also the last guard: an exception that no inner layer turned into a
    status (a failing limiter store, a bug in an interceptor, a response that does not
    serialize) becomes INTERNAL with a support id, logged by type and place, never UNKNOWN
    with the exception's text. Access lines of UNAUTHENTICATED calls go through
    `unauthenticated_lines`, so a flood of them cannot flood the log; the metrics count every
    one.
    """

    def __init__(
        self, metrics: Metrics | None = None, *, unauthenticated_lines: LineSampler | None = None
    ) -> None:
        self._metrics = metrics
        self.unauthenticated_lines = unauthenticated_lines or LineSampler(
            log_suppressed_unauthenticated
        )

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        metrics = self._metrics
        sampler = self.unauthenticated_lines

        async def run(request: Any, context: Context) -> Any:
            state = CallState(method=method, request_id="")
            begin_call(state)
            rpc_labels = None if metrics is None else metrics.rpc_started(method)
            code = "UNKNOWN"
            try:
                _read_metadata(state, context)
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
            except ServiceError as error:
                # Raised instead of aborted with: still the status it stands for.
                code = status_code_for(error).name
                await abort(context, error, state.trailers)
            except Exception as exc:
                code = "INTERNAL"
                await abort(context, report_unexpected(exc), state.trailers)
            finally:
                duration = time.perf_counter() - state.started
                if metrics is not None and rpc_labels is not None:
                    metrics.rpc_handled(rpc_labels, code, duration)
                if code != "UNAUTHENTICATED" or sampler.admit():
                    _log_access(state, code, duration)

        return run


def _read_metadata(state: CallState, context: Context) -> None:
    """The call's text metadata, names sent twice, and its request id (the caller's, when it is
    a plain token, else a fresh one), into `state`."""
    pairs = context.invocation_metadata() or ()
    metadata = {name: value for name, value in pairs if value.__class__ is str}
    state.metadata = metadata
    # Fewer entries than pairs: a name sent twice, or a binary (-bin) value.
    if len(metadata) < len(pairs):
        state.repeated = _repeated(pairs)
    given = metadata.get("x-request-id")
    # An identifier, not a secret: 128 random bits without a system call per RPC.
    state.request_id = (
        given if given and _REQUEST_ID.fullmatch(given) else f"{getrandbits(128):032x}"
    )
    state.trailers["x-request-id"] = state.request_id


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
    access_log.info("rpc", extra=fields)
