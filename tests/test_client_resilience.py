"""The client against the real server: error classes per status, retries (a policy's; the reads'
default is in test_client_helpers.py), channels and interceptors from the caller,
wait_for_ready, traceparent and the default deadlines.

Retry waits go through an injected sleep that records each wait, so tests assert what the
client waited for, never how long the test took.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from aiservices import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_TIMEOUT,
    NO_RETRY,
    AsyncToolClient,
    DeadlineExceeded,
    FailedPrecondition,
    FeatureDisabled,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    ToolClient,
    ToolServiceError,
    Unauthenticated,
    Unavailable,
    service_config,
)
from aiservices.client import KEEPALIVE_OPTIONS
from aiservices_server.app import AiServicesServer
from aiservices_server.config import Settings
from tests.standin import Hang, Refine, Slow, StandinUpstream
from tests.standin import Status as HttpStatus
from tests.support.clients import Harness
from tests.support.keys import TestKeys
from tests.support.servers import ServerThread, make_settings
from tests.support.waiting import closed_port
from tests.test_client import _expect_error as _refused
from tests.test_interceptor_errors import BrokenStore
from tests.test_resilience import ARGUMENTS, TOOL, TRACEPARENT

KINDS = ["sync", "aio"]


class Recorder:
    """Stands in for time.sleep / asyncio.sleep: notes each wait, then waits `scale` of it."""

    def __init__(self, scale: float = 0.0, before: Callable[[], None] | None = None) -> None:
        self.waits: list[float] = []
        self.scale = scale
        self.before = before

    def sync(self, seconds: float) -> None:
        self._note(seconds)
        time.sleep(seconds * self.scale)

    async def aio(self, seconds: float) -> None:
        self._note(seconds)
        await asyncio.sleep(seconds * self.scale)

    def _note(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.before is not None:
            self.before()

    def sleep_for(self, kind: str) -> dict[str, Any]:
        return {"sleep": self.sync if kind == "sync" else self.aio}


class SeenCalls(grpc.UnaryUnaryClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    """A client interceptor of either kind that notes each call's method, deadline, metadata."""

    def __init__(self) -> None:
        # (method, timeout, text metadata as sent: every pair, in order, duplicates kept)
        self.calls: list[tuple[str, float | None, list[tuple[str, str]]]] = []
        self.started = threading.Event()
        self.answered = threading.Event()  # set once an attempt has its outcome

    def _note(self, details: Any) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [(k, v) for k, v in details.metadata or () if isinstance(v, str)]
        self.calls.append((method.rsplit("/", 1)[-1], details.timeout, metadata))
        self.started.set()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._note(details)
        outcome = continuation(details, request)
        if isinstance(outcome, Awaitable):
            return self._await(outcome)
        self.answered.set()
        return outcome

    async def _await(self, outcome: Awaitable[Any]) -> Any:
        try:
            return await outcome
        finally:
            self.answered.set()

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]


def _client(kind: str, target: str, seen: SeenCalls | None = None, **kwargs: Any) -> Harness:
    if seen is not None:
        kwargs["interceptors"] = [seen]
    return Harness(kind, target, **kwargs)


@pytest.fixture
def limited_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """One call, then RESOURCE_EXHAUSTED with a 0.1 s RetryInfo (600 a minute)."""
    settings = make_settings(upstream.url, rate_limit_burst=1, rate_limit_per_minute=600)
    with ServerThread(settings) as running:
        yield running


@pytest.fixture
def slow_limit_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """One call, then RESOURCE_EXHAUSTED with a 2 s RetryInfo (the default 30 a minute)."""
    with ServerThread(make_settings(upstream.url, rate_limit_burst=1)) as running:
        yield running


