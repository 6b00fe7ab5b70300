"""Refusals to what an MCP client sees: the one table from domain errors to an HTTP status, a
JSON-RPC error code and whether a `tools/call` answers it as a result with `isError`.

A refusal before the SDK reads the request is an HTTP status with a JSON-RPC error as its body;
one inside the SDK's handlers is a JSON-RPC error; invalid arguments of a tool call are a
result the model can read and correct. The access line and metrics name each by its gRPC code
(`faces.envelope.code_of`), as they do on the gRPC face.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mcp_types as types

from aiservices_server import errors
from aiservices_server.errors import retry_after_seconds

# JSON-RPC error codes in the range the spec leaves to servers, for refusals that are no
# malformed request: the caller may retry later, or never, or must bring a valid key.
RETRY_LATER = -32000
DEADLINE_EXCEEDED = -32001
UNAUTHENTICATED = -32002


class HttpRefusal(errors.ServiceError):
    """A request refused for what its HTTP says, before MCP reads it."""


class MethodNotAllowed(HttpRefusal, errors.InvalidArgument):
    """Stateless: no event stream to GET, no session to DELETE."""

    reason = "METHOD_NOT_ALLOWED"


class HostNotAllowed(HttpRefusal, errors.PermissionDenied):
    reason = "HOST_NOT_ALLOWED"


class OriginNotAllowed(HttpRefusal, errors.PermissionDenied):
    reason = "ORIGIN_NOT_ALLOWED"


class BodyTooSlow(HttpRefusal, errors.DeadlineExceeded):
    reason = "REQUEST_TIMEOUT"


@dataclass(frozen=True, slots=True)
class Answer:
    http_status: int
    jsonrpc_code: int
    as_result: bool = False


# Most specific first: the first row the error is an instance of answers it.
_ANSWERS: list[tuple[type[errors.ServiceError], Answer]] = [
    (MethodNotAllowed, Answer(405, types.INVALID_REQUEST)),
    (HostNotAllowed, Answer(421, types.INVALID_REQUEST)),
    (OriginNotAllowed, Answer(403, types.INVALID_REQUEST)),
    (BodyTooSlow, Answer(408, types.INVALID_REQUEST)),
    (errors.Unauthenticated, Answer(401, UNAUTHENTICATED)),
    (errors.PermissionDenied, Answer(403, types.INVALID_PARAMS)),
    (errors.InvalidArgument, Answer(400, types.INVALID_PARAMS, as_result=True)),
    (errors.ToolNotFound, Answer(404, types.INVALID_PARAMS)),
    (errors.FeatureDisabled, Answer(503, types.INVALID_PARAMS)),
    (errors.RetryLater, Answer(503, RETRY_LATER)),
    (errors.DeadlineExceeded, Answer(504, DEADLINE_EXCEEDED)),
]
_INTERNAL = Answer(500, types.INTERNAL_ERROR)


def answer_for(error: errors.ServiceError) -> Answer:
    return next((answer for kind, answer in _ANSWERS if isinstance(error, kind)), _INTERNAL)


def jsonrpc_error(error: errors.ServiceError) -> tuple[int, dict[str, Any]]:
    """The JSON-RPC error code, and `data` with the reason (and, to come back later,
    `retryAfterSeconds`)."""
    data: dict[str, Any] = {"reason": error.reason, **error.metadata}
    if isinstance(error, errors.RetryLater):
        data["retryAfterSeconds"] = retry_after_seconds(error.retry_after)
    return answer_for(error).jsonrpc_code, data


# What a status the SDK answered with on its own (a malformed request, a body over the limit)
# comes to, in the access line's words.
_CODES_OF_STATUS = {
    200: "OK",
    202: "OK",
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    406: "INVALID_ARGUMENT",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
}


def code_of_status(status: int) -> str:
    return _CODES_OF_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
