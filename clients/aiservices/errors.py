"""Failed calls as exceptions callers can branch on.

Every non-OK status becomes a `ToolServiceError`; the statuses the service documents get a
subclass each (chosen by status code, and by ErrorInfo reason where one code means two things),
so `except RateLimited as err: wait(err.retry_after)` needs no look at codes or trailers.
`error_from_rpc` is the one place a grpc.RpcError (sync or aio) becomes one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from aiservices._convert import ToolResult, delay_seconds, duration_delay

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "FeatureDisabled",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "ToolError",
    "ToolServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_for",
    "error_from_rpc",
]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ToolServiceError(Exception):
    """A call that failed with a non-OK gRPC status, with the service's rich details unpacked.

    `reason`/`domain`/`error_metadata` come from google.rpc.ErrorInfo (None/empty when the
    status has none, e.g. a deadline that passed on the client), `field_violations` from
    google.rpc.BadRequest, `retry_after` (seconds) from google.rpc.RetryInfo or else the
    `retry-after` trailer. The original grpc.RpcError is `__cause__`.

    `retryable` says whether sending the same request again may succeed without the caller
    changing anything; it is False unless a subclass knows better.
    """

    retryable: bool = False

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        error_metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after: float | None = None,
        trailing_metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.error_metadata: dict[str, str] = dict(error_metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after
        self.trailing_metadata: dict[str, str] = dict(trailing_metadata or {})
        super().__init__(code, message)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text


class Unauthenticated(ToolServiceError):
    """No key, or one the server does not know: retrying with the same key cannot help."""


class PermissionDenied(ToolServiceError):
    """The key lacks the tool's permission (ErrorInfo metadata names `tool` and `permission`),
    or may not act for users."""


class NotFound(ToolServiceError):
    """No tool by that name for this server."""


class InvalidArgument(ToolServiceError):
    """The request breaks the contract; `field_violations` says which fields and why."""


class FailedPrecondition(ToolServiceError):
    """The server is not in a state to run the call; not retryable without a change there."""


class FeatureDisabled(FailedPrecondition):
    """The server has no upstream configured (reason `AI_SERVICES_DISABLED`): an operator has
    to fix its settings, so retrying is pointless."""


class ResourceExhausted(ToolServiceError):
    """A limit was hit; without RetryInfo (e.g. a message over the size limit) it is not one
    that passes with time."""


class RateLimited(ResourceExhausted):
    """The caller's budget is spent; `retry_after` (seconds) says when the next call is let in.

    Retryable: the server refused before running anything, and waiting `retry_after` is
    exactly what it asks for."""

    retryable = True


class Unavailable(ToolServiceError):
    """No server answered, or it refused the call for now (reason `OVERLOADED` or
    `SHUTTING_DOWN`, with `retry_after`).

    Retryable: the call either never reached a server or was refused before running, and the
    one tool is read-only, so sending it again (to this or another replica) is safe."""

    retryable = True


class DeadlineExceeded(ToolServiceError):
    """The caller's deadline passed. Not retryable: the upstream may have done the work, and
    a retry with the same deadline is likely to end the same way; raise the deadline instead."""


class Internal(ToolServiceError):
    """Something unexpected broke in the server. `support_id` is the id the server logged
    with it: quote it when asking for help. Not retryable: nothing says it would pass."""

    @property
    def support_id(self) -> str | None:
        return self.error_metadata.get("support_id")


class ToolError(Exception):
    """The tool ran and failed (a result with `is_error`): what the typed helpers
    (`refine_prompt`) raise where `call_tool` returns the result.

    Not a ToolServiceError: the call itself succeeded (status OK), so there is no status code.
    `code` is the tool error's code without prefix (e.g. "UPSTREAM_TIMEOUT"; "UNKNOWN" when the
    result carries none), `retryable` and `retry_after` (seconds) say whether and when the same
    call may pass, `trace_id`/`request_id` find it in the upstream's traces and the server's log,
    and `result` is the whole ToolResult.
    """

    def __init__(self, result: ToolResult) -> None:
        info = result.error
        self.result = result
        self.code = info.code if info is not None else "UNKNOWN"
        self.message = (info.message if info is not None else "") or result.text
        self.retryable = info is not None and info.retryable
        self.retry_after = info.retry_after if info is not None else None
        self.trace_id = result.trace_id
        self.request_id = result.request_id
        super().__init__(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


_BY_CODE: dict[grpc.StatusCode, type[ToolServiceError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}
_BY_REASON: dict[tuple[grpc.StatusCode, str], type[ToolServiceError]] = {
    (grpc.StatusCode.FAILED_PRECONDITION, "AI_SERVICES_DISABLED"): FeatureDisabled,
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED"): RateLimited,
}


def error_for(
    code: grpc.StatusCode, message: str, *, reason: str | None = None, **fields: object
) -> ToolServiceError:
    """The exception class for (code, reason), built with `fields` (ToolServiceError's keyword
    arguments). A RESOURCE_EXHAUSTED with a retry delay but no known reason is RateLimited too:
    the delay is the server saying it passes with time."""
    kind = _BY_REASON.get((code, reason or "")) or _BY_CODE.get(code, ToolServiceError)
    if kind is ResourceExhausted and fields.get("retry_after") is not None:
        kind = RateLimited
    return kind(code, message, reason=reason, **fields)  # type: ignore[arg-type]


def error_from_rpc(err: grpc.RpcError) -> ToolServiceError:
    """The ToolServiceError for a failed call of either client, details unpacked; the rich
    status is trusted only when its code and message match the call's (grpc_status's rule)."""
    code = _code_of(err)
    if isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        details = err.details() or ""
        trailers = list(err.trailing_metadata() or ())
    else:
        details, trailers = str(err), []
    rich = _rich_status(trailers, code, details)
    text_trailers = _text_metadata(trailers)
    reason: str | None = None
    domain: str | None = None
    error_metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    for detail in rich.details if rich is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, error_metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = duration_delay(retry.retry_delay)
    if retry_after is None:
        retry_after = _parse_retry_after(text_trailers.get("retry-after"))
    error = error_for(
        code,
        details,
        reason=reason,
        domain=domain,
        error_metadata=error_metadata,
        field_violations=violations,
        retry_after=retry_after,
        trailing_metadata=text_trailers,
    )
    error.__cause__ = err
    return error


def _code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code() if callable(getattr(err, "code", None)) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _rich_status(
    trailers: Iterable[tuple[str, str | bytes]], code: grpc.StatusCode, details: str
) -> status_pb2.Status | None:
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                rich = status_pb2.Status.FromString(value)
            except DecodeError:
                return None
            if rich.code != code.value[0] or rich.message != details:
                return None  # details that contradict the status are not to be trusted
            return rich
    return None


def _text_metadata(pairs: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Text trailers only; binary (-bin) ones are decoded into the error's fields instead."""
    result: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, bytes):
            continue
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


def _parse_retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None  # an HTTP date, or junk: not worth guessing
    return delay_seconds(seconds)
