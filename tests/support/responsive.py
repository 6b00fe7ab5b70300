"""Proof that one hostile call cannot stall the server for everyone else.

`responsive_during` sends the hostile call from a thread and, from that moment until it is over,
sends health checks on a channel of their own: each must answer within `PROBE_LIMIT`. A server
whose event loop is held by the hostile call (parsing it, checking it, or reading the upstream's
answer to it) answers them only when the call lets go, and the check fails.

A probe stalls when it waited longer than the limit *and* the event-loop thread was on a CPU for
longer than the limit of that wait: the loop was busy with something else all along. A probe
that waited only because the machine had no core free for the server (another test run beside
this one, say) is no stall of the server's making, and a held loop is caught either way.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.servers import ServerThread

T = TypeVar("T")

# What "stays responsive" means: a health check sent during the hostile call answers this fast.
PROBE_LIMIT = 0.1
CALL_TOOL = "/aiservices.v1.ToolService/CallTool"


def rpcs_started(server: ServerThread, method: str = CALL_TOOL) -> float:
    """How many calls of `method` the server has begun handling (its own metrics say)."""
    service, name = method.strip("/").split("/")
    value = server.server.metrics.registry.get_sample_value(
        "grpc_server_started_total",
        {"grpc_type": "unary", "grpc_service": service, "grpc_method": name},
    )
    return value or 0.0


@dataclass(frozen=True)
class Probe:
    waited: float
    """Seconds the health check took, end to end."""
    loop_busy: float
    """CPU seconds the server's event-loop thread used meanwhile."""

    @property
    def stalled(self) -> float:
        """How long the loop was held while this probe waited (both bounds must be passed)."""
        return min(self.waited, self.loop_busy)


def _probe(server: ServerThread, stub: health_pb2_grpc.HealthStub) -> Probe:
    busy = server.loop_cpu_seconds()
    began = time.perf_counter()
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    waited = time.perf_counter() - began
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return Probe(waited, server.loop_cpu_seconds() - busy)


def responsive_during(
    server: ServerThread,
    hostile: Callable[[], T],
    *,
    probes: int = 3,
    limit: float = PROBE_LIMIT,
) -> T:
    """Run `hostile()`, probe health until it returns, and return its result.

    Fails when any probe takes longer than `limit` seconds; an exception from `hostile` (a
    refusal the test expects, say) is raised after that check. Probes go out back to back from
    the moment the call is sent until it is over, at least `probes` of them.
    """
    # The server shares this process: objects the test run has piled up so far are frozen, as
    # `aiservices-server` freezes its start-up objects, so a full collection of them is not
    # mistaken for the server stalling.
    gc.collect()
    gc.freeze()
    try:
        sent: list[Probe] = []
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            _probe(server, stub)  # connected and warm: later latencies are the server's alone
            with ThreadPoolExecutor(max_workers=1) as pool:
                outcome: Future[T] = pool.submit(hostile)
                while len(sent) < probes or not outcome.done():
                    sent.append(_probe(server, stub))
                failure = outcome.exception(timeout=60)
    finally:
        gc.unfreeze()
    worst = max(sent, key=lambda probe: probe.stalled)
    assert worst.stalled < limit, (
        f"a health check took {worst.waited * 1000:.0f} ms while the call ran, and the event "
        f"loop was busy for {worst.loop_busy * 1000:.0f} ms of it"
    )
    if failure is not None:
        raise failure
    return outcome.result()
