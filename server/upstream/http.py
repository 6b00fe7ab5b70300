"""The one shared HTTP transport for upstream calls, and what each attempt came to.

httpx-aiohttp's transport: httpx's default transport costs far more CPU per call and degrades
with hundreds of slow calls in flight (figures in docs/performance.md).

The transport never decompresses (it turns aiohttp's auto-decompression off) and httpx decodes
a body only when it is read with aread() or aiter_bytes(); the upstream clients read raw bytes
and ask for uncompressed replies, so a reply costs no more memory than its bytes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from httpx_aiohttp import AiohttpTransport

KEEPALIVE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamAttempt:
    """What one HTTP attempt to an upstream came to, and how long it took.

    `status` is the HTTP status code ("200", "503"...) or, when no status was read, one of
    timeout, unavailable, cancelled, too_large, invalid or error.
    """

    status: str
    seconds: float


def build_http_transport(*, max_connections: int) -> httpx.AsyncBaseTransport:
    """The transport every upstream call goes through: at most `max_connections` open, idle
    ones kept 30 s, no proxy or netrc settings read from the environment.

    Requests are built as `httpx.Request`s and sent with `handle_async_request`, so nothing
    follows redirects or keeps cookies. Each attempt runs under one `asyncio.timeout`, bounded by
    the caller's deadline, which covers connecting, sending and reading together.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return AiohttpTransport(limits=limits, trust_env=False)
