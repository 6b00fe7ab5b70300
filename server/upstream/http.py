"""The one shared HTTP client for upstream calls, and what each attempt came to.

An `httpx.AsyncClient` over httpx-aiohttp's transport: httpx's default transport costs far
more CPU per call and degrades with hundreds of slow calls in flight (figures in
docs/performance.md).

The transport never decompresses (it turns aiohttp's auto-decompression off) and httpx decodes
a body only when it is read with aread() or aiter_bytes(); the upstream clients read raw bytes
and ask for uncompressed replies, so a reply costs no more memory than its bytes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from http.client import HTTPResponse
from http.cookiejar import Cookie, CookieJar
from urllib.request import Request

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


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing: upstreams are APIs, and a cookie one of them sets
    would otherwise grow the shared client's jar without bound and be sent back on every call.
    Refusing here, rather than by policy, also skips parsing each reply's Set-Cookie headers."""

    def extract_cookies(self, response: HTTPResponse, request: Request) -> None:
        """Keeps nothing from the reply."""

    def set_cookie(self, cookie: Cookie) -> None:
        """Keeps nothing."""


def build_http_client(*, max_connections: int) -> httpx.AsyncClient:
    """A client for every upstream call: at most `max_connections` open, idle ones kept 30 s.

    It sets no timeouts of its own: each attempt runs under one `asyncio.timeout`, bounded by
    the caller's deadline, which covers connecting, sending and reading together. It never
    follows redirects, reads no proxy or netrc settings from the environment, and keeps no
    cookies (see NoCookies).
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=None,
        follow_redirects=False,
        trust_env=False,
        cookies=NoCookies(),
    )
