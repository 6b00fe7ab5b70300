"""uvicorn serving the MCP face in the server's own process and event loop."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp


class McpListener:
    """One uvicorn server for `app` on `host:port`, HTTPS when `certificate` is given (and
    client certificates required when `client_ca` is). Started and stopped by the server's own
    lifecycle: it installs no signal handlers and writes no access log of its own."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        certificate: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        tls: dict[str, object] = {}
        if certificate is not None:
            tls = {"ssl_certfile": str(certificate[0]), "ssl_keyfile": str(certificate[1])}
            if client_ca is not None:
                tls.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            **tls,  # type: ignore[arg-type]
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
        """Stop accepting, let requests in flight finish for up to `grace` seconds, close."""
        if self._socket is None:
            return
        self._config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._socket])
        self._socket = None
