"""Fault injection: the real server against the real HTTP stand-in upstream misbehaving.

Deadlines, cancellation, timeouts, resets, refused connections, 429/503 with Retry-After,
garbage, the bound on calls in flight, traceparent forwarding and hundreds of slow calls at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiservices import AsyncToolClient, ToolClient, ToolResult, ToolServiceError
from tests.standin import (
    Exchange,
    Garbage,
    Hang,
    Refine,
    Reset,
    Scenario,
    Slow,
    StandinUpstream,
    Status,
)
from tests.support.keys import TestKeys
from tests.support.servers import ServerThread, make_settings
from tests.support.waiting import closed_port, wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
# Long enough that only the behaviour under test, never the configured timeout, ends a call.
PATIENT = 60.0


def upstream_attempts(server: ServerThread, status: str) -> float:
    """How many upstream HTTP attempts ended with `status`, as the metrics report them."""
    value = server.server.metrics.registry.get_sample_value(
        "aiservices_upstream_request_seconds_count", {"status": status}
    )
    return value or 0.0


def in_flight(server: ServerThread) -> float:
    value = server.server.metrics.registry.get_sample_value("aiservices_tool_calls_in_flight")
    assert value is not None
    return value


def tool_error(result: ToolResult, code: str) -> Any:
    assert result.is_error, result.structured_content
    assert result.error is not None
    assert result.error.code == code, result.error
    return result.error


@pytest.fixture
def patient(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """A server whose own upstream timeout is far away: the caller's deadline decides."""
    settings = make_settings(upstream.url, upstream_timeout=PATIENT, rate_limit_burst=100_000)
    with ServerThread(settings) as running:
        yield running


@pytest.fixture
def patient_client(patient: ServerThread, keys: TestKeys) -> Iterator[ToolClient]:
    with ToolClient(patient.target, api_key=keys.editor, timeout=10.0) as tool_client:
        yield tool_client


# --- deadlines and cancellation ---------------------------------------------------------


def test_slow_upstream_beyond_the_deadline_is_deadline_exceeded_and_the_request_is_dropped(
    patient: ServerThread, patient_client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Slow(30.0))
    started = time.monotonic()
    with pytest.raises(ToolServiceError) as caught:
        patient_client.call_tool(TOOL, ARGUMENTS, timeout=0.5)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED

    # The upstream request is abandoned at the deadline: long before Slow(30) would answer and
    # the server's own 60 s upstream timeout would fire.
    assert upstream.wait_for_disconnects(1, timeout=5), "the upstream request outlived the deadline"
    assert wait_until(lambda: upstream.in_flight == 0, timeout=5)
    assert time.monotonic() - started < 10
    assert wait_until(lambda: in_flight(patient) == 0, timeout=5), "a gate slot leaked"


async def test_a_caller_that_cancels_drops_the_upstream_request_and_the_server_keeps_serving(
    patient: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    async with AsyncToolClient(patient.target, api_key=keys.editor, timeout=30) as client:
        call = asyncio.create_task(client.call_tool(TOOL, ARGUMENTS))
        assert await upstream.until_requests(1, timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

        assert await upstream.until_disconnects(1, timeout=5), "the upstream request leaked"
        result = await client.call_tool(TOOL, ARGUMENTS, timeout=10)
        assert not result.is_error, result.text
    assert upstream.request_count == 2
    assert upstream.in_flight == 0
    assert in_flight(patient) == 0


def test_a_hanging_upstream_is_a_retryable_upstream_timeout(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    settings = make_settings(upstream.url, upstream_timeout=0.5)
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=PATIENT) as client,
    ):
        error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_TIMEOUT")
        assert error.retryable
        assert upstream.wait_for_disconnects(1, timeout=5)
        assert upstream.request_count == 1, "a timed-out request must not be sent again"
        assert upstream_attempts(running, "timeout") == 1


# --- connection failures ----------------------------------------------------------------


def test_a_reset_connection_is_upstream_unavailable_and_not_retried(
    patient_client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Reset())
    error = tool_error(patient_client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_UNAVAILABLE")
    assert error.retryable
    # The request had been sent: running the prompt twice is not safe, so no retry.
    assert upstream.request_count == 1


@pytest.mark.parametrize(("retries", "attempts"), [(1, 2), (0, 1)])
def test_a_refused_connection_is_retried_then_upstream_unavailable(
    keys: TestKeys, retries: int, attempts: int
) -> None:
    settings = make_settings(f"http://127.0.0.1:{closed_port()}", upstream_retries=retries)
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as client,
    ):
        error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_UNAVAILABLE")
        assert error.retryable
        assert upstream_attempts(running, "unavailable") == attempts


# --- status codes and Retry-After -------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_inside_the_deadline_is_retried_once_and_succeeds(
    patient_client: ToolClient, upstream: StandinUpstream, status: int
) -> None:
    upstream.push(Status(status, headers={"Retry-After": "1"}))
    result = patient_client.call_tool(TOOL, ARGUMENTS, timeout=10)
    assert not result.is_error, result.text
    assert upstream.request_count == 2


