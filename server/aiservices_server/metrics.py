"""Prometheus metrics: the standard gRPC server series, the process and platform series, and
what operators need to see the upstream and the limits. Each server has its own registry, so
several can share a process.

Labels are bounded: method names, codes, tool names, outcomes, key ids; never user ids.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from aiservices_server.healthz import HEALTH_PATH, health_answer
from aiservices_server.upstream.refiner import UpstreamAttempt

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip


RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

RpcLabels = tuple[str, str, str]
"""Values of `RPC_LABELS` for one method."""

# Why a call was UNAUTHENTICATED: no authorization header; one that does not parse (or more
# than one); a well-formed key that is not configured.
UNAUTHENTICATED_REASONS = ("missing", "malformed", "unknown_key")


def rpc_labels(method: str) -> RpcLabels:
    """`/package.Service/Method` as (`unary`, `package.Service`, `Method`)."""
    if method.count("/") == 2:
        _, service, name = method.split("/")
        return "unary", service, name
    return "unary", "", method


METRICS_MAX_CONNECTIONS = 16
"""Scrapers are few, and each open connection holds a thread and a file descriptor."""
METRICS_TIMEOUT = 10.0
"""Seconds any one read or write on a metrics connection may take."""


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT  # socketserver sets it on each connection: a silent one is dropped

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _with_health(metrics: WSGIApplication, serving: Callable[[], bool]) -> WSGIApplication:
    """`metrics`, with GET /healthz answered as `serving()` says (see `healthz`)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics(environ, start_response)
        status, data = health_answer(serving())
        reason = "OK" if status == 200 else "Service Unavailable"
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        start_response(f"{status} {reason}", [*headers, ("Content-Length", str(len(data)))])
        return [data]

    return app


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most METRICS_MAX_CONNECTIONS of them; one more is closed at
    once and reported to `on_refused`."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_refused: Callable[[], None] = lambda: None
        self._open = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._open.acquire(blocking=False):
            return True
        self.on_refused()
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.rpcs_started = Counter(
            "grpc_server_started", "RPCs started on the server.", RPC_LABELS, registry=registry
        )
        self.rpcs_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*RPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.rpc_handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server.",
            RPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tool_calls = Counter(
            "aiservices_tool_calls",
            "Tool calls that ran, by tool, outcome (OK or the tool error code), key id and "
            "transport (grpc, mcp).",
            ("tool", "outcome", "key_id", "transport"),
            registry=registry,
        )
        self.mcp_requests = Counter(
            "aiservices_mcp_requests",
            "MCP requests by JSON-RPC method and code (OK or the refusal, as gRPC names it).",
            ("method", "code"),
            registry=registry,
        )
        self.mcp_handling = Histogram(
            "aiservices_mcp_request_seconds",
            "Time to handle an MCP request, by JSON-RPC method.",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_requests = Histogram(
            "aiservices_upstream_request_seconds",
            "Upstream HTTP attempts by status (HTTP code, timeout, unavailable, cancelled, "
            "too_large, invalid, error).",
            ("status",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_tokens = Counter(
            "aiservices_upstream_tokens",
            "Model tokens the upstream reported for tool calls, by kind (prompt, completion).",
            ("kind",),
            registry=registry,
        )
        self.in_flight = Gauge(
            "aiservices_tool_calls_in_flight",
            "Tool calls running now.",
            registry=registry,
            multiprocess_mode="livesum",  # with workers: in all of them
        )
        self.in_flight_limit = Gauge(
            "aiservices_tool_calls_in_flight_limit",
            "The bound on tool calls in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.overloaded = Counter(
            "aiservices_overloaded_refusals",
            "Calls refused because the in-flight bound was full.",
            registry=registry,
        )
        self.rate_limited = Counter(
            "aiservices_rate_limit_refusals",
            "Calls refused by the rate limiter, by tool and key id.",
            ("tool", "key_id"),
            registry=registry,
        )
        self.redis_fallbacks = Counter(
            "aiservices_rate_limit_redis_fallbacks",
            "Rate-limit decisions served by the in-memory limiter because Redis failed.",
            registry=registry,
        )
        self.rate_limit_store_up = Gauge(
            "aiservices_rate_limit_store_up",
            "1 while rate-limit decisions come from Redis (or no Redis is configured); "
            "0 while they fail open to the in-memory limiter.",
            registry=registry,
            multiprocess_mode="livemin",  # with workers: 0 while any of them fails open
        )
        self.unauthenticated_refusals = Counter(
            "aiservices_unauthenticated_refusals",
            "Calls refused as UNAUTHENTICATED, by reason (missing, malformed, unknown_key); "
            "counted even when their access-log lines are sampled away.",
            ("reason",),
            registry=registry,
        )
        self.connections_refused = Counter(
            "aiservices_connections_refused",
            "Connections closed at once because their listener (mcp, metrics) had as many open "
            "as it allows.",
            ("listener",),
            registry=registry,
        )
        self.spans_dropped = Counter(
            "aiservices_trace_spans_dropped",
            "Trace spans not exported: the export queue was full, or the collector did not "
            "take them (down, slow or refusing). Calls never wait for the collector.",
            registry=registry,
        )
        for reason in UNAUTHENTICATED_REASONS:
            self.unauthenticated_refusals.labels(reason)  # exported as 0 from the start
        self._http: WSGIServer | None = None

    def rpc_started(self, method: str) -> RpcLabels:
        """Count the start; hand the labels back to `rpc_handled` at the end of the call."""
        labels = rpc_labels(method)
        self.rpcs_started.labels(*labels).inc()
        return labels

    def rpc_handled(self, labels: RpcLabels, code: str, seconds: float) -> None:
        self.rpcs_handled.labels(*labels, code).inc()
        self.rpc_handling.labels(*labels).observe(seconds)

    def unauthenticated_refusal(self, reason: str) -> None:
        self.unauthenticated_refusals.labels(reason).inc()

    def tool_call(
        self,
        tool: str,
        outcome: str,
        key_id: str,
        transport: str,
        upstream: UpstreamAttempt | None = None,
    ) -> None:
        """A tool call that ran, and the model's tokens its last upstream attempt reported."""
        self.tool_calls.labels(tool, outcome, key_id, transport).inc()
        if upstream is not None and upstream.tokens is not None:
            prompt, completion = upstream.tokens
            self.upstream_tokens.labels("prompt").inc(prompt)
            self.upstream_tokens.labels("completion").inc(completion)

    def mcp_request(self, method: str, code: str, seconds: float) -> None:
        self.mcp_requests.labels(method, code).inc()
        self.mcp_handling.labels(method).observe(seconds)

    def upstream_request(self, status: str, seconds: float) -> None:
        self.upstream_requests.labels(status).observe(seconds)

    def serve(
        self,
        host: str,
        port: int,
        on_refused: Callable[[], None] | None = None,
        serving: Callable[[], bool] = lambda: True,
    ) -> int:
        """Expose /metrics, and /healthz as `serving()` says, on host:port in a daemon thread;
        returns the bound port. At most METRICS_MAX_CONNECTIONS connections are open at once,
        each read or write bounded by METRICS_TIMEOUT; `on_refused` hears of each connection
        closed at the cap."""
        self._http = serve_registry(self.registry, host, port, on_refused, serving)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            close_listener(self._http)
            self._http = None


def serve_registry(
    registry: CollectorRegistry,
    host: str,
    port: int,
    on_refused: Callable[[], None] | None = None,
    serving: Callable[[], bool] = lambda: True,
) -> WSGIServer:
    """The metrics listener of `Metrics.serve`, for any registry (the workers' supervisor
    serves all workers' metrics this way); `close_listener` stops it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    app = _with_health(make_wsgi_app(registry), serving)
    server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    assert isinstance(server, _MetricsServer)
    if on_refused is not None:
        server.on_refused = on_refused
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def close_listener(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()
