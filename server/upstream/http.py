"""The one shared HTTP client for upstream calls.

httpx's API on aiohttp's transport: the default httpx transport costs far more CPU per call
and degrades with hundreds of slow calls in flight (figures in README, Performance).
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

KEEPALIVE_SECONDS = 30.0


def build_http_client(*, max_connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(timeout),
        limits=limits,
        trust_env=False,
        follow_redirects=False,
    )
