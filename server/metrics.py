"""Prometheus metrics: the standard gRPC server series plus what operators need to see the
upstream and the limits. Each server has its own registry, so several can share a process.

Labels are bounded: method names, codes, tool names, outcomes, key ids; never user ids.
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server.",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tool_calls = Counter(
            "aiservices_tool_calls",
            "Tool calls that ran, by tool, outcome (OK or the tool error code) and key id.",
            ("tool", "outcome", "key_id"),
            registry=registry,
        )
        self.upstream_requests = Histogram(
            "aiservices_upstream_request_seconds",
            "Upstream HTTP attempts by status (HTTP code, timeout, unavailable, cancelled).",
            ("status",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "aiservices_tool_calls_in_flight", "Tool calls running now.", registry=registry
        )
        self.in_flight_limit = Gauge(
            "aiservices_tool_calls_in_flight_limit",
            "The bound on tool calls in flight.",
            registry=registry,
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
        self._rpc_children: dict[str, tuple[Any, Any, str, str]] = {}
        self._handled_children: dict[tuple[str, str], Any] = {}
        self._tool_call_children: dict[tuple[str, str, str], Any] = {}
        self._upstream_children: dict[str, Any] = {}
        self._http: WSGIServer | None = None

    def _children(self, method: str) -> tuple[Any, Any, str, str]:
        """Labelled children cached per method: labels() is too slow for every RPC."""
        children = self._rpc_children.get(method)
        if children is None:
            _, service, name = method.split("/", 2) if method.count("/") == 2 else ("", "", method)
            labels = ("unary", service, name)
            children = (self.started.labels(*labels), self.handling.labels(*labels), service, name)
            self._rpc_children[method] = children
        return children

    def rpc_started(self, method: str) -> None:
        self._children(method)[0].inc()

    def rpc_handled(self, method: str, code: str, seconds: float) -> None:
        _, handling, service, name = self._children(method)
        handling.observe(seconds)
        handled = self._handled_children.get((method, code))
        if handled is None:
            handled = self.handled.labels("unary", service, name, code)
            self._handled_children[(method, code)] = handled
        handled.inc()

    def tool_call(self, tool: str, outcome: str, key_id: str) -> None:
        labels = (tool, outcome, key_id)
        child = self._tool_call_children.get(labels)
        if child is None:
            child = self._tool_call_children[labels] = self.tool_calls.labels(*labels)
        child.inc()

    def upstream_request(self, status: str, seconds: float) -> None:
        child = self._upstream_children.get(status)
        if child is None:
            child = self._upstream_children[status] = self.upstream_requests.labels(status)
        child.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port in a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
