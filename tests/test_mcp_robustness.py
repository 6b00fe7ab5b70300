"""The MCP face against callers that misbehave and servers that stop: malformed or oversized
requests, wrong headers, clients that hang up mid-call, and SIGTERM with calls in flight.

Bad input goes over raw HTTP (httpx), because the SDK's client never sends it; everything else
goes through the SDK's own client. Every bad request must get the SDK's or the spec's error
(never a 5xx) while the server keeps answering health checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.standin import Hang, Slow, StandinUpstream
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_client
from tests.support.processes import ServerProcess, upstream_settings
from tests.support.responsive import responsive_during
from tests.support.servers import ServerThread
from tests.support.waiting import access_records

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
PROTOCOL = "2026-07-28"
# JSON-RPC error codes (JSON-RPC 2.0 and the MCP spec).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


def mcp_url(server: ServerThread, path: str = "/mcp") -> str:
    return f"http://127.0.0.1:{server.server.mcp_port}{path}"


def request(method: str, params: dict[str, Any] | None = None, request_id: int | str = 1) -> Any:
    """A JSON-RPC request as the SDK's client sends it at protocol 2026-07-28."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**(params or {}), "_meta": meta},
    }


def headers(key: str, body: Any = None) -> dict[str, str]:
    """The headers the SDK's client sends with `body`."""
    sent = {
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL,
    }
    if isinstance(body, dict) and isinstance(body.get("method"), str):
        sent["mcp-method"] = body["method"]
        name = body.get("params", {}).get("name")
        if isinstance(name, str):
            sent["mcp-name"] = name
    return sent


def post(url: str, content: bytes, sent: dict[str, str], method: str = "POST") -> httpx.Response:
    """One raw request with exactly `sent` as its headers (httpx adds no Accept of its own)."""
    with httpx.Client(trust_env=False, timeout=30) as http:
        del http.headers["accept"]
        return http.request(method, url, content=content, headers=sent)


def list_tools_raw(server: ServerThread, key: str) -> httpx.Response:
    body = request("tools/list")
    return post(mcp_url(server), json.dumps(body).encode(), headers(key, body))


# --- bad input ---------------------------------------------------------------------------

OVER_LIMIT = 1_048_576 + 1  # the default MAX_MESSAGE_BYTES, the same bound as gRPC, plus one


def _bad_inputs() -> list[tuple[str, bytes, dict[str, str | None], str, int, int | None]]:
    """(name, body, header changes, HTTP method, expected status, expected JSON-RPC code)."""
    listing = request("tools/list")
    call = request("tools/call", {"name": TOOL, "arguments": [1, 2]})
    unknown = request("resources/nope")
    huge = request("tools/call", {"name": TOOL, "arguments": {"x": "a" * OVER_LIMIT}})
    listing_headers: dict[str, str | None] = {"mcp-method": "tools/list"}
    return [
        ("malformed JSON", b'{"jsonrpc": "2.0", "id": 1,', {}, "POST", 400, PARSE_ERROR),
        ("deeply nested JSON", b"[" * 200_000 + b"]" * 200_000, {}, "POST", 400, PARSE_ERROR),
        ("a batch", json.dumps([listing, listing]).encode(), {}, "POST", 400, INVALID_REQUEST),
        (
            "no jsonrpc member",
            json.dumps({"id": 1, "method": "tools/list"}).encode(),
            listing_headers,
            "POST",
            400,
            INVALID_REQUEST,
        ),
        (
            "a response posted to the server",
            json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode(),
            {},
            "POST",
            400,
            INVALID_REQUEST,
        ),
        ("a bare number", b"42", {}, "POST", 400, INVALID_REQUEST),
        (
            "arguments that are no object",
            json.dumps(call).encode(),
            {"mcp-method": "tools/call", "mcp-name": TOOL},
            "POST",
            400,
            INVALID_PARAMS,
        ),
        (
            "an unknown method",
            json.dumps(unknown).encode(),
            {"mcp-method": "resources/nope"},
            "POST",
            404,
            METHOD_NOT_FOUND,
        ),
        (
            "a wrong Content-Type",
            json.dumps(listing).encode(),
            {**listing_headers, "content-type": "text/plain"},
            "POST",
            400,
            None,
        ),
        (
            "no Accept header",
            json.dumps(listing).encode(),
            {**listing_headers, "accept": None},
            "POST",
            406,
            None,
        ),
        (
            "an Accept without JSON",
            json.dumps(listing).encode(),
            {**listing_headers, "accept": "text/html"},
            "POST",
            406,
            None,
        ),
        (
            "a body over MAX_MESSAGE_BYTES",
            json.dumps(huge).encode(),
            {"mcp-method": "tools/call", "mcp-name": TOOL},
            "POST",
            413,
            None,
        ),
        ("a GET", b"", listing_headers, "GET", 405, None),
        ("a DELETE", b"", listing_headers, "DELETE", 405, None),
    ]


