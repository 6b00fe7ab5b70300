"""Domain errors to gRPC status, with google.rpc details: the only place that knows both."""

from __future__ import annotations

import math
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors

DOMAIN = "aiservices"

_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ToolNotFound: grpc.StatusCode.NOT_FOUND,
    errors.FeatureDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_for(error: errors.ServiceError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        code = _CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def retry_after_seconds(delay: float) -> int:
    """Whole seconds, at least 1: what a `retry-after` header promises."""
    return max(1, math.ceil(delay))


def to_grpc_status(
    error: errors.ServiceError, trailers: dict[str, str] | None = None
) -> grpc.Status:
    code = status_code_for(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    extra = dict(trailers or {})
    if isinstance(error, errors.InvalidArgument) and error.violations:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        details.append(_pack(request))
    if isinstance(error, errors.RetryLater):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(error.retry_after, 0.0) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        extra.update(error.headers)
        extra["retry-after"] = str(retry_after_seconds(error.retry_after))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )
    converted = rpc_status.to_status(status)
    metadata = tuple(converted.trailing_metadata) + tuple(extra.items())
    return _Status(converted.code, converted.details, metadata)


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, object], ...]
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


async def abort(
    context: grpc.aio.ServicerContext,
    error: errors.ServiceError,
    trailers: dict[str, str] | None = None,
) -> NoReturn:
    status = to_grpc_status(error, trailers)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


def internal_status(support_id: str) -> errors.ServiceError:
    error = errors.ServiceError(
        f"internal error; quote support id {support_id} when reporting it",
        metadata={"support_id": support_id},
    )
    return error
