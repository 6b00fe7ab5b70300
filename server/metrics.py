"""Prometheus metrics: the standard gRPC server series plus what operators need to see the
upstream and the limits. Each server has its own registry, so several can share a process.

Labels are bounded: method names, codes, tool names, outcomes, key ids; never user ids.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip


RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# Why a call was UNAUTHENTICATED: no authorization header; one that does not parse (or more
# than one); a well-formed key that is not configured.
UNAUTHENTICATED_REASONS = ("missing", "malformed", "unknown_key")


def _bound_text(bound: float) -> str:
    """`le` as prometheus_client's own histograms write it (1 -> "1.0")."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class _RpcSeries:
    """One method's counts: written by the event loop only, read by the scrape thread."""

    __slots__ = ("buckets", "created", "handled", "handled_created", "labels", "started", "sum")

    def __init__(self, method: str, bucket_count: int) -> None:
        _, service, name = method.split("/", 2) if method.count("/") == 2 else ("", "", method)
        self.labels = ("unary", service, name)
        self.created = time.time()
        self.started = 0
        self.handled: dict[str, int] = {}
        self.handled_created: dict[str, float] = {}
        # Per bucket, not cumulative, with +Inf last: one increment per observation.
        self.buckets = [0] * (bucket_count + 1)
        self.sum = 0.0


class RpcCollector:
    """The per-RPC series (grpc_server_started, _handled and _handling_seconds).

    prometheus_client's Counter and Histogram take a lock per increment and walk the buckets in
    Python: about a tenth of a trivial RPC's CPU. All RPCs are counted on the event loop thread,
    so plain integers suffice; a scrape reads them from its own thread, and the histogram's
    count is summed from its buckets, so a scrape always sees a consistent histogram.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._series: dict[str, _RpcSeries] = {}

    def series(self, method: str) -> _RpcSeries:
        series = self._series.get(method)
        if series is None:
            series = self._series[method] = _RpcSeries(method, len(self._bounds))
        return series

    def observe(self, series: _RpcSeries, code: str, seconds: float) -> None:
        handled = series.handled
        count = handled.get(code)
        if count is None:
            series.handled_created[code] = time.time()
            count = 0
        handled[code] = count + 1
        series.buckets[bisect_left(self._bounds, seconds)] += 1
        series.sum += seconds

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "grpc_server_started", "RPCs started on the server.", labels=RPC_LABELS
            ),
            CounterMetricFamily(
                "grpc_server_handled",
                "RPCs completed on the server, by status code.",
                labels=(*RPC_LABELS, "grpc_code"),
            ),
            HistogramMetricFamily(
                "grpc_server_handling_seconds",
                "Time to handle an RPC on the server.",
                labels=RPC_LABELS,
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        started, handled, handling = self._families()
        bounds = [*map(_bound_text, self._bounds), "+Inf"]
        for series in list(self._series.values()):
            started.add_metric(series.labels, series.started, created=series.created)
            created = series.handled_created
            for code, count in list(series.handled.items()):
                handled.add_metric([*series.labels, code], count, created=created.get(code))
            cumulative, total = [], 0
            for bound, count in zip(bounds, list(series.buckets), strict=True):
                total += count
                cumulative.append((bound, total))
            handling.add_metric(series.labels, cumulative, sum_value=series.sum)
        yield started
        yield handled
        yield handling


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rpcs = RpcCollector(LATENCY_BUCKETS)
        registry.register(self.rpcs)
        self.tool_calls = Counter(
            "aiservices_tool_calls",
            "Tool calls that ran, by tool, outcome (OK or the tool error code) and key id.",
            ("tool", "outcome", "key_id"),
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
        self.rate_limit_store_up = Gauge(
            "aiservices_rate_limit_store_up",
            "1 while rate-limit decisions come from Redis (or no Redis is configured); "
            "0 while they fail open to the in-memory limiter.",
            registry=registry,
        )
        self.unauthenticated_refusals = Counter(
            "aiservices_unauthenticated_refusals",
            "Calls refused as UNAUTHENTICATED, by reason (missing, malformed, unknown_key); "
            "counted even when their access-log lines are sampled away.",
            ("reason",),
            registry=registry,
        )
        self._unauthenticated_children = {
            reason: self.unauthenticated_refusals.labels(reason)
            for reason in UNAUTHENTICATED_REASONS
        }
        self._tool_call_children: dict[tuple[str, str, str], Any] = {}
        self._upstream_children: dict[str, Any] = {}
        self._http: WSGIServer | None = None

    def rpc_started(self, method: str) -> _RpcSeries:
        """Count the start; hand the series back to `rpc_handled` at the end of the call."""
        series = self.rpcs.series(method)
        series.started += 1
        return series

    def rpc_handled(self, series: _RpcSeries, code: str, seconds: float) -> None:
        self.rpcs.observe(series, code, seconds)

    def unauthenticated_refusal(self, reason: str) -> None:
        self._unauthenticated_children[reason].inc()

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
