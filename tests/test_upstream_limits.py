"""A hostile upstream cannot bloat, stall or confuse the server.

Replies are read within a byte cap (checked against Content-Length first, counted while
streaming), only uncompressed bodies are read, a parse is bounded by the values it would build,
and the trace id passed on to callers and logs is a short safe token or nothing. Each hostile
reply is served by the real HTTP stand-in to the real server, while health checks prove the
server still answers and tracemalloc shows what the process allocated meanwhile. The upstream
client itself, against the same stand-in, reports what each HTTP attempt came to and keeps no
cookies an upstream sets.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices import ToolClient, ToolResult
from aiservices_server.logs import JsonFormatter
from aiservices_server.upstream.agenta import (
    AgentaCompletionClient,
    CompletionReply,
    parse_completion,
)
from aiservices_server.upstream.http import (
    DEFAULT_MAX_REPLY_BYTES,
    MAX_REPLY_VALUES,
    UpstreamLimits,
    build_http_transport,
)
from aiservices_server.upstream.refiner import (
    UpstreamAttempt,
    UpstreamBadReply,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tests.standin import Endless, GzipBomb, Hang, Large, Refine, StandinUpstream, Status
from tests.support.keys import TestKeys
from tests.support.responsive import responsive_during
from tests.support.servers import APP, ENVIRONMENT, UPSTREAM_KEY, ServerThread, make_settings
from tests.test_resilience import upstream_attempts

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps(
        {"messages": [{"role": "user", "content": "Summarise {{text}} for {{audience}}."}]}
    )
}
MiB = 1024 * 1024
CAP = DEFAULT_MAX_REPLY_BYTES  # the servers below run with the default settings
# What the whole test process (server, stand-in, client) may allocate at peak during one call:
# a few times the cap, far below the hundreds of MB an unbounded read takes.
PEAK_LIMIT = 32 * MiB
# What may still be held once the call is over: memory comes back.
HELD_LIMIT = 4 * MiB
TOO_LARGE = f"the upstream reply is too large: more than {CAP:,} bytes"


@dataclass
class Allocations:
    peak: int = 0  # resident bytes above the start, at the highest point
    held: int = 0  # bytes allocated by Python code meanwhile and still held at the end


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


@contextmanager
def allocations() -> Iterator[Allocations]:
    """What the process (server, stand-in and client threads) took while the block ran.

    The peak is resident memory: Linux resets the high-water mark on writing 5 to
    /proc/self/clear_refs. Allocated-but-untouched pages do not count, as they cost nothing (a
    JSON parser may reserve many times its input). What is still held at the end is counted
    by tracemalloc, which sees Python allocations of every thread.
    """
    seen = Allocations()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    start = _status_kib("VmRSS")
    tracemalloc.start()
    try:
        yield seen
        seen.held = tracemalloc.get_traced_memory()[0]
        seen.peak = (_status_kib("VmHWM") - start) * 1024
    finally:
        tracemalloc.stop()


def hostile_call(
    server: ServerThread, client: ToolClient, *, arguments: dict[str, Any] = ARGUMENTS
) -> tuple[ToolResult, Allocations]:
    """Call the tool while proving the server responsive; returns what it allocated too."""
    with allocations() as seen:
        result = responsive_during(server, lambda: client.call_tool(TOOL, arguments))
    return result, seen


def assert_bounded(seen: Allocations) -> None:
    assert seen.peak < PEAK_LIMIT, f"{seen.peak / MiB:.0f} MiB allocated at peak"
    assert seen.held < HELD_LIMIT, f"{seen.held / MiB:.0f} MiB still held after the call"


def assert_too_large(result: ToolResult) -> None:
    assert result.is_error
    assert result.error is not None
    assert result.error.code == "UPSTREAM_ERROR"
    assert not result.error.retryable
    assert result.text == result.error.message == TOO_LARGE


# --- the byte cap ---------------------------------------------------------------------------


def test_a_100_mb_reply_with_its_length_is_refused_unread(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient
) -> None:
    upstream.push(Large(100 * MiB))
    started = time.monotonic()
    result, seen = hostile_call(server, client)
    assert_too_large(result)
    assert time.monotonic() - started < 2.0  # not read: 100 MB take longer than that
    assert_bounded(seen)
    assert upstream_attempts(server, "too_large") == 1
    # The connection is dropped, so the stand-in stops sending.
    assert upstream.wait_for_disconnects(1)


@pytest.mark.parametrize("chunked", [False, True], ids=["with-length", "chunked"])
def test_a_reply_of_exactly_the_cap_is_read_and_one_byte_more_is_refused(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient, chunked: bool
) -> None:
    upstream.push(Large(CAP, chunked=chunked), Large(CAP + 1, chunked=chunked))
    fits, seen = hostile_call(server, client)
    assert not fits.is_error, fits.error
    assert fits.text == "Padded."
    assert_bounded(seen)
    over, seen = hostile_call(server, client)
    assert_too_large(over)
    assert_bounded(seen)


def test_an_endless_chunked_reply_is_cut_at_the_cap(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient
) -> None:
    upstream.push(Endless())
    started = time.monotonic()
    result, seen = hostile_call(server, client)
    assert_too_large(result)
    # Cut at the cap, not at the deadline (5 s upstream timeout).
    assert time.monotonic() - started < 3.0
    assert_bounded(seen)
    assert upstream.wait_for_disconnects(1)  # and the stand-in stopped streaming


def test_a_gzip_bomb_is_refused_unread_and_identity_is_asked_for(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient
) -> None:
    upstream.push(GzipBomb(inflated=256 * MiB))
    result, seen = hostile_call(server, client)
    assert result.is_error
    assert result.error is not None
    assert result.error.code == "UPSTREAM_ERROR"
    assert not result.error.retryable
    assert result.text == "the upstream reply uses a content encoding that is not supported"
    assert_bounded(seen)
    assert upstream_attempts(server, "invalid") == 1
    (request,) = upstream.requests
    assert request.headers["accept-encoding"] == "identity"
    assert upstream.wait_for_disconnects(1)


@pytest.mark.parametrize(
    "scenario",
    [Large(100 * MiB, status=500), Large(100 * MiB, chunked=True, status=500), Endless(500)],
    ids=["with-length", "chunked", "endless"],
)
def test_a_huge_error_page_keeps_its_status_and_is_not_read(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient, scenario: Any
) -> None:
    upstream.push(scenario)
    started = time.monotonic()
    result, seen = hostile_call(server, client)
    assert result.is_error
    assert result.error is not None
    assert result.error.code == "UPSTREAM_ERROR"
    assert result.error.retryable  # a 500 may pass; its page size says nothing about that
    assert result.text == "the upstream answered HTTP 500"
    assert time.monotonic() - started < 3.0
    assert_bounded(seen)
    assert upstream_attempts(server, "500") == 1
    assert upstream.wait_for_disconnects(1)


def test_a_smaller_cap_is_a_setting(upstream: StandinUpstream, keys: TestKeys) -> None:
    settings = make_settings(upstream.url, upstream_max_reply_bytes=64 * 1024)
    upstream.push(Large(64 * 1024), Large(64 * 1024 + 1, chunked=True))
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=keys.editor, timeout=10) as client,
    ):
        assert not client.call_tool(TOOL, ARGUMENTS).is_error
        result = client.call_tool(TOOL, ARGUMENTS)
    assert result.error is not None
    assert result.text == "the upstream reply is too large: more than 65,536 bytes"


# --- the values a parse builds ----------------------------------------------------------------


def nested_lists(size: int) -> str:
    """`size` characters of JSON holding as many lists as fit: the costliest parse per byte."""
    unit = "[" * 20 + "]" * 20 + ","
    body = unit * ((size - 2) // len(unit))
    return "[" + body + "[]]"


TOO_MANY_VALUES = f"the upstream reply is too large: more than {MAX_REPLY_VALUES:,} JSON values"


@pytest.mark.parametrize("as_string", [False, True], ids=["object", "string"])
def test_a_reply_of_countless_tiny_values_is_refused_without_parsing(
    server: ServerThread, upstream: StandinUpstream, client: ToolClient, as_string: bool
) -> None:
    data: Any = nested_lists(CAP - 1000)
    if not as_string:  # as a string the tool would parse it again, after this parse
        data = json.loads(data)
    envelope = json.dumps({"version": "3.0", "data": data}, separators=(",", ":"))
    upstream.push(Status(200, body=envelope.encode()))
    result, seen = hostile_call(server, client)
    assert result.is_error
    assert result.error is not None
    assert result.error.code == "UPSTREAM_ERROR"
    assert not result.error.retryable
    assert result.text == TOO_MANY_VALUES
    assert_bounded(seen)


# --- trace ids -------------------------------------------------------------------------------

MARK = "TRACEMARK"
HOSTILE_TRACE_IDS = {
    "3 MB": MARK + "a" * 3_000_000,
    "129 chars": MARK + "b" * 120,
    "object": {"id": MARK},
    "list": [MARK],
    "number": 12345,
    "newline": MARK + "\ninjected log line",
    "NUL": MARK + "\x00def",
    "ANSI escape": "\x1b[31m" + MARK + "\x1b[0m",
    "space": MARK + " def",
    "non-ASCII": MARK + "é",
}


@pytest.mark.parametrize("trace_id", HOSTILE_TRACE_IDS.values(), ids=HOSTILE_TRACE_IDS.keys())
def test_a_hostile_trace_id_is_dropped_from_the_reply_and_the_log(
    server: ServerThread,
    upstream: StandinUpstream,
    client: ToolClient,
    caplog: pytest.LogCaptureFixture,
    trace_id: Any,
) -> None:
    caplog.set_level(logging.INFO)
    upstream.push(Refine(trace_id=trace_id))
    result = responsive_during(server, lambda: client.call_tool(TOOL, ARGUMENTS))
    assert not result.is_error, result.error
    assert result.trace_id == ""
    entry = access_entry(caplog, result.request_id)
    assert entry["code"] == "OK"
    assert "upstream_trace_id" not in entry
    logged = everything_logged(caplog)
    assert MARK not in logged
    assert "injected" not in logged


@pytest.mark.parametrize("trace_id", ["0af7651916cd43dd8448eb211c80319c", "run:2024-01.x_y"])
def test_a_well_formed_trace_id_is_passed_on(
    upstream: StandinUpstream, client: ToolClient, trace_id: str
) -> None:
    upstream.push(Refine(trace_id=trace_id))
    assert client.call_tool(TOOL, ARGUMENTS).trace_id == trace_id


def access_entry(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The access-log line of one call as written: it comes just after the caller's answer."""
    deadline = time.monotonic() + 5
    while True:
        records = [
            r
            for r in caplog.records
            if r.name == "aiservices.access" and getattr(r, "request_id", None) == request_id
        ]
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.005)  # polling a condition, with a deadline
    (record,) = records
    entry: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return entry


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = JsonFormatter()
    return caplog.text + "\n".join(formatter.format(record) for record in caplog.records)