@pytest.mark.parametrize(("retry_after", "deadline"), [(30, 10.0), (3, 2.0)])
def test_retry_after_beyond_the_deadline_is_not_retried(
    patient_client: ToolClient, upstream: StandinUpstream, retry_after: int, deadline: float
) -> None:
    upstream.push(Status(429, headers={"Retry-After": str(retry_after)}))
    result = patient_client.call_tool(TOOL, ARGUMENTS, timeout=deadline)
    error = tool_error(result, "UPSTREAM_ERROR")
    assert error.retryable
    assert error.retry_after == retry_after
    assert upstream.request_count == 1


def test_only_one_retry_by_default(patient_client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(*[Status(503, headers={"Retry-After": "1"})] * 3)
    error = tool_error(patient_client.call_tool(TOOL, ARGUMENTS, timeout=10), "UPSTREAM_ERROR")
    assert error.retryable
    assert upstream.request_count == 2


@pytest.mark.parametrize(
    "scenario",
    [
        Status(503),
        Status(500),
        Status(500, headers={"Retry-After": "1"}),
        Status(502, headers={"Retry-After": "1"}),
    ],
    ids=["503-without-retry-after", "500", "500-with-retry-after", "502-with-retry-after"],
)
def test_other_failures_are_retryable_upstream_errors_without_a_retry(
    patient_client: ToolClient, upstream: StandinUpstream, scenario: Status
) -> None:
    upstream.push(scenario)
    error = tool_error(patient_client.call_tool(TOOL, ARGUMENTS, timeout=10), "UPSTREAM_ERROR")
    assert error.retryable
    assert upstream.request_count == 1


def test_garbage_is_an_upstream_error_that_is_not_retryable(
    patient_client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Garbage())
    error = tool_error(patient_client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert not error.retryable
    assert upstream.request_count == 1


def test_upstream_retries_zero_disables_retries(upstream: StandinUpstream, keys: TestKeys) -> None:
    upstream.push(Status(429, headers={"Retry-After": "1"}))
    settings = make_settings(upstream.url, upstream_timeout=PATIENT, upstream_retries=0)
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as client,
    ):
        error = tool_error(client.call_tool(TOOL, ARGUMENTS), "UPSTREAM_ERROR")
    assert error.retryable
    assert error.retry_after == 1
    assert upstream.request_count == 1


# --- the bound on calls in flight -------------------------------------------------------


@dataclass(frozen=True)
class Held(Scenario):
    """Answer like Refine, but only once the test sets `release`."""

    release: threading.Event

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        while not self.release.is_set():
            await exchange.pause(0.01)
        return await Refine().respond(exchange)


BOUND = 4


@pytest.fixture
async def bounded(upstream: StandinUpstream) -> AsyncIterator[ServerThread]:
    settings = make_settings(
        upstream.url,
        max_concurrent_calls=BOUND,
        queue_timeout=0.1,
        rate_limit_burst=100_000,
        upstream_timeout=PATIENT,
    )
    running = ServerThread(settings)
    await asyncio.to_thread(running.start)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.stop)


