"""The MCP face as MCP callers see it: the SDK's own Streamable HTTP client (and raw HTTP where a
client hides the answer) against the real server, beside the generated gRPC client, with the
real stand-in upstream on loopback. The same keys, the same tools, the same rate-limit budget."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
import httpx2
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from aiservices import AsyncToolClient, ToolInfo, ToolServiceError
from aiservices_server.auth import generate_key
from aiservices_server.faces.mcp.answers import UNAUTHENTICATED
from tests.standin import Garbage, Refine, Reply, Scenario, StandinUpstream, Status
from tests.support.keys import TestKeys
from tests.support.mcp import McpCaller, mcp_caller, post_rpc
from tests.support.processes import PROJECT_VERSION
from tests.support.servers import ServerThread
from tests.support.waiting import access_records

TOOL = "tools.agenta.api.refine_prompt"
TEMPLATE = '{"messages": [{"role": "system", "content": "You greet {{name}}."}]}'
ARGUMENTS = {"prompt_template_json": TEMPLATE, "guidelines": "Be brief."}
USER = "x-agenta-user-id"
ORGANIZATION = "x-agenta-organization-id"
TIMEOUT = 10.0
RETRY_LATER = -32000


@pytest.fixture
def server(mcp_server: ServerThread) -> ServerThread:
    """Every test here runs against the server with MCP beside gRPC (the shared `mcp_server`)."""
    return mcp_server


def grpc_client(
    server: ServerThread, key: str, headers: Mapping[str, str] | None = None
) -> AsyncToolClient:
    metadata = tuple((name.lower(), value) for name, value in (headers or {}).items())
    return AsyncToolClient(server.target, api_key=key, timeout=TIMEOUT, metadata=metadata)


def mcp_lines(
    caplog: pytest.LogCaptureFixture, count: int, method: str | None = None
) -> list[logging.LogRecord]:
    """The MCP access lines (of `method` only, when given), once `count` of them arrived."""
    fields = {"transport": "mcp"} if method is None else {"transport": "mcp", "method": method}
    return access_records(caplog, count, **fields)


def sample(server: ServerThread, name: str, **labels: str) -> float:
    value = server.server.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def assert_same_tool(listed: types.Tool, described: ToolInfo) -> None:
    """An MCP tool and the gRPC description of it, field by field."""
    assert listed.name == described.name
    assert listed.title == described.title
    assert listed.description == described.description
    assert listed.input_schema == described.input_schema
    assert listed.output_schema == described.output_schema
    hints = listed.annotations
    assert hints is not None
    assert hints.read_only_hint == described.annotations.read_only_hint
    assert hints.destructive_hint == described.annotations.destructive_hint
    assert hints.idempotent_hint == described.annotations.idempotent_hint
    assert hints.open_world_hint == described.annotations.open_world_hint


async def refused(caller: McpCaller, name: str = TOOL) -> MCPError:
    """The protocol error of one tools/call that must not reach the tool."""
    with pytest.raises(MCPError) as caught:
        await caller.client.call_tool(name, ARGUMENTS)
    return caught.value


# --- tools/list ----------------------------------------------------------------------------------


async def test_the_server_names_itself_with_its_version(
    server: ServerThread, keys: TestKeys
) -> None:
    async with mcp_caller(server, keys.editor) as caller:
        info = caller.client.server_info
    assert info is not None
    assert (info.name, info.version) == ("aiservices", PROJECT_VERSION)


KEYED: dict[str, tuple[str, dict[str, str]]] = {
    "editor": ("editor", {}),
    "full": ("full", {}),
    "other_org": ("other_org", {}),
    "viewer": ("viewer", {}),
    "gateway acting for a user": ("gateway", {USER: "alice", ORGANIZATION: "globex"}),
}


@pytest.mark.parametrize("who", list(KEYED))
async def test_tools_list_is_what_get_status_and_list_tools_give_the_same_key(
    server: ServerThread, keys: TestKeys, who: str
) -> None:
    key_name, headers = KEYED[who]
    key = getattr(keys, key_name)
    async with grpc_client(server, key, headers) as grpc_caller:
        status = await grpc_caller.status()
        listed_over_grpc = await grpc_caller.list_tools()
    async with mcp_caller(server, key, headers=headers) as caller:
        page = await caller.client.list_tools()

    assert page.next_cursor is None
    assert [t.name for t in page.tools] == [t.name for t in status.tools]
    assert [t.name for t in page.tools] == [t.name for t in listed_over_grpc]
    for listed, described in zip(page.tools, status.tools, strict=True):
        assert_same_tool(listed, described)
    expected = [] if key_name == "viewer" else [TOOL]
    assert [t.name for t in page.tools] == expected


async def test_a_cursor_the_server_did_not_make_is_refused_as_over_grpc(
    server: ServerThread, keys: TestKeys
) -> None:
    async with grpc_client(server, keys.editor) as grpc_caller:
        with pytest.raises(ToolServiceError) as caught:
            await grpc_caller.list_tools_page(cursor="not-a-cursor")
    async with mcp_caller(server, keys.editor) as caller:
        with pytest.raises(MCPError) as refusal:
            await caller.client.list_tools(cursor="not-a-cursor")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.value.code == types.INVALID_PARAMS
    assert refusal.value.data["reason"] == "INVALID_ARGUMENT"


# --- tools/call ----------------------------------------------------------------------------------


async def test_a_call_answers_what_call_tool_answers_with_its_ids_in_meta(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    upstream.push(Refine(trace_id="trace-over-grpc"), Refine(trace_id="trace-over-mcp"))
    async with grpc_client(server, keys.editor) as grpc_caller:
        expected = await grpc_caller.call_tool(TOOL, ARGUMENTS)
    async with mcp_caller(server, keys.editor) as caller:
        result = await caller.client.call_tool(TOOL, ARGUMENTS)
        response = caller.response_to("tools/call")

    assert not expected.is_error
    assert result.is_error is False
    assert result.structured_content == expected.structured_content
    assert [block.text for block in result.content if isinstance(block, types.TextContent)] == [
        expected.text
    ]
    assert result.meta is not None
    assert result.meta["aiservices/trace_id"] == "trace-over-mcp"
    request_id = result.meta["aiservices/request_id"]
    assert request_id and request_id == response.headers["x-request-id"]
    # The upstream got the same request from both faces.
    first, second = upstream.requests
    assert first.body == second.body


UPSTREAM_FAILURES: dict[str, tuple[list[Scenario], str]] = {
    "500 twice (retried once)": ([Status(500), Status(500)], "UPSTREAM_ERROR"),
    "a non-JSON page": ([Garbage()], "UPSTREAM_ERROR"),
    "model output without messages": ([Reply({"summary": "no messages"})], "INVALID_MODEL_OUTPUT"),
}


@pytest.mark.parametrize("failure", list(UPSTREAM_FAILURES))
async def test_a_tool_failure_is_a_result_with_is_error_and_the_code(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream, failure: str
) -> None:
    scenarios, code = UPSTREAM_FAILURES[failure]
    upstream.push(*scenarios)
    async with grpc_client(server, keys.editor) as grpc_caller:
        expected = await grpc_caller.call_tool(TOOL, ARGUMENTS)
    upstream.push(*scenarios)
    async with mcp_caller(server, keys.editor) as caller:
        result = await caller.client.call_tool(TOOL, ARGUMENTS)

    assert expected.error is not None and expected.error.code == code
    assert result.is_error is True
    assert result.structured_content is None
    (block,) = result.content
    assert isinstance(block, types.TextContent)
    assert block.text == f"{code}: {expected.error.message}"
    assert result.meta is not None
    assert result.meta["aiservices/error"] == {"code": code, "retryable": expected.error.retryable}
    assert result.meta["aiservices/request_id"]


async def test_invalid_arguments_are_a_result_naming_each_field_not_a_protocol_error(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    arguments: dict[str, Any] = {"guidelines": 7, "nope": True}
    async with grpc_client(server, keys.editor) as grpc_caller:
        with pytest.raises(ToolServiceError) as caught:
            await grpc_caller.call_tool(TOOL, arguments)
    async with mcp_caller(server, keys.editor) as caller:
        result = await caller.client.call_tool(TOOL, arguments)

    fields = [field for field, _ in caught.value.field_violations]
    assert sorted(fields) == [
        "arguments.guidelines",
        "arguments.nope",
        "arguments.prompt_template_json",
    ]
    assert result.is_error is True
    (block,) = result.content
    assert isinstance(block, types.TextContent)
    for field in fields:
        assert field in block.text
    assert result.meta is not None
    error = result.meta["aiservices/error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["fieldViolations"]] == fields
    assert upstream.request_count == 0


async def test_an_unknown_tool_is_a_protocol_error(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    async with mcp_caller(server, keys.editor) as caller:
        error = await refused(caller, "tools.nope")
    assert error.code == types.INVALID_PARAMS
    assert error.data["reason"] == "TOOL_NOT_FOUND"
    assert upstream.request_count == 0


async def test_a_key_without_the_permission_may_not_call(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    async with mcp_caller(server, keys.viewer) as caller:
        error = await refused(caller)
    assert error.code == types.INVALID_PARAMS
    assert error.data["reason"] == "PERMISSION_DENIED"
    assert upstream.request_count == 0


# --- authentication ------------------------------------------------------------------------------


def one_char_changed(keys: TestKeys) -> str:
    return keys.editor[:-1] + ("A" if keys.editor[-1] != "A" else "B")


BAD_AUTHORIZATION: dict[str, Any] = {
    "no header": lambda keys: {},
    "unknown key": lambda keys: {"Authorization": f"Bearer {generate_key()}"},
    "key with one char changed": lambda keys: {"Authorization": f"Bearer {one_char_changed(keys)}"},
    "Basic scheme with a real key": lambda keys: {"Authorization": f"Basic {keys.editor}"},
    "key without a scheme": lambda keys: {"Authorization": keys.editor},
}


@pytest.mark.parametrize("credentials", list(BAD_AUTHORIZATION))
@pytest.mark.parametrize("method", ["tools/list", "tools/call"])
async def test_a_missing_or_bad_key_is_http_401_with_www_authenticate(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream, credentials: str, method: str
) -> None:
    params = {"name": TOOL, "arguments": ARGUMENTS} if method == "tools/call" else {}
    response = await post_rpc(server, method, params, BAD_AUTHORIZATION[credentials](keys))
    # The same request with a good key is answered: the key alone made the difference.
    control = await post_rpc(server, method, params, {"Authorization": f"Bearer {keys.full}"})

    assert control.status_code == 200, control.text
    assert "result" in control.json()
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    # A JSON-RPC error, which MCP clients pass on to their caller (the body was not read: id null).
    body = response.json()
    assert (body["jsonrpc"], body["id"], body["error"]["code"]) == ("2.0", None, UNAUTHENTICATED)
    assert body["error"]["data"]["reason"] == "UNAUTHENTICATED"
    assert response.headers["x-request-id"]
    assert upstream.request_count == (1 if method == "tools/call" else 0)  # the control's


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "missing or malformed credentials: send 'authorization: Bearer <key>'"),
        ("wrong", "unknown API key"),
    ],
)
async def test_the_sdk_client_says_the_key_was_refused(
    server: ServerThread, key: str | None, message: str
) -> None:
    responses: list[httpx2.Response] = []
    sent = None if key is None else generate_key()
    # The SDK's client raises it from its task groups as it connects, as for any MCP error.
    refusal = pytest.RaisesExc(
        MCPError,
        check=lambda exc: (
            (exc.error.code, exc.error.message, exc.error.data)
            == (UNAUTHENTICATED, message, {"reason": "UNAUTHENTICATED"})
        ),
    )
    with pytest.RaisesGroup(refusal, flatten_subgroups=True):
        async with mcp_caller(server, sent, responses=responses) as caller:
            await caller.client.list_tools()
    assert {r.status_code for r in responses} == {401}


# --- one rate-limit budget across gRPC and MCP ---------------------------------------------------


def assert_rate_limited(error: MCPError, response: httpx2.Response) -> None:
    assert error.code == RETRY_LATER
    assert error.data["reason"] == "RATE_LIMIT_EXCEEDED"
    assert error.data["retryAfterSeconds"] == 2
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-ratelimit-limit"] == "10"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["x-request-id"]


async def test_ten_calls_over_grpc_leave_none_for_mcp(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    async with grpc_client(server, keys.editor) as grpc_caller:
        for _ in range(10):
            assert not (await grpc_caller.call_tool(TOOL, ARGUMENTS)).is_error
    async with mcp_caller(server, keys.editor) as caller:
        error = await refused(caller)
        assert_rate_limited(error, caller.response_to("tools/call"))
    assert upstream.request_count == 10


async def test_ten_calls_over_mcp_leave_none_for_grpc(
    server: ServerThread, keys: TestKeys, upstream: StandinUpstream
) -> None:
    # A user of the gateway's: a budget of its own, whatever other tests spend.
    alice = {USER: "alice"}
    async with mcp_caller(server, keys.gateway, headers=alice) as caller:
        for _ in range(10):
            assert (await caller.client.call_tool(TOOL, ARGUMENTS)).is_error is False
    async with grpc_client(server, keys.gateway, alice) as grpc_caller:
        with pytest.raises(ToolServiceError) as caught:
            await grpc_caller.call_tool(TOOL, ARGUMENTS)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another user of the same gateway still has a whole budget.
        assert not (
            await grpc_caller.call_tool(TOOL, ARGUMENTS, metadata=((USER, "bob"),))
        ).is_error
    assert upstream.request_count == 11


# --- delegation, access line and metrics ---------------------------------------------------------


async def test_the_access_line_of_a_delegated_call_names_the_user(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    headers = {USER: "alice-7f3a", ORGANIZATION: "globex-eu"}
    async with mcp_caller(server, keys.gateway, headers=headers) as caller:
        result = await caller.client.call_tool(TOOL, ARGUMENTS)
    assert result.is_error is False
    (line,) = mcp_lines(caplog, 1, method="tools/call")
    assert getattr(line, "key_id", None) == "gateway"
    assert getattr(line, "user_id", None) == "alice-7f3a"
    assert getattr(line, "organization", None) == "globex-eu"


@pytest.mark.parametrize(
    ("header", "value"), [(USER, "alice smith"), (USER, "a" * 200), (ORGANIZATION, "acme corp")]
)
async def test_a_malformed_delegation_header_is_http_400_logged_with_its_key(
    server: ServerThread,
    keys: TestKeys,
    upstream: StandinUpstream,
    caplog: pytest.LogCaptureFixture,
    header: str,
    value: str,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    params = {"name": TOOL, "arguments": ARGUMENTS}
    headers = {"Authorization": f"Bearer {keys.gateway}", header: value}
    response = await post_rpc(server, "tools/call", params, headers)

    assert response.status_code == 400
    assert response.json()["error"]["data"]["reason"] == "INVALID_ARGUMENT"
    assert value not in response.text
    (line,) = mcp_lines(caplog, 1)
    assert getattr(line, "code", None) == "INVALID_ARGUMENT"
    assert getattr(line, "key_id", None) == "gateway"
    assert upstream.request_count == 0


async def test_delegation_from_a_key_without_act_for_users_is_http_403(
    server: ServerThread,
    keys: TestKeys,
    upstream: StandinUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    params = {"name": TOOL, "arguments": ARGUMENTS}
    headers = {"Authorization": f"Bearer {keys.editor}", USER: "alice"}
    response = await post_rpc(server, "tools/call", params, headers)

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["data"]["reason"] == "PERMISSION_DENIED"
    assert "may not act for users" in error["message"]
    (line,) = mcp_lines(caplog, 1)
    assert getattr(line, "code", None) == "PERMISSION_DENIED"
    assert getattr(line, "key_id", None) == "editor"
    assert upstream.request_count == 0


async def test_an_mcp_call_is_logged_and_counted_under_its_transport(
    server: ServerThread,
    keys: TestKeys,
    upstream: StandinUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    upstream.push(Refine(trace_id="trace-ok"), Status(404))
    async with mcp_caller(server, keys.editor) as caller:
        ok = await caller.client.call_tool(TOOL, ARGUMENTS)
        request_id = caller.response_to("tools/call").headers["x-request-id"]
        failed = await caller.client.call_tool(TOOL, ARGUMENTS)
    assert ok.is_error is False
    assert failed.is_error is True

    calls = mcp_lines(caplog, 2, method="tools/call")
    assert [vars(line).get("outcome") for line in calls] == ["OK", "UPSTREAM_ERROR"]
    line = calls[0]
    expected = {
        "transport": "mcp",
        "code": "OK",
        "tool": TOOL,
        "key_id": "editor",
        "upstream_status": "200",
        "upstream_trace_id": "trace-ok",
        "request_id": request_id,
    }
    assert {name: vars(line).get(name) for name in expected} == expected
    assert vars(calls[1]).get("upstream_status") == "404"

    tool_calls = "aiservices_tool_calls_total"
    labels = {"tool": TOOL, "key_id": "editor"}
    assert sample(server, tool_calls, outcome="OK", transport="mcp", **labels) == 1
    assert sample(server, tool_calls, outcome="UPSTREAM_ERROR", transport="mcp", **labels) == 1
    assert sample(server, tool_calls, outcome="OK", transport="grpc", **labels) == 0
    assert sample(server, "aiservices_mcp_requests_total", method="tools/call", code="OK") == 2


async def test_refused_calls_are_logged_with_the_grpc_code_and_not_counted_as_tool_calls(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    async with mcp_caller(server, keys.editor) as caller:
        invalid = await caller.client.call_tool(TOOL, {"nope": 1})
        await refused(caller, "tools.nope")
    assert invalid.is_error is True
    async with grpc_client(server, keys.editor) as grpc_caller:
        with pytest.raises(ToolServiceError):
            await grpc_caller.call_tool(TOOL, {"nope": 1})

    lines = [
        *mcp_lines(caplog, 2, method="tools/call"),
        *access_records(caplog, 1, transport="grpc"),
    ]
    codes = {(vars(r)["transport"], vars(r)["code"]) for r in lines if vars(r).get("tool")}
    # Both faces name how a request ended with gRPC's code names.
    assert codes == {
        ("mcp", "INVALID_ARGUMENT"),
        ("mcp", "NOT_FOUND"),
        ("grpc", "INVALID_ARGUMENT"),
    }
    # Neither call ran the tool: no tool call is counted, over either transport.
    tool_calls = "aiservices_tool_calls_total"
    labels = {"tool": TOOL, "key_id": "editor"}
    assert sample(server, tool_calls, outcome="INVALID_ARGUMENT", transport="mcp", **labels) == 0
    mcp_requests = "aiservices_mcp_requests_total"
    assert sample(server, mcp_requests, method="tools/call", code="INVALID_ARGUMENT") == 1
    assert sample(server, mcp_requests, method="tools/call", code="NOT_FOUND") == 1
