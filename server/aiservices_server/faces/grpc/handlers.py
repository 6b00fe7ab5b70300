"""Registers a service's methods with grpc.aio, each behind the face's interceptors.

The chain is built once per method at start-up, the outermost interceptor first, then the
others in order, then the method's handler. Requests that do not parse are refused after
authentication, like any other bad request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from aiservices_server.errors import InvalidArgument
from aiservices_server.faces.grpc.rpc import Handler, Interceptor, Reply, Rpc

if TYPE_CHECKING:
    from aiservices_server.faces.grpc.outermost import OutermostInterceptor


@dataclass(frozen=True, slots=True)
class Method:
    """How to run one method: parse its request bytes, then handle the request."""

    parse: Callable[[bytes], Any]
    handle: Handler


class UndecodableRequest:
    """Stands in for request bytes that did not parse. Left to grpc, the parser's exception
    would be UNKNOWN with its text; `unexpected` holds an exception that is no parse error (a
    bug, not bad input), raised where the outermost interceptor makes it INTERNAL."""

    def __init__(self, unexpected: Exception | None = None) -> None:
        self.unexpected = unexpected


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, RecursionError, ValueError):
            return UndecodableRequest()
        except Exception as exc:
            return UndecodableRequest(exc)

    return run


def _parsed_only(handler: Handler) -> Handler:
    async def run(request: Any, rpc: Rpc) -> Reply:
        if isinstance(request, UndecodableRequest):
            if request.unexpected is not None:
                raise request.unexpected
            raise InvalidArgument(
                "the request could not be decoded (too deeply nested or malformed)"
            )
        return await handler(request, rpc)

    return run


def generic_handler(
    service: str,
    methods: Mapping[str, Method],
    outermost: OutermostInterceptor,
    interceptors: Sequence[Interceptor],
) -> grpc.GenericRpcHandler:
    """`service`'s methods for `grpc.aio.Server.add_generic_rpc_handlers`."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, bytes]] = {}
    for name, method in methods.items():
        path = f"/{service}/{name}"
        handler = _parsed_only(method.handle)
        for interceptor in reversed(interceptors):
            handler = interceptor.wrap(path, handler)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            outermost.wrap(path, handler), request_deserializer=_tolerant(method.parse)
        )
    return grpc.method_handlers_generic_handler(service, handlers)