# --- one exception class per documented status ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_refusals_raise_the_class_of_their_status(
    kind: str, server: ServerThread, keys: TestKeys, harnesses: list[Harness]
) -> None:
    editor = _client(kind, server.target, api_key=keys.editor)
    viewer = _client(kind, server.target, api_key=keys.viewer)
    stranger = _client(kind, server.target, api_key="not-a-key-0123456789")
    harnesses.extend([editor, viewer, stranger])

    unauthenticated = await _refused(stranger.call("status"))
    denied = await _refused(viewer.call("call_tool", TOOL, ARGUMENTS))
    missing = await _refused(editor.call("call_tool", "tools.nope", {}))
    invalid = await _refused(editor.call("call_tool", TOOL, {"prompt_template_json": "not json"}))

    assert type(unauthenticated) is Unauthenticated
    assert type(denied) is PermissionDenied
    assert denied.error_metadata["tool"] == TOOL
    assert type(missing) is NotFound
    assert type(invalid) is InvalidArgument
    assert [field for field, _ in invalid.field_violations] == ["arguments.prompt_template_json"]
    assert not any(e.retryable for e in (unauthenticated, denied, missing, invalid))


async def test_rate_limited_carries_retry_after(
    limited_server: ServerThread, keys: TestKeys
) -> None:
    async with AsyncToolClient(limited_server.target, api_key=keys.editor) as client:
        await client.call_tool(TOOL, ARGUMENTS)
        limited = await _refused(client.call_tool(TOOL, ARGUMENTS))
    assert type(limited) is RateLimited
    assert limited.retryable is True
    assert limited.retry_after is not None
    assert 0 < limited.retry_after <= 0.2


def test_feature_disabled_is_a_failed_precondition(keys: TestKeys) -> None:
    with (
        ServerThread(make_settings(None)) as running,
        ToolClient(running.target, api_key=keys.editor) as client,
        pytest.raises(FeatureDisabled) as caught,
    ):
        client.call_tool(TOOL, ARGUMENTS)
    assert isinstance(caught.value, FailedPrecondition)
    assert caught.value.reason == "AI_SERVICES_DISABLED"
    assert caught.value.retryable is False


