"""What the gRPC face's steps hand each other: an `Rpc` going in, a `Reply` coming out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from aiservices_server.call import Call, Principal
from aiservices_server.core.headers import Headers
from aiservices_server.faces.envelope import ToolOutcome

GrpcContext = grpc.aio.ServicerContext[Any, bytes]
"""grpc.aio's context for one of the face's methods: the request is whatever the method's
parser made of the bytes, and the response goes out as bytes the outermost interceptor
serialized."""


class Rpc:
    """One RPC as the face's steps see it, made by the outermost interceptor.

    Everything is fixed when it is made but `call`, which authentication sets exactly once;
    the outermost interceptor reads `caller` afterwards, so the access line says who called
    whatever happened next."""

    __slots__ = ("_call", "context", "headers", "method", "request_id", "traceparent")

    def __init__(
        self,
        method: str,
        request_id: str,
        headers: Headers,
        context: GrpcContext,
        traceparent: str | None = None,
    ) -> None:
        self.method = method
        self.request_id = request_id
        self.headers = headers
        self.context = context
        # The server span's traceparent when traces are on, else the caller's.
        self.traceparent = traceparent
        self._call: Call | None = None

    def authenticated(self, call: Call) -> None:
        if self._call is not None:
            raise RuntimeError("an RPC is authenticated once")
        self._call = call

    @property
    def call(self) -> Call:
        """The authenticated call; only steps inside authentication may ask for it."""
        if self._call is None:
            raise RuntimeError("the RPC is not authenticated")
        return self._call

    @property
    def caller(self) -> Principal | None:
        return None if self._call is None else self._call.principal


@dataclass(frozen=True, slots=True)
class Reply:
    """A response message, the headers to send as trailing metadata, and the tool outcome
    when a tool ran."""

    message: Message
    headers: Mapping[str, str] = field(default_factory=dict)
    outcome: ToolOutcome | None = None


Handler = Callable[[Any, Rpc], Awaitable[Reply]]
"""One step of a unary RPC: the request (a protobuf message) and the Rpc in, a Reply out."""


class Interceptor(Protocol):
    """One concern around the handlers: `wrap` returns the handler to run instead, once per
    method at start-up (like go-grpc-middleware's chain)."""

    def wrap(self, method: str, handler: Handler) -> Handler: ...
