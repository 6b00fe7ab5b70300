"""A loopback TCP proxy that delays every byte: a slow network in front of a real server.

`SlowProxy(port).start()` listens on 127.0.0.1 (a free port) and forwards each connection to
127.0.0.1:`port`. Every chunk is held for half of `rtt` seconds in each direction, so a request
and its reply take one `rtt` more than without the proxy; chunks keep their order and are
pipelined (a delay, not a bandwidth limit). `rtt` may change at any time and applies to bytes
read after the change.

It runs on its own event loop in a daemon thread, so synchronous and asyncio tests (and server
processes) can all use it. Bounded: at most `max_connections` connections, 64 KiB per read and
at most 64 reads queued per direction (a full queue stops reading, like a full socket buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any, Self

HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
QUEUED_CHUNKS = 64


class SlowProxy:
    def __init__(self, target_port: int, *, rtt: float = 0.0, max_connections: int = 64) -> None:
        self.target_port = target_port
        self.rtt = rtt
        self.port = 0
        self._max_connections = max_connections
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(self) -> Self:
        self._thread.start()
        self._run(self._listen())
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        if not self._thread.is_alive():
            return
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(HOST, self.target_port)
        try:
            directions = [
                asyncio.ensure_future(self._pipe(client_in, server_out)),
                asyncio.ensure_future(self._pipe(server_in, client_out)),
            ]
            try:
                # Either side closing ends the connection, as a crash would.
                await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for direction in directions:
                    direction.cancel()
                await asyncio.gather(*directions, return_exceptions=True)
        finally:
            server_out.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

        async def read() -> None:
            while chunk := await source.read(CHUNK_BYTES):
                await queue.put((time.monotonic() + self.rtt / 2, chunk))
            await queue.put((0.0, b""))

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                sink.write(chunk)
                await sink.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reading