def test_deadline_and_unavailable(
    client: ToolClient, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    with pytest.raises(DeadlineExceeded) as late:
        client.call_tool(TOOL, ARGUMENTS, timeout=0.3)
    with (
        ToolClient(f"127.0.0.1:{closed_port()}", api_key=keys.editor) as nowhere,
        pytest.raises(Unavailable) as gone,
    ):
        nowhere.status(retry=NO_RETRY)  # sent once: a read would otherwise retry its timeout out
    assert late.value.retryable is False
    assert gone.value.retryable is True


def test_internal_has_the_support_id(upstream: StandinUpstream, keys: TestKeys) -> None:
    settings = make_settings(upstream.url)
    thread = ServerThread(settings)
    thread.server = AiServicesServer(settings, limiter=BrokenStore())
    with (
        thread,
        ToolClient(thread.target, api_key=keys.editor) as client,
        pytest.raises(Internal) as caught,
    ):
        client.call_tool(TOOL, ARGUMENTS)
    assert caught.value.support_id
    assert caught.value.support_id in caught.value.message
    assert caught.value.retryable is False


# --- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limited_call_is_retried_after_the_servers_delay(
    kind: str,
    limited_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    sleep = Recorder(scale=1.0)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.0, max_backoff=0.0)
    client = _client(
        kind, limited_server.target, api_key=keys.editor, retry=policy, **sleep.sleep_for(kind)
    )
    harnesses.append(client)

    first = await client.call("call_tool", TOOL, ARGUMENTS)
    second = await client.call("call_tool", TOOL, ARGUMENTS)

    assert not first.is_error and not second.is_error, second.text
    assert upstream.request_count == 2
    assert sleep.waits, "the refused attempt was not retried"
    assert all(wait > 0.05 for wait in sleep.waits), sleep.waits  # the server's 0.1 s, not 0
    # A per-call policy replaces the client's: this one sends once.
    refused = await _refused(client.call("call_tool", TOOL, ARGUMENTS, retry=NO_RETRY))
    assert type(refused) is RateLimited


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(max_attempts=5, deadline=1.0),  # the wait would pass the deadline
        RetryPolicy(max_attempts=5, max_server_delay=1.0),  # a longer wait than it allows
    ],
    ids=["past-the-deadline", "over-max-server-delay"],
)
async def test_a_server_delay_the_policy_cannot_wait_out_is_raised_at_once(
    kind: str,
    policy: RetryPolicy,
    slow_limit_server: ServerThread,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    sleep, seen = Recorder(), SeenCalls()
    client = _client(
        kind,
        slow_limit_server.target,
        seen,
        api_key=keys.editor,
        retry=policy,
        **sleep.sleep_for(kind),
    )
    harnesses.append(client)
    await client.call("call_tool", TOOL, ARGUMENTS)

    refused = await _refused(client.call("call_tool", TOOL, ARGUMENTS))

    assert type(refused) is RateLimited
    assert refused.retry_after is not None and refused.retry_after > 1.0  # the server's 2 s
    assert sleep.waits == []
    assert seen.methods() == ["CallTool", "CallTool"]


@pytest.mark.parametrize("kind", KINDS)
async def test_refusals_that_retrying_cannot_fix_are_sent_once(
    kind: str,
    server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    sleep = Recorder()
    policy = RetryPolicy(max_attempts=5, retry_tool_errors=True)
    named = [("editor", keys.editor), ("viewer", keys.viewer), ("bad", "bad-key-0123456789")]
    seen = {who: SeenCalls() for who, _ in named}
    callers = {
        who: _client(
            kind, server.target, seen[who], api_key=key, retry=policy, **sleep.sleep_for(kind)
        )
        for who, key in named
    }
    harnesses.extend(callers.values())
    upstream.push(Hang())

    refusals = [
        await _refused(callers["bad"].call("call_tool", TOOL, ARGUMENTS)),
        await _refused(callers["viewer"].call("call_tool", TOOL, ARGUMENTS)),
        await _refused(callers["editor"].call("call_tool", "tools.nope", {})),
        await _refused(callers["editor"].call("call_tool", TOOL, {"prompt_template_json": "x"})),
        await _refused(callers["editor"].call("call_tool", TOOL, ARGUMENTS, timeout=0.3)),
    ]

    assert [type(e) for e in refusals] == [
        Unauthenticated,
        PermissionDenied,
        NotFound,
        InvalidArgument,
        DeadlineExceeded,
    ]
    assert sleep.waits == []
    assert upstream.request_count == 1  # the deadline call reached the upstream once
    assert {who: s.methods() for who, s in seen.items()} == {
        "bad": ["CallTool"],
        "viewer": ["CallTool"],
        "editor": ["CallTool"] * 3,
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_retryable_tool_errors_are_retried_only_when_asked(
    kind: str,
    no_upstream_retry_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    sleep = Recorder()
    target = no_upstream_retry_server.target
    asking = _client(
        kind,
        target,
        api_key=keys.editor,
        retry=RetryPolicy(
            max_attempts=3, initial_backoff=0.0, max_backoff=0.0, retry_tool_errors=True
        ),
        **sleep.sleep_for(kind),
    )
    default = _client(
        kind, target, api_key=keys.editor, retry=RetryPolicy(), **sleep.sleep_for(kind)
    )
    harnesses.extend([asking, default])

    upstream.push(HttpStatus(503, headers={"Retry-After": "4"}), HttpStatus(502), Refine())
    retried = await asking.call("call_tool", TOOL, ARGUMENTS)
    assert not retried.is_error, retried.text
    assert upstream.request_count == 3
    assert sleep.waits[0] == 4.0  # the upstream's Retry-After, passed on by the server
    assert len(sleep.waits) == 2

    upstream.push(HttpStatus(503))
    kept = await default.call("call_tool", TOOL, ARGUMENTS)
    assert kept.is_error and kept.error is not None and kept.error.retryable
    assert upstream.request_count == 4
    assert len(sleep.waits) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_unavailable_is_retried_until_the_server_is_back(
    kind: str, upstream: StandinUpstream, keys: TestKeys, harnesses: list[Harness]
) -> None:
    port = closed_port()
    later = ServerThread(make_settings(upstream.url, grpc_address=f"127.0.0.1:{port}"))

    def start_once() -> None:
        if not later.port:
            later.start()

    sleep = Recorder(scale=1.0, before=start_once)
    policy = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.2)
    fast_reconnect = [
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    client = _client(
        kind,
        f"127.0.0.1:{port}",
        api_key=keys.editor,
        retry=policy,
        options=fast_reconnect,
        **sleep.sleep_for(kind),
    )
    harnesses.append(client)
    try:
        status = await client.call("status")
    finally:
        await asyncio.to_thread(later.stop)
    assert status.enabled
    assert sleep.waits  # the first attempt found no server


def test_backoff_jitter_is_drawn_from_the_given_random_source() -> None:
    full = RetryPolicy(initial_backoff=1.0, max_backoff=5.0, multiplier=2.0, random=lambda: 0.5)
    assert [full.backoff(n, 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.5]
    decorrelated = RetryPolicy(
        initial_backoff=1.0, max_backoff=5.0, jitter="decorrelated", random=lambda: 0.5
    )
    assert decorrelated.backoff(1, 0.0) == 1.0
    assert decorrelated.backoff(2, 1.0) == 2.0  # between 1 and 3 * 1
    assert decorrelated.backoff(3, 4.0) == 5.0  # capped
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="one retry layer"):
        ToolClient("127.0.0.1:1", retry=RetryPolicy(), grpc_retry_attempts=3)


# --- channels, interceptors, service config -------------------------------------------------


def test_a_given_channel_is_used_and_left_open(server: ServerThread, keys: TestKeys) -> None:
    channel = grpc.insecure_channel(server.target)
    try:
        with ToolClient(channel=channel, api_key=keys.editor) as first:
            assert first.status().enabled
        with ToolClient(channel=channel, api_key=keys.editor) as second:
            assert second.status().enabled  # the first client did not close it
    finally:
        channel.close()


async def test_a_given_aio_channel_is_used_and_left_open(
    server: ServerThread, keys: TestKeys
) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        async with AsyncToolClient(channel=channel, api_key=keys.editor) as first:
            assert (await first.status()).enabled
        async with AsyncToolClient(channel=channel, api_key=keys.editor) as second:
            assert (await second.status()).enabled


def test_a_channel_factory_gets_the_clients_options_and_its_channel_is_closed(
    server: ServerThread, keys: TestKeys
) -> None:
    made: list[tuple[str, dict[str, Any], grpc.Channel]] = []

    def factory(target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        channel = grpc.insecure_channel(target, options=options)
        made.append((target, dict(options), channel))
        return channel

    with ToolClient(server.target, api_key=keys.editor, channel_factory=factory) as client:
        assert client.status().enabled
    ((target, options, channel),) = made
    assert target == server.target
    assert options.items() >= dict(KEEPALIVE_OPTIONS).items()
    with pytest.raises(ValueError, match="closed"):
        get_status: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/aiservices.v1.ToolService/GetStatus"
        )
        get_status(b"")


@pytest.mark.parametrize("kind", KINDS)
async def test_interceptors_see_every_call_with_its_deadline_and_traceparent(
    kind: str,
    server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    seen = SeenCalls()
    client = _client(kind, server.target, seen, api_key=keys.editor)
    harnesses.append(client)

    await client.call("status")
    await client.call("call_tool", TOOL, ARGUMENTS, traceparent=TRACEPARENT)

    assert seen.methods() == ["GetStatus", "CallTool"]
    (_, status_timeout, _), (_, call_timeout, call_metadata) = seen.calls
    # CallTool outlasts the server's own upstream timeout, so a slow upstream is a tool error.
    server_default = Settings.model_fields["upstream_timeout"].default
    assert call_timeout is not None and call_timeout > server_default
    assert call_timeout == pytest.approx(DEFAULT_CALL_TIMEOUT, abs=1.0)
    assert status_timeout == pytest.approx(DEFAULT_TIMEOUT, abs=1.0)
    assert dict(call_metadata)["traceparent"] == TRACEPARENT
    (request,) = upstream.requests
    assert request.headers["traceparent"] == TRACEPARENT


def test_the_traceparent_argument_replaces_one_given_in_metadata(
    server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    seen = SeenCalls()
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    with ToolClient(server.target, api_key=keys.editor, interceptors=[seen]) as client:
        client.call_tool(TOOL, ARGUMENTS, metadata={"TraceParent": stale}, traceparent=TRACEPARENT)
    _, _, metadata = seen.calls[0]
    assert [v for k, v in metadata if k == "traceparent"] == [TRACEPARENT]
    (request,) = upstream.requests
    assert request.headers["traceparent"] == TRACEPARENT


def test_a_malformed_traceparent_is_refused_before_sending(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    with pytest.raises(ValueError, match="traceparent"):
        client.call_tool(TOOL, ARGUMENTS, traceparent="00-abc-def-01")
    with pytest.raises(TypeError, match="timout"):
        client.call_tool(TOOL, ARGUMENTS, timout=1)  # type: ignore[call-arg]
    assert upstream.request_count == 0


def test_round_robin_and_grpc_retries_over_a_dns_target(
    server: ServerThread, keys: TestKeys
) -> None:
    with ToolClient(
        f"dns:///127.0.0.1:{server.port}",
        api_key=keys.editor,
        load_balancing="round_robin",
        grpc_retry_attempts=3,
    ) as client:
        assert client.status().enabled  # gRPC accepted the service config
    config = json.loads(service_config(load_balancing="round_robin", retry_attempts=3))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "aiservices.v1.ToolService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 3


# --- waiting for a server, and deadlines ----------------------------------------------------


def test_wait_for_ready_waits_for_a_server_that_starts_late(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    port = closed_port()
    failed = threading.Event()

    def note(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            failed.set()

    def factory(target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        channel = grpc.insecure_channel(target, options=options)
        channel.subscribe(note)
        return channel

    seen = SeenCalls()
    fast_reconnect = [
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    late = ServerThread(make_settings(upstream.url, grpc_address=f"127.0.0.1:{port}"))
    results: list[Any] = []
    with ToolClient(
        f"127.0.0.1:{port}",
        api_key=keys.editor,
        wait_for_ready=True,
        channel_factory=factory,
        interceptors=[seen],
        options=fast_reconnect,
    ) as client:
        caller = threading.Thread(target=lambda: results.append(client.status(timeout=20)))
        caller.start()
        try:
            # The call is in flight and the channel has failed to connect: without
            # wait_for_ready it would already have ended with UNAVAILABLE.
            assert seen.started.wait(10) and failed.wait(10)
            assert not results
            late.start()
            caller.join(20)
        finally:
            late.stop()
    assert len(results) == 1 and results[0].enabled


def test_a_slow_upstream_reaches_a_default_client_as_the_upstream_timeout_tool_error(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Slow(5.0))
    with (
        ServerThread(make_settings(upstream.url, upstream_timeout=0.5)) as running,
        ToolClient(running.target, api_key=keys.editor) as client,
    ):
        result = client.call_tool(TOOL, ARGUMENTS)
    assert result.is_error
    assert result.error is not None and result.error.code == "UPSTREAM_TIMEOUT"


# --- closing a client, and what a call may be given ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_close_during_a_retry_wait_ends_the_call_as_cancelled(
    kind: str, keys: TestKeys
) -> None:
    # Nothing listens: each attempt is UNAVAILABLE at once, then the client waits 60 s.
    seen = SeenCalls()
    policy = RetryPolicy(max_attempts=3, initial_backoff=60.0, max_backoff=60.0, random=lambda: 1)
    client = _client(kind, f"127.0.0.1:{closed_port()}", seen, api_key=keys.editor, retry=policy)
    call = asyncio.ensure_future(client.call("status"))
    assert await asyncio.to_thread(seen.answered.wait, 10)

    await client.close()

    done, _ = await asyncio.wait([call], timeout=20)
    assert done, "close() did not end the call waiting to retry"
    error = call.exception()
    assert type(error) is ToolServiceError, error
    assert error.code is grpc.StatusCode.CANCELLED
    assert seen.methods() == ["GetStatus"]  # no attempt was sent on the closed channel
    with pytest.raises(RuntimeError, match="closed"):
        await client.call("status")


@pytest.mark.parametrize("kind", KINDS)
async def test_close_ends_calls_in_flight_as_cancelled(
    kind: str, server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.push(Hang())
    client = _client(kind, server.target, api_key=keys.editor)
    call = asyncio.ensure_future(client.call("call_tool", TOOL, ARGUMENTS))
    assert await upstream.until_requests(1)

    await client.close()

    # The caller's task was not cancelled, so it must not see a bare CancelledError.
    refused = await _refused(call)
    assert refused.code is grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan")])
def test_a_timeout_that_is_not_a_positive_number_is_refused_before_sending(
    timeout: float, server: ServerThread, keys: TestKeys
) -> None:
    seen = SeenCalls()
    with ToolClient(server.target, api_key=keys.editor, interceptors=[seen]) as client:
        with pytest.raises(ValueError, match="timeout"):
            client.status(timeout=timeout)
        with pytest.raises(ValueError, match="timeout"):
            client.list_tools(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        ToolClient(server.target, timeout=timeout)
    with pytest.raises(ValueError, match="call_timeout"):
        ToolClient(server.target, call_timeout=timeout)
    assert seen.calls == []


@pytest.mark.parametrize("kind", KINDS)
async def test_list_tools_retries_within_its_timeout_for_the_whole_listing(
    kind: str, keys: TestKeys, harnesses: list[Harness]
) -> None:
    sleep, seen = Recorder(), SeenCalls()
    policy = RetryPolicy(max_attempts=3, initial_backoff=5.0, max_backoff=5.0, random=lambda: 1)
    target = f"127.0.0.1:{closed_port()}"
    client = _client(kind, target, seen, api_key=keys.editor, retry=policy, **sleep.sleep_for(kind))
    harnesses.append(client)

    refused = await _refused(client.call("list_tools", timeout=1.0))

    # A 5 s wait cannot fit in a 1 s listing: the error is raised instead of waiting past it.
    assert type(refused) is Unavailable
    assert sleep.waits == []
    assert seen.methods() == ["ListTools"]


def test_metadata_may_be_a_mapping(server: ServerThread, keys: TestKeys) -> None:
    with ToolClient(
        server.target, api_key=keys.editor, metadata={"X-Request-Id": "from-the-client"}
    ) as client:
        by_client = client.call_tool(TOOL, ARGUMENTS)
        by_call = client.call_tool(TOOL, ARGUMENTS, metadata={"X-Request-Id": "from-the-call"})
    # The server echoes the caller's request id: the header arrived, under its own name.
    assert by_client.request_id == "from-the-client"
    assert by_call.request_id == "from-the-call"


def test_an_api_key_a_header_cannot_carry_is_refused_without_showing_it(
    server: ServerThread,
) -> None:
    for key in ("sekrit\nline", "sekrit\x00", "sekrité"):
        with pytest.raises(ValueError, match="api_key") as caught:
            ToolClient(server.target, api_key=key)
        assert "sekrit" not in str(caught.value)
