"""The authentication interceptor: the core's Authenticator on the RPC's metadata; the
authenticated Call, with the caller's deadline and trace context, for every step inside."""

from __future__ import annotations

import time
from typing import Any

from aiservices_server.call import Call
from aiservices_server.core.auth import Authenticator
from aiservices_server.faces.grpc.rpc import Handler, Reply, Rpc


class AuthenticationInterceptor:
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def wrap(self, method: str, handler: Handler) -> Handler:
        authenticator = self._authenticator

        async def run(request: Any, rpc: Rpc) -> Reply:
            principal = authenticator.principal(rpc.headers)
            remaining = rpc.context.time_remaining()
            rpc.authenticated(
                Call(
                    principal,
                    rpc.request_id,
                    deadline=None if remaining is None else time.monotonic() + remaining,
                    traceparent=rpc.traceparent,
                )
            )
            return await handler(request, rpc)

        return run
