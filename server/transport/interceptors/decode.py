"""Requests whose bytes do not parse (e.g. a Struct nested deeper than protobuf allows) are
INVALID_ARGUMENT with the usual details, after authentication, like any other bad request; a
parser that fails in an unexpected way is INTERNAL, like any other unexpected exception."""

from __future__ import annotations

from typing import Any

from server.errors import InvalidArgument
from server.transport.interceptors.base import (
    Behaviour,
    Context,
    UnaryInterceptor,
    UndecodableRequest,
)
from server.transport.state import current_call
from server.transport.status import abort


class DecodeGuardInterceptor(UnaryInterceptor):
    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            if request.__class__ is UndecodableRequest:
                if request.unexpected is not None:
                    raise request.unexpected
                error = InvalidArgument(
                    "the request could not be decoded (too deeply nested or malformed)"
                )
                await abort(context, error, current_call().trailers)
            return await behaviour(request, context)

        return run
