"""The one shared HTTP transport for upstream calls.

httpx's transport interface on aiohttp: httpx's default transport costs far more CPU per call
and degrades with hundreds of slow calls in flight, and going through the transport rather than
httpx.AsyncClient skips per-request work the upstream call does not need (cookies, redirects,
auth flows, header merging): figures in docs/performance.md.

The transport never decompresses (it turns aiohttp's auto-decompression off) and httpx decodes
a body only when it is read with aread() or aiter_bytes(); the upstream client reads raw bytes
and asks for uncompressed replies, so a reply costs no more memory than its bytes on the wire.
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

KEEPALIVE_SECONDS = 30.0


def build_http_transport(*, max_connections: int) -> httpx.AsyncBaseTransport:
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return AiohttpTransport(limits=limits, trust_env=False)
