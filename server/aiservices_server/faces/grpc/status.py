"""Domain errors to gRPC status, with google.rpc details: the only place that knows both."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiservices_server import errors
from aiservices_server.errors import retry_after_seconds
from aiservices_server.faces.envelope import code_of

DOMAIN = "aiservices"


def status_code_for(error: errors.ServiceError) -> grpc.StatusCode:
    """The status a refusal gets: the code both faces name it by (`faces.envelope.code_of`)."""
    return grpc.StatusCode[code_of(error)]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# A gRPC client refuses trailers over 8 KB by default (grpc.max_metadata_size): the caller would
# see RESOURCE_EXHAUSTED instead of the status the server logged. Every status stays well under:
# the message at most MAX_MESSAGE_WIRE_BYTES as sent (percent-encoded), the google.rpc.Status
# at most MAX_DETAILS_BYTES (sent in base64, a third more), each other trailer value at most
# MAX_TRAILER_VALUE_CHARS; about 4 KB in all.
MAX_MESSAGE_WIRE_BYTES = 512
MAX_DETAILS_BYTES = 2048
MAX_TRAILER_VALUE_CHARS = 256
_MAX_INFO_KEY_CHARS = 64
_MAX_INFO_VALUE_CHARS = 256
# ErrorInfo metadata: how many field violations the BadRequest leaves out; "N+" when only a
# lower bound is known.
VIOLATIONS_NOT_SHOWN = "violations_not_shown"


def _wire_bytes(char: str) -> int:
    """What one character of grpc-message costs on the wire: printable ASCII but `%` as is,
    every other UTF-8 byte as %XX."""
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "replace"))


def _clip_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_WIRE_BYTES // 9 or (
        len(message) <= MAX_MESSAGE_WIRE_BYTES and message.isascii() and "%" not in message
    ):
        return message
    budget = MAX_MESSAGE_WIRE_BYTES - 3  # room for "..."
    for index, char in enumerate(message):
        budget -= _wire_bytes(char)
        if budget < 0:
            return message[:index] + "..."
    return message


def _status_details(
    code: grpc.StatusCode, message: str, error: errors.ServiceError
) -> status_pb2.Status:
    """The google.rpc.Status for `error`, within MAX_DETAILS_BYTES: field violations are left
    out from the last (and counted) until it fits, down to the first; then the ErrorInfo
    metadata, then the first violation too."""
    metadata = {
        errors.clip(key, _MAX_INFO_KEY_CHARS): errors.clip(value, _MAX_INFO_VALUE_CHARS)
        for key, value in error.metadata.items()
    }
    violations: list[errors.FieldViolation] = []
    not_shown, exact = 0, True
    if isinstance(error, errors.InvalidArgument):
        violations = list(error.violations)
        not_shown, exact = error.not_shown, error.not_shown_exact
    retry_info = None
    if isinstance(error, errors.RetryLater):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(error.retry_after, 0.0) * 1e9))
        retry_info = _pack(error_details_pb2.RetryInfo(retry_delay=delay))
    given = len(violations)
    while True:
        hidden = not_shown + given - len(violations)
        info = dict(metadata)
        if hidden:
            info[VIOLATIONS_NOT_SHOWN] = f"{hidden}" if exact else f"{hidden}+"
        details = [
            _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=info))
        ]
        if violations:
            request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in violations
                ]
            )
            details.append(_pack(request))
        if retry_info is not None:
            details.append(retry_info)
        status = status_pb2.Status(
            code=getattr(code_pb2, code.name), message=message, details=details
        )
        if status.ByteSize() <= MAX_DETAILS_BYTES or not (violations or metadata):
            return status
        if len(violations) > 1 or not metadata:
            violations.pop()
        else:
            metadata = {}


def to_grpc_status(
    error: errors.ServiceError, trailers: dict[str, str] | None = None
) -> grpc.Status:
    """The status for `error`, with `trailers`, the error's own headers and, when it tells the
    caller to come back, `retry-after` as trailing metadata."""
    code = status_code_for(error)
    extra = {**(trailers or {}), **error.headers}
    if isinstance(error, errors.RetryLater):
        extra["retry-after"] = str(retry_after_seconds(error.retry_after))
    status = _status_details(code, _clip_message(error.message), error)
    converted = rpc_status.to_status(status)
    metadata = tuple(converted.trailing_metadata) + tuple(
        (name, value[:MAX_TRAILER_VALUE_CHARS]) for name, value in extra.items()
    )
    return _Status(converted.code, converted.details, metadata)


class _Status(grpc.Status):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