async def test_beyond_the_in_flight_bound_calls_are_refused_fast_and_status_stays_fast(
    bounded: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    release = threading.Event()
    upstream.push(*[Held(release)] * BOUND)
    async with AsyncToolClient(bounded.target, api_key=keys.editor, timeout=30) as client:
        held = [asyncio.create_task(client.call_tool(TOOL, ARGUMENTS)) for _ in range(BOUND)]
        try:
            assert await upstream.until_requests(BOUND, timeout=5)
            assert upstream.in_flight == BOUND
            assert in_flight(bounded) == BOUND

            started = time.monotonic()
            with pytest.raises(ToolServiceError) as caught:
                await client.call_tool(TOOL, ARGUMENTS)
            refused_after = time.monotonic() - started
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE
            assert caught.value.reason == "OVERLOADED"
            assert caught.value.retry_after is not None
            assert caught.value.retry_after > 0
            assert caught.value.trailing_metadata.get("retry-after") == "1"
            # Refused after the short queue wait, not after waiting for a slot (the held calls
            # never end by themselves).
            assert refused_after < 5
            assert upstream.request_count == BOUND, "the refused call reached the upstream"

            # Catalog and health do not queue behind the held tool calls.
            status = await client.status(timeout=0.5)
            assert status.enabled
            assert [tool.name for tool in await client.list_tools(timeout=0.5)] == [TOOL]
            async with grpc.aio.insecure_channel(bounded.target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="aiservices.v1.ToolService"),
                    timeout=0.5,
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            release.set()
        results = await asyncio.gather(*held)
        assert all(not result.is_error for result in results), [r.error for r in results]

        # Slots are free again: a new call is admitted and served.
        again = await client.call_tool(TOOL, ARGUMENTS, timeout=10)
        assert not again.is_error, again.text
    assert upstream.request_count == BOUND + 1
    registry = bounded.server.metrics.registry
    assert registry.get_sample_value("aiservices_overloaded_refusals_total") == 1
    assert in_flight(bounded) == 0


async def test_a_call_refused_as_overloaded_gives_its_rate_limit_unit_back(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    settings = make_settings(
        upstream.url,
        max_concurrent_calls=1,
        queue_timeout=0.1,
        rate_limit_burst=2,
        rate_limit_per_minute=1,
        upstream_timeout=PATIENT,
    )
    running = ServerThread(settings)
    await asyncio.to_thread(running.start)
    release = threading.Event()
    upstream.push(Held(release))
    try:
        async with AsyncToolClient(running.target, api_key=keys.editor, timeout=30) as client:
            held = asyncio.create_task(client.call_tool(TOOL, ARGUMENTS))
            try:
                assert await upstream.until_requests(1, timeout=5)
                with pytest.raises(ToolServiceError) as overloaded:
                    await client.call_tool(TOOL, ARGUMENTS)
                assert overloaded.value.reason == "OVERLOADED"
                # The held call spent one unit of two; the refused one spent nothing.
                assert overloaded.value.trailing_metadata["x-ratelimit-remaining"] == "1"
            finally:
                release.set()
            assert not (await held).is_error
            assert not (await client.call_tool(TOOL, ARGUMENTS)).is_error
            with pytest.raises(ToolServiceError) as limited:
                await client.call_tool(TOOL, ARGUMENTS)
            assert limited.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await asyncio.to_thread(running.stop)
    assert upstream.request_count == 2


# --- trace propagation ------------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_well_formed_traceparent_is_forwarded_and_the_upstream_trace_id_returned(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Refine(trace_id="ab" * 16))
    result = client.call_tool(TOOL, ARGUMENTS, metadata=[("traceparent", TRACEPARENT)])
    assert not result.is_error, result.text
    assert result.trace_id == "ab" * 16
    (request,) = upstream.requests
    assert request.headers.get("traceparent") == TRACEPARENT


@pytest.mark.parametrize(
    "traceparent",
    [
        "not-a-traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        TRACEPARENT + "-extra",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is invalid
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
    ],
)
def test_a_malformed_traceparent_is_not_forwarded(
    client: ToolClient, upstream: StandinUpstream, traceparent: str
) -> None:
    result = client.call_tool(TOOL, ARGUMENTS, metadata=[("traceparent", traceparent)])
    assert not result.is_error, result.text
    (request,) = upstream.requests
    assert "traceparent" not in request.headers


def test_without_traceparent_none_is_invented(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    assert not client.call_tool(TOOL, ARGUMENTS).is_error
    (request,) = upstream.requests
    assert "traceparent" not in request.headers


# --- many slow calls at once ------------------------------------------------------------

MANY = 500


async def test_500_concurrent_slow_calls_all_complete(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.default = Slow(1.0)
    settings = make_settings(upstream.url, rate_limit_burst=100_000, upstream_timeout=PATIENT)
    running = ServerThread(settings)
    await asyncio.to_thread(running.start)
    try:
        async with AsyncToolClient(running.target, api_key=keys.editor, timeout=30) as client:
            async with asyncio.timeout(15):
                results = await asyncio.gather(
                    *(client.call_tool(TOOL, ARGUMENTS) for _ in range(MANY))
                )
    finally:
        await asyncio.to_thread(running.stop)
    errors = [result.error for result in results if result.is_error]
    assert errors == []
    assert upstream.request_count == MANY
