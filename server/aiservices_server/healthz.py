"""`GET /healthz`, for load balancers and probes that speak HTTP but not gRPC health: 200 while
the server serves, 503 once it drains. The MCP listener and the metrics listener answer it the
same way, with no key, and it is no call: no access line, no metric."""

from __future__ import annotations

HEALTH_PATH = "/healthz"
SERVING = b'{"status":"SERVING"}'
NOT_SERVING = b'{"status":"NOT_SERVING"}'


def health_answer(serving: bool) -> tuple[int, bytes]:
    """The HTTP status and JSON body of GET /healthz."""
    return (200, SERVING) if serving else (503, NOT_SERVING)
