"""Requests whose bytes do not parse (e.g. a Struct nested deeper than protobuf allows) are
INVALID_ARGUMENT with the usual details, after authentication, like any other bad request."""

from __future__ import annotations

from typing import Any

from server.errors import InvalidArgument
from server.transport.interceptors.base import UNDECODABLE, Behaviour, Context, UnaryInterceptor
from server.transport.state import current_call
from server.transport.status import abort


class DecodeGuardInterceptor(UnaryInterceptor):
    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            if request is UNDECODABLE:
                error = InvalidArgument(
                    "the request could not be decoded (too deeply nested or malformed)"
                )
                await abort(context, error, current_call().trailers)
            return await behaviour(request, context)

        return run