# --- the reply parser, property-based ----------------------------------------------------------

# Far above what these take (a few ms), far below the old parse of the worst case (about 1 s).
PARSE_DEADLINE = timedelta(milliseconds=250)

WORST_CASES = [
    b"[" * 200_000,
    b'{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    nested_lists(CAP).encode(),
    b"[" + b"{}," * (CAP // 3 - 1) + b"{}]",
    b'{"data": "' + b"x" * (CAP - 20) + b'"}',
    b'{"data": "' + b"\\u005b" * ((CAP - 20) // 6) + b'"}',
    b'{"data": ' + b"1" * 100_000 + b"}",
    b'{"data": NaN}',
    b'{"data": 1e999}',
    b'{"data": "\xff\xfe"}',
    b'{"data": "\\ud800"}',
    b"\xef\xbb\xbf" + b'{"data": 1}',
    b'{"data": 1, "trace_id": "' + b"t" * 3_000_000 + b'"}',
    b'{"data": 1, "trace_id": {"a": [1, 2]}, "traceId": "fallback"}',
    b"",
    b"null",
]


def check_parse(body: bytes) -> CompletionReply | None:
    """The only outcomes allowed: a reply with a safe trace id, or an UpstreamBadReply."""
    try:
        reply = parse_completion(body, attempt=UpstreamAttempt("200", 0.01))
    except UpstreamBadReply as error:
        assert error.message.startswith("the upstream reply ")
        assert not error.retryable
        return None
    assert isinstance(reply.trace_id, str)
    assert len(reply.trace_id) <= 128
    assert reply.trace_id == "" or reply.trace_id.isascii()
    assert all(c.isalnum() or c in "._:-" for c in reply.trace_id)
    return reply


def with_worst_cases(test: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`@example` for each of WORST_CASES."""
    for case in reversed(WORST_CASES):
        test = example(case)(test)
    return test


@with_worst_cases
@settings(deadline=PARSE_DEADLINE, max_examples=300)
@given(st.binary(max_size=4096))
def test_any_bytes_parse_to_a_reply_or_an_upstream_error(body: bytes) -> None:
    check_parse(body)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=40,
)


@settings(deadline=PARSE_DEADLINE, max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["version", "data", "trace_id", "traceId", "span_id"]) | st.text(),
        JSON_VALUES,
        max_size=6,
    )
)
@example({"data": "{}", "trace_id": "t" * 129})
@example({"data": "{}", "trace_id": "", "traceId": "ok-1"})
@example({"data": "{}", "trace_id": "a\nb"})
@example({"data": "{}", "trace_id": "\x1b[2J"})
@example({"data": "{}", "trace_id": "nul\x00"})
@example({"data": nested_lists(MAX_REPLY_VALUES * 4)})
def test_any_json_envelope_parses_to_a_reply_or_an_upstream_error(envelope: Any) -> None:
    body = json.dumps(envelope).encode()
    reply = check_parse(body)
    if reply is None:
        return
    assert reply.data == envelope["data"]
    sent = envelope.get("trace_id") or envelope.get("traceId")
    if reply.trace_id:
        assert reply.trace_id == sent


# --- what each attempt came to, as the client reports it ----------------------------------------


@asynccontextmanager
async def completion_client(
    base_url: str, *, upstream_timeout: float = 5.0
) -> AsyncIterator[tuple[AgentaCompletionClient, list[tuple[str, float]]]]:
    """The upstream client as the server builds it, with the attempts its observer heard."""
    heard: list[tuple[str, float]] = []
    async with build_http_transport(max_connections=4) as transport:
        yield (
            AgentaCompletionClient(
                transport,
                UpstreamLimits(
                    timeout=upstream_timeout,
                    max_retries=1,
                    observer=lambda status, seconds: heard.append((status, seconds)),
                ),
                base_url=base_url,
                api_key=UPSTREAM_KEY,
                environment=ENVIRONMENT,
            ),
            heard,
        )


REFINE_INPUTS = {
    "__ag_prompt_template_json": ARGUMENTS["prompt_template_json"],
    "__ag_guidelines": "",
    "__ag_context": "",
}


async def test_a_reply_carries_its_attempt(upstream: StandinUpstream) -> None:
    async with completion_client(upstream.url) as (client, heard):
        reply = await client.run(APP, REFINE_INPUTS)
    assert reply.attempt.status == "200"
    assert reply.attempt.seconds > 0
    assert heard == [(reply.attempt.status, reply.attempt.seconds)]


async def test_a_retried_call_carries_its_last_attempt(upstream: StandinUpstream) -> None:
    upstream.push(Status(503, headers={"Retry-After": "0"}))
    async with completion_client(upstream.url) as (client, heard):
        reply = await client.run(APP, REFINE_INPUTS)
    assert reply.attempt.status == "200"
    assert [status for status, _ in heard] == ["503", "200"]


async def test_a_timeout_carries_a_timeout_attempt(upstream: StandinUpstream) -> None:
    upstream.push(Hang())
    async with completion_client(upstream.url, upstream_timeout=0.3) as (client, heard):
        with pytest.raises(UpstreamTimeout) as raised:
            await client.run(APP, REFINE_INPUTS)
    attempt = raised.value.attempt
    assert attempt is not None
    assert attempt.status == "timeout"
    assert attempt.seconds >= 0.3
    assert heard == [(attempt.status, attempt.seconds)]


async def test_a_refused_connection_carries_an_unavailable_attempt() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with completion_client(url) as (client, heard):
            with pytest.raises(UpstreamUnavailable) as raised:
                await client.run(APP, REFINE_INPUTS)
    attempt = raised.value.attempt
    assert attempt is not None
    assert attempt.status == "unavailable"
    # Nothing was sent, so the one retry was made, and the error carries the last attempt.
    assert [status for status, _ in heard] == ["unavailable", "unavailable"]
    assert heard[-1] == (attempt.status, attempt.seconds)


async def test_no_time_left_means_no_attempt(upstream: StandinUpstream) -> None:
    async with completion_client(upstream.url) as (client, heard):
        with pytest.raises(UpstreamTimeout) as raised:
            await client.run(APP, REFINE_INPUTS, time_left=0.0)
    assert raised.value.attempt is None
    assert heard == []
    assert upstream.request_count == 0


async def test_cookies_an_upstream_sets_are_neither_kept_nor_sent_back(
    upstream: StandinUpstream,
) -> None:
    upstream.push(
        Status(200, body={"data": "{}"}, headers={"Set-Cookie": "session=abc; Path=/"}),
        Refine(),
    )
    async with completion_client(upstream.url) as (client, _):
        await client.run(APP, REFINE_INPUTS)
        await client.run(APP, REFINE_INPUTS)
    first, second = upstream.requests
    assert "cookie" not in first.headers
    assert "cookie" not in second.headers
