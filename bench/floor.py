"""The floor: the least that authentication, rate limiting, metrics and an access line can cost.

One grpc.aio interceptor for the bare baseline (``python -m bench.baseline --floor``) that does
what issue 5 asks the real stack to do on every GetStatus, and nothing more: find the bearer
key in a dict, take one GCRA step for it, count the call in plain integers (a counter and a
histogram bucket) and queue one JSON access line, written in batches. No per-call objects, no
validation of other metadata, no request id, no error details.

It answers how much of the 0.95 GetStatus target any Python implementation of those four
concerns leaves: the real server is measured against both the bare baseline and this floor
(``python -m bench.compare status 3 --floor prod:``, ``python -m bench.instructions status
--floor``).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
import tomllib
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FLUSH_AFTER_SECONDS = 0.01
BURST = 1_000_000
PER_MINUTE = 6_000_000

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class FloorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each method's handler once, as the server's InterceptorChain does; written out
    here rather than shared, so the floor stays independent of the code it is compared with."""

    def __init__(self, keys_file: Path) -> None:
        keys = tomllib.loads(keys_file.read_text())["keys"]
        self._ids_by_hash = {key["hash"]: key["id"] for key in keys}
        # "Bearer <key>" -> key id once hashed, as the real server caches accepted headers.
        self._accepted: dict[str, str] = {}
        self._interval = 60.0 / PER_MINUTE
        self._tolerance = self._interval * (BURST - 1)
        self._tats: dict[str, float] = {}
        self.calls = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._lines: list[str] = []
        self._flush_scheduled = False
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is None:
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler  # unknown method or not unary: grpc answers as usual
            cached = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return cached

    def _wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            key_id = None
            for name, value in context.invocation_metadata() or ():
                if name == "authorization":
                    key_id = self._accepted.get(value) or self._authenticate(value)
            if key_id is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
            now = time.monotonic()
            tat = max(self._tats.get(key_id, now), now) + self._interval  # type: ignore[arg-type]
            if tat - now > self._tolerance + self._interval:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited")
            self._tats[key_id] = tat  # type: ignore[index]
            response = await behaviour(request, context)
            seconds = time.perf_counter() - started
            self.calls += 1
            self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._log(
                f'{{"ts":{time.time():.3f},"method":"{method}","code":"OK",'
                f'"duration_ms":{seconds * 1000:.3f},"key_id":"{key_id}"}}'
            )
            return response

        return run

    def _authenticate(self, header: str) -> str | None:
        scheme, _, key = header.partition(" ")
        if scheme != "Bearer":
            return None
        digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        key_id = self._ids_by_hash.get(digest)
        if key_id is not None:
            self._accepted[header] = key_id
        return key_id

    def _log(self, line: str) -> None:
        self._lines.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_AFTER_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        lines, self._lines = self._lines, []
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
