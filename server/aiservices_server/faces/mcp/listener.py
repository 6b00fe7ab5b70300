"""uvicorn serving the MCP face in the server's own process and event loop, with a bound on
every connection.

uvicorn times out an idle keep-alive connection, but not one that sends nothing, or its headers
a byte at a time, and it accepts connections without limit: each holds a file descriptor, which
the upstream's connections need too. `BoundedHttpProtocol` adds the two bounds it lacks, on
uvicorn's own httptools protocol (passed as `Config(http=...)`): a deadline for the headers of
each request, and a cap on open connections past which a new one gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REFUSED_BODY = b'{"error": "too many connections: try again later"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)


@dataclass(frozen=True)
class ConnectionBounds:
    """How long a connection may take to send a request's headers (from when it opens, or from
    the first byte after the previous response), how long it may sit idle between requests, and
    how many may be open at once. `on_refused` is told of each connection refused at the cap."""

    header_timeout: float
    idle_timeout: int
    max_connections: int
    on_refused: Callable[[], None] = lambda: None


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap
    (`bounds`, set on a subclass made per listener by `bounded_protocol`)."""

    bounds: ClassVar[ConnectionBounds]
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.bounds.max_connections:
            self.bounds.on_refused()
            transport.write(_REFUSED)
            transport.close()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_deadline = self.loop.call_later(self.bounds.header_timeout, self._too_slow)

    def _stop_waiting(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        self.transport.close()


def bounded_protocol(bounds: ConnectionBounds) -> type[BoundedHttpProtocol]:
    return type("BoundedHttp", (BoundedHttpProtocol,), {"bounds": bounds})


class McpListener:
    """One uvicorn server for `app` on `host:port`, HTTPS when `certificate` is given (and
    client certificates required when `client_ca` is), every connection bounded by `bounds`.
    Started and stopped by the server's own lifecycle: it installs no signal handlers and writes
    no access log of its own."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        bounds: ConnectionBounds,
        *,
        certificate: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        tls: dict[str, Any] = {}
        if certificate is not None:
            tls = {"ssl_certfile": str(certificate[0]), "ssl_keyfile": str(certificate[1])}
            if client_ca is not None:
                tls.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=bounded_protocol(bounds),
            timeout_keep_alive=bounds.idle_timeout,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            **tls,
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None

    async def start(self) -> int:
        """Listen and serve; returns the bound port."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        self._socket = self._config.bind_socket()
        await self._server.startup(sockets=[self._socket])
        port: int = self._socket.getsockname()[1]
        return port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace` seconds, then close
        every connection still open, whatever it is doing."""
        if self._socket is None:
            return
        self._config.timeout_graceful_shutdown = int(grace)  # whole seconds, never past grace
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._socket])
        for connection in list(self._server.server_state.connections):
            connection.transport.close()
        self._socket = None
