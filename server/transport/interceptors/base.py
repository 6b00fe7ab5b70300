"""Unary interceptors, composed into one grpc.aio interceptor like go-grpc-middleware's chain.

grpc.aio awaits every registered interceptor on every call; registering one chain costs a
single hop, and each interceptor's wrapper is built once per method, not per call. Health
checking and reflection are never wrapped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

Context: TypeAlias = grpc.aio.ServicerContext
Behaviour = Callable[[Any, Context], Awaitable[Any]]

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


class UndecodableRequest:
    """Stands in for request bytes that did not parse, so an interceptor can refuse them with a
    proper status: left to grpc, the parser's exception becomes UNKNOWN with its text.

    `unexpected` holds an exception that is no parse error (a bug, not bad input), to be
    raised where the chain turns it into INTERNAL."""

    def __init__(self, unexpected: Exception | None = None) -> None:
        self.unexpected = unexpected


UNDECODABLE = UndecodableRequest()


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError):
            return UNDECODABLE
        except Exception as exc:
            return UndecodableRequest(exc)

    return deserialize


def _serializing(behaviour: Behaviour, serializer: Callable[[Any], bytes]) -> Behaviour:
    """`behaviour` answering with the serialized response. Serializing inside the chain means a
    response that does not serialize is an exception the interceptors see (INTERNAL, in the
    access log and metrics), not one grpc answers itself with UNKNOWN and the text."""

    async def run(request: Any, context: Context) -> bytes:
        return serializer(await behaviour(request, context))

    return run


class UnaryInterceptor:
    """One concern around unary calls: `wrap` returns the behaviour to run instead."""

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError


class InterceptorChain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs `interceptors` in order, the first outermost."""

    def __init__(self, interceptors: Sequence[UnaryInterceptor]) -> None:
        self._interceptors = list(interceptors)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """`behaviour` with every interceptor around it, as a call to `method` runs it."""
        for interceptor in reversed(self._interceptors):
            behaviour = interceptor.wrap(method, behaviour)
        return behaviour

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or is_open_method(method) or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary
        if handler.response_serializer is not None:
            behaviour = _serializing(behaviour, handler.response_serializer)
        wrapped = grpc.unary_unary_rpc_method_handler(
            self.wrap(method, behaviour),
            request_deserializer=_tolerant(handler.request_deserializer),
        )
        self._wrapped[method] = wrapped
        return wrapped
