"""uvicorn serving the MCP face in the server's own process and event loop, with a bound on
every connection.

uvicorn times out an idle keep-alive connection, but not one that sends nothing, or its headers
a byte at a time, and the event loop accepts connections without limit and gives a TLS
handshake a minute: each connection holds a file descriptor, which the upstream's connections
need too. So the listener accepts connections itself (`loop.sock_accept`), closes one past
`max_connections` at once (with a 503 when it is plain HTTP), gives the TLS handshake
`header_timeout`, and hands the rest to uvicorn's protocol (`loop.connect_accepted_socket`);
`BoundedHttpProtocol`, uvicorn's own httptools protocol passed as `Config(http=...)`, adds a
deadline for the headers of each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("aiservices.server")
ACCEPT_RETRY_SECONDS = 1.0
_REFUSED_BODY = b'{"error": "too many connections: try again later"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)


@dataclass(frozen=True)
class ConnectionBounds:
    """How long a connection may take for its TLS handshake and then for a request's headers
    (from when it opens, or from the first byte after the previous response), how long it may
    sit idle between requests, and how many may be open at once (handshakes included).
    `on_refused` is told of each connection refused at the cap."""

    header_timeout: float
    idle_timeout: int
    max_connections: int
    on_refused: Callable[[], None] = lambda: None


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers (`bounds` is
    set on a subclass made per listener)."""

    bounds: ClassVar[ConnectionBounds]
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
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
        reuse_port: bool = False,
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
            http=type(
                "BoundedHttp",
                (BoundedHttpProtocol,),
                {"bounds": bounds},
            ),
            timeout_keep_alive=bounds.idle_timeout,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            **tls,
        )
        self._server = uvicorn.Server(self._config)
        self._reuse_port = reuse_port
        self._bounds = bounds
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen and serve; returns the bound port."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        self._socket = self._bind()
        self._socket.listen(self._config.backlog)
        self._socket.setblocking(False)
        await self._server.startup(sockets=[])  # uvicorn's state; the accepting is done here
        self._accepting = asyncio.ensure_future(self._accept(self._socket))
        port: int = self._socket.getsockname()[1]
        return port

    def _bind(self) -> socket.socket:
        """The listening socket, as uvicorn binds one, shared with other workers on request."""
        if not self._reuse_port:
            return self._config.bind_socket()
        host, port = self._config.host, self._config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host.strip("[]"), port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listening)
            except (ConnectionAbortedError, InterruptedError):  # the client left first
                continue
            except OSError as exc:
                # Out of descriptors or memory: try again in a while, as asyncio's own servers do,
                # rather than stop accepting for good.
                log.error("MCP connections not accepted for now", extra={"error": exc.strerror})
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            # Those served (uvicorn's own count) and those still in their TLS handshake.
            held = len(self._server.server_state.connections) + len(self._handshakes)
            if held >= self._bounds.max_connections:
                self._bounds.on_refused()
                self._refuse(connection)
                continue
            handshake = loop.create_task(self._connect(loop, connection))
            self._handshakes.add(handshake)
            handshake.add_done_callback(self._handshakes.discard)

    def _refuse(self, connection: socket.socket) -> None:
        """Close at once; a plain-HTTP client is told why first (whatever fits in the send
        buffer of a fresh connection, which is all of it)."""
        with connection, contextlib.suppress(OSError):
            if self._config.ssl is None:
                connection.setblocking(False)
                connection.send(_REFUSED)

    async def _connect(self, loop: asyncio.AbstractEventLoop, connection: socket.socket) -> None:
        """Hand the connection to uvicorn's protocol, after the TLS handshake when there is one;
        a handshake that fails or takes longer than the header deadline closes it."""
        tls = self._config.ssl
        try:
            await loop.connect_accepted_socket(
                self._protocol,
                connection,
                ssl=tls,
                ssl_handshake_timeout=self._bounds.header_timeout if tls is not None else None,
            )
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception:  # a failed or slow handshake, or a client that left: nothing to serve
            connection.close()

    def _protocol(self) -> asyncio.Protocol:
        protocol: asyncio.Protocol = self._config.http_protocol_class(  # type: ignore[call-arg]
            config=self._config,
            server_state=self._server.server_state,
            app_state=self._server.lifespan.state,
        )
        return protocol

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace` seconds, then close
        every connection still open, whatever it is doing."""
        if self._socket is None:
            return
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        for handshake in list(self._handshakes):
            handshake.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        self._config.timeout_graceful_shutdown = int(grace)  # whole seconds, never past grace
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._socket])
        for connection in list(self._server.server_state.connections):
            connection.transport.close()
        self._socket = None