@pytest.mark.parametrize(
    ("body", "changes", "method", "status", "code"),
    [pytest.param(*case, id=name) for name, *case in _bad_inputs()],
)
def test_bad_requests_get_the_protocol_error_and_the_server_stays_responsive(
    mcp_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    body: bytes,
    changes: dict[str, str | None],
    method: str,
    status: int,
    code: int | None,
) -> None:
    sent = headers(keys.editor)
    for name, value in changes.items():
        if value is None:
            sent.pop(name, None)
        else:
            sent[name] = value
    response = responsive_during(mcp_server, lambda: post(mcp_url(mcp_server), body, sent, method))

    assert response.status_code == status, response.text[:300]
    assert response.headers["x-request-id"]
    if code is not None:
        error = response.json()["error"]
        assert error["code"] == code, error
    assert upstream.request_count == 0
    assert list_tools_raw(mcp_server, keys.editor).status_code == 200


def test_another_path_is_not_found_and_names_the_mcp_path(
    mcp_server: ServerThread, keys: TestKeys
) -> None:
    body = request("tools/list")
    response = post(mcp_url(mcp_server, "/"), json.dumps(body).encode(), headers(keys.editor, body))
    assert response.status_code == 404
    assert "/mcp" in response.json()["error"]


def arguments_of_size(keys_count: int) -> dict[str, Any]:
    return {**ARGUMENTS, **{f"k{i}": i for i in range(keys_count)}}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "arguments",
    [arguments_of_size(60_000), {**ARGUMENTS, "extra": nested(900)}],
    ids=["60,000 unknown arguments", "arguments nested 900 deep"],
)
def test_hostile_arguments_within_the_byte_limit_are_invalid_arguments_not_a_stall(
    mcp_server: ServerThread, upstream: StandinUpstream, keys: TestKeys, arguments: Any
) -> None:
    body = request("tools/call", {"name": TOOL, "arguments": arguments})
    content = json.dumps(body).encode()
    assert len(content) < 1_048_576
    response = responsive_during(
        mcp_server, lambda: post(mcp_url(mcp_server), content, headers(keys.editor, body))
    )

    assert response.status_code == 200, response.text[:300]
    result = response.json()["result"]
    assert result["isError"] is True
    assert result["_meta"]["aiservices/error"]["code"] == "INVALID_ARGUMENT"
    assert upstream.request_count == 0


def test_arguments_over_the_bounds_get_the_same_answer_whatever_the_body_size(
    mcp_server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """A small body goes to the SDK; a large one is looked at first, off the event loop, and
    over-bound arguments are refused before the SDK parses it. The caller, the access line and
    the metrics cannot tell the two paths apart."""
    caplog.set_level(logging.INFO, logger="aiservices.access")
    over = {**ARGUMENTS, "extra": [0] * 2_100}
    small = request("tools/call", {"name": TOOL, "arguments": over}, request_id=7)
    large = request("tools/call", {"name": TOOL, "arguments": {**over, "pad": "x" * 40_000}}, "a")
    answers = []
    for body in (small, large):
        content = json.dumps(body).encode()
        answered = post(mcp_url(mcp_server), content, headers(keys.editor, body))
        assert answered.status_code == 200, answered.text[:300]
        answers.append(answered.json())
    assert [len(json.dumps(body)) > 16 * 1024 for body in (small, large)] == [False, True]
    assert [answer["id"] for answer in answers] == [7, "a"]
    results = [answer["result"] for answer in answers]
    for result in results:
        del result["_meta"]["aiservices/request_id"]
    assert results[0] == results[1]
    assert results[0]["isError"] is True
    assert results[0]["_meta"]["aiservices/error"]["fieldViolations"] == [
        {
            "field": "arguments.extra",
            "description": "holds more values than the 2000 allowed in all",
        }
    ]

    lines = [vars(r) for r in access_records(caplog, 2, transport="mcp")]
    assert [(line["method"], line["code"], line["tool"]) for line in lines] == [
        ("tools/call", "INVALID_ARGUMENT", TOOL)
    ] * 2
    refused = mcp_server.server.metrics.registry.get_sample_value(
        "aiservices_mcp_requests_total", {"method": "tools/call", "code": "INVALID_ARGUMENT"}
    )
    assert refused == 2


# --- cancellation ------------------------------------------------------------------------


def in_flight(server: ServerThread) -> float:
    value = server.server.metrics.registry.get_sample_value("aiservices_tool_calls_in_flight")
    return value or 0.0


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Bounded polling for server state that has no notification."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_client_closing_the_request_cancels_the_upstream_request(
    mcp_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    upstream.push(Hang())
    body = request("tools/call", {"name": TOOL, "arguments": ARGUMENTS})
    sent = {**headers(keys.editor, body), "x-request-id": "cancelled-by-client"}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        calling = asyncio.create_task(http.post(mcp_url(mcp_server), json=body, headers=sent))
        assert await upstream.until_requests(1, timeout=10)
        assert in_flight(mcp_server) == 1
        calling.cancel()  # httpx closes the connection of a request it abandons
        with pytest.raises(asyncio.CancelledError):
            await calling

    assert await upstream.until_disconnects(1, timeout=5), "the upstream request was not cancelled"
    assert await until(lambda: in_flight(mcp_server) == 0)

    def lines() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "aiservices.access"
            and getattr(r, "request_id", None) == "cancelled-by-client"
        ]

    assert await until(lambda: bool(lines()))
    (line,) = lines()
    assert getattr(line, "code", None) == "CANCELLED"
    assert getattr(line, "transport", None) == "mcp"
    assert getattr(line, "tool", None) == TOOL
    assert mcp_server.server._drain.in_flight == 0  # left before the line is written


async def test_notifications_cancelled_is_acknowledged_but_cannot_reach_a_call_in_flight(
    mcp_server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    """Stateless: each POST is served on its own, so a posted cancellation has no call to
    reach (the SDK acknowledges it and drops it); closing the request is how MCP cancels."""
    upstream.push(Slow(1.0))
    url = mcp_url(mcp_server)
    body = request("tools/call", {"name": TOOL, "arguments": ARGUMENTS}, request_id=7)
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": 7, "reason": "changed my mind"},
    }
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        calling = asyncio.create_task(http.post(url, json=body, headers=headers(keys.editor, body)))
        assert await upstream.until_requests(1, timeout=10)
        acknowledged = await http.post(url, json=cancel, headers=headers(keys.editor, cancel))
        response = await calling

    assert acknowledged.status_code == 202
    assert response.status_code == 200
    assert response.json()["result"]["isError"] is False
    assert upstream.disconnects == 0


# --- SIGTERM drain -----------------------------------------------------------------------

HELD_CALLS = 3


async def test_sigterm_lets_mcp_calls_in_flight_finish_and_refuses_new_ones(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    upstream.default = Slow(2.0)
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "RATE_LIMIT_BURST": "100000",
        "SHUTDOWN_GRACE": "10",
        "MCP_ADDRESS": "127.0.0.1:0",
    }
    process = ServerProcess(env, name="mcp-drain")
    try:
        await asyncio.to_thread(process.start)
        port = next(r["mcp_port"] for r in process.records if r.get("msg") == "serving")
        url = f"http://127.0.0.1:{port}/mcp"
        async with mcp_client(url, keys.editor) as client:
            # Listed first, as MCP hosts do: the SDK's client checks each result against the
            # tool's output schema, and lists the tools for it when it has not yet.
            assert [tool.name for tool in (await client.list_tools()).tools] == [TOOL]
            held = [
                asyncio.create_task(client.call_tool(TOOL, ARGUMENTS)) for _ in range(HELD_CALLS)
            ]
            assert await upstream.until_requests(HELD_CALLS, timeout=10)

            os.kill(process.pid, signal.SIGTERM)

            listing = request("tools/list")
            body = request("tools/call", {"name": TOOL, "arguments": ARGUMENTS})
            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                assert await asyncio.to_thread(
                    process.wait_for_record, lambda r: r.get("msg") == "draining", 5.0
                )
                # The drain starts a moment after the "draining" line: tools/list (which never
                # reaches the upstream) finds that moment, then a new call is refused.
                for _ in range(100):
                    seen = await http.post(url, json=listing, headers=headers(keys.editor, listing))
                    if seen.status_code == 503:
                        break
                    await asyncio.sleep(0.02)
                refused = await http.post(url, json=body, headers=headers(keys.editor, body))
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["data"]["reason"] == "SHUTTING_DOWN"
            assert not any(task.done() for task in held), "a held call ended before the drain"

            results = await asyncio.gather(*held)
        assert [r for r in results if r.is_error] == []
        assert all(r.structured_content for r in results)

        assert await until(lambda: process.returncode is not None, 15.0), "it did not exit"
        assert await asyncio.to_thread(process.terminate, 5.0) == 0
    finally:
        await asyncio.to_thread(process.close)

    records = process.records
    assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], process.lines
    assert not [r for r in records if "still in flight" in str(r.get("msg"))], process.lines
    calls = [r.get("code") for r in records if r.get("transport") == "mcp" and r.get("tool")]
    assert calls.count("OK") == HELD_CALLS, calls
    # Only the held calls reached the upstream: a refused call never does.
    assert upstream.request_count == HELD_CALLS
