"""The hand-written client against a real grpc.aio server on 127.0.0.1.

Each test runs the same calls through ToolClient (in a worker thread, so the server's event
loop keeps serving) and AsyncToolClient, so both clients are held to one behaviour.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import aiservices
from aiservices import (
    AsyncToolClient,
    TextContent,
    ToolAnnotations,
    ToolClient,
    ToolServiceError,
    UnknownContent,
    dict_to_struct,
    struct_to_dict,
)
from aiservices import client as client_module
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from tests.support.clients import Harness

MiB = 1024 * 1024


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


TOOLS = [
    pb.Tool(
        name=f"tools.test.t{i}",
        title=f"Tool {i}",
        description=f"test tool {i}",
        input_schema=_struct(
            {
                "type": "object",
                "properties": {"prompt": {"type": "string", "maxLength": 100000}},
                "required": ["prompt"],
            }
        ),
        output_schema=_struct({"type": "object", "properties": {"ratio": {"minimum": 0.5}}}),
        annotations=pb.ToolAnnotations(read_only_hint=False, open_world_hint=True)
        if i == 0
        else pb.ToolAnnotations(),
    )
    for i in range(5)
]


def _packed(*messages: Any) -> list[any_pb2.Any]:
    packed = []
    for message in messages:
        item = any_pb2.Any()
        item.Pack(message)
        packed.append(item)
    return packed


class FakeToolService(pb_grpc.ToolServiceServicer):
    """Canned answers; remembers what each call carried (metadata, deadline, request)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]], float | None, Any]] = []

    def _record(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        metadata = [
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str) and not key.startswith(("grpc-", "user-agent", ":"))
        ]
        self.seen.append((method, metadata, context.time_remaining(), request))

    async def GetStatus(
        self,
        request: pb.GetStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetStatusRequest, pb.GetStatusResponse],
    ) -> pb.GetStatusResponse:
        self._record("GetStatus", request, context)
        return pb.GetStatusResponse(enabled=True, tools=TOOLS[:2])

    async def ListTools(
        self,
        request: pb.ListToolsRequest,
        context: grpc.aio.ServicerContext[pb.ListToolsRequest, pb.ListToolsResponse],
    ) -> pb.ListToolsResponse:
        self._record("ListTools", request, context)
        mode = dict(context.invocation_metadata() or ()).get("x-test-paging", "")
        if mode == "same-cursor":
            return pb.ListToolsResponse(tools=TOOLS[:1], next_cursor="again")
        if mode == "endless":
            return pb.ListToolsResponse(tools=TOOLS[:1], next_cursor=f"{request.cursor}+")
        start = int(request.cursor or "0")
        end = start + (request.page_size or 10)
        return pb.ListToolsResponse(
            tools=TOOLS[start:end], next_cursor=str(end) if end < len(TOOLS) else ""
        )

    async def CallTool(
        self,
        request: pb.CallToolRequest,
        context: grpc.aio.ServicerContext[pb.CallToolRequest, pb.CallToolResponse],
    ) -> pb.CallToolResponse:
        self._record("CallTool", request, context)
        if request.name == "echo":
            _, metadata, _, _ = self.seen[-1]
            echo = struct_pb2.Struct()
            echo.fields["arguments"].struct_value.CopyFrom(request.arguments)
            pairs = echo.fields["metadata"].list_value
            for key, value in metadata:
                pairs.values.add().list_value.extend([key, value])
            return pb.CallToolResponse(
                content=[pb.ContentBlock(text=pb.TextContent(text="echoed"))],
                structured_content=echo,
                meta=pb.CallToolMeta(trace_id="trace-1", request_id="req-1"),
            )
        if request.name == "fails":
            future_block = pb.ContentBlock()
            future_block.ParseFromString(b"\x12\x03img")  # field 2: a kind added later
            return pb.CallToolResponse(
                content=[
                    pb.ContentBlock(text=pb.TextContent(text="upstream timed out")),
                    future_block,
                    pb.ContentBlock(text=pb.TextContent(text="try again")),
                ],
                is_error=True,
                meta=pb.CallToolMeta(trace_id="trace-2", request_id="req-2"),
                error=pb.ToolError(
                    code=pb.TOOL_ERROR_CODE_UPSTREAM_TIMEOUT,
                    message="upstream timed out",
                    retryable=True,
                    retry_after=duration_pb2.Duration(seconds=1, nanos=500_000_000),
                ),
            )
        if request.name == "fails-new-code":
            return pb.CallToolResponse(
                is_error=True,
                error=pb.ToolError(code=99, message="new"),  # type: ignore[arg-type]
            )
        if request.name == "invalid":
            status = rpc_status.to_status(
                status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT,
                    message="arguments do not match the input schema",
                    details=_packed(
                        error_details_pb2.ErrorInfo(
                            reason="INVALID_ARGUMENT",
                            domain="aiservices",
                            metadata={"tool": request.name},
                        ),
                        error_details_pb2.BadRequest(
                            field_violations=[
                                error_details_pb2.BadRequest.FieldViolation(
                                    field="arguments.guidelines", description="too long"
                                ),
                                error_details_pb2.BadRequest.FieldViolation(
                                    field="arguments.extra", description="unknown key"
                                ),
                            ]
                        ),
                    ),
                )
            )
            await context.abort(status.code, status.details, status.trailing_metadata)
        if request.name in ("limited", "limited-header-only"):
            details = [
                error_details_pb2.ErrorInfo(reason="RATE_LIMIT_EXCEEDED", domain="aiservices")
            ]
            if request.name == "limited":
                details.append(
                    error_details_pb2.RetryInfo(
                        retry_delay=duration_pb2.Duration(seconds=2, nanos=250_000_000)
                    )
                )
            status = rpc_status.to_status(
                status_pb2.Status(
                    code=code_pb2.RESOURCE_EXHAUSTED,
                    message="rate limit exceeded",
                    details=_packed(*details),
                )
            )
            trailers = (
                *status.trailing_metadata,
                ("retry-after", "3"),
                ("x-ratelimit-limit", "10"),
            )
            await context.abort(status.code, status.details, trailers)
        if request.name == "hang":
            await asyncio.Event().wait()  # until the client's deadline cancels us
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no tool {request.name}")
        raise AssertionError("abort returned")


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, FakeToolService]]:
    service = FakeToolService()
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 32 * MiB),
            ("grpc.max_send_message_length", 32 * MiB),
        ]
    )
    pb_grpc.add_ToolServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        await grpc_server.stop(None)


MakeClient = Callable[..., Harness]


@pytest.fixture(params=["sync", "aio"])
async def make_client(
    request: pytest.FixtureRequest, fake_server: tuple[str, FakeToolService]
) -> AsyncIterator[MakeClient]:
    target, _ = fake_server
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        harness = Harness(request.param, target, **kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.close()


async def _expect_error(call: Awaitable[Any]) -> ToolServiceError:
    with pytest.raises(ToolServiceError) as caught:
        await call
    return caught.value


# --------------------------------------------------------------------------------------------
# Metadata and deadlines


async def test_sends_bearer_key_and_extra_metadata(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    client = make_client(api_key="k-123", metadata=[("X-Team", "search")])

    await client.call("status")
    result = await client.call("call_tool", "echo", {}, metadata=[("x-call", "1")])
    # A per-call header replaces the client's one instead of being sent twice.
    override = await client.call(
        "call_tool", "echo", {}, metadata=[("authorization", "Bearer other")]
    )

    assert ("authorization", "Bearer k-123") in service.seen[0][1]
    assert ("x-team", "search") in service.seen[0][1]
    echoed = result.structured_content["metadata"]
    assert ["authorization", "Bearer k-123"] in echoed
    assert ["x-team", "search"] in echoed
    assert ["x-call", "1"] in echoed
    auth = [v for k, v in override.structured_content["metadata"] if k == "authorization"]
    assert auth == ["Bearer other"]


async def test_no_authorization_without_key(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    await make_client().call("status")
    assert all(key != "authorization" for key, _ in service.seen[0][1])


async def test_default_deadline_and_per_call_override(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    client = make_client(timeout=7.0)

    await client.call("status")
    await client.call("list_tools_page")
    await client.call("call_tool", "echo", {})
    await client.call("call_tool", "echo", {}, timeout=2.5)

    # gRPC rounds the grpc-timeout header up (here to 10 ms), hence the small slack.
    remaining = [seen[2] for seen in service.seen if seen[2] is not None]
    assert len(remaining) == 4, service.seen
    assert all(5.0 < r <= 7.05 for r in remaining[:3]), remaining
    assert 0.5 < remaining[3] <= 2.55, remaining


async def test_deadline_exceeded_raises_tool_service_error(make_client: MakeClient) -> None:
    error = await _expect_error(make_client().call("call_tool", "hang", {}, timeout=0.1))
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason is None
    assert isinstance(error.__cause__, grpc.RpcError)


# --------------------------------------------------------------------------------------------
# Payloads


async def test_struct_round_trip_restores_ints_and_nesting(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    arguments: dict[str, Any] = {
        "count": 3,
        "ratio": 3.5,
        "negative": -2,
        "yes": True,
        "no": False,
        "nothing": None,
        "text": "héllo",
        "nested": {"items": [1, 2.5, {"deep": [True, None, 7, "x"]}], "empty": {}},
        "empty_list": [],
    }
    result = await make_client().call("call_tool", "echo", arguments)

    # json.dumps tells 3 from 3.0 and True from 1, so this checks types as well as values.
    back = result.structured_content["arguments"]
    assert json.dumps(back, sort_keys=True) == json.dumps(arguments, sort_keys=True)
    sent = service.seen[0][3].arguments
    assert sent.fields["count"].number_value == 3.0
    assert sent.fields["nested"].struct_value.fields["empty"].WhichOneof("kind") == "struct_value"
    assert result.content == [TextContent(text="echoed")]
    assert (result.trace_id, result.request_id) == ("trace-1", "req-1")
    assert result.is_error is False
    assert result.error is None


async def test_messages_over_grpc_default_limit_pass(make_client: MakeClient) -> None:
    big = "x" * (9 * MiB)  # above gRPC's 4 MiB default receive limit, both ways
    result = await make_client().call("call_tool", "echo", {"prompt": big})
    assert result.structured_content["arguments"]["prompt"] == big


async def test_list_tools_follows_cursors(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    client = make_client()

    tools = await client.call("list_tools", page_size=2)
    first = await client.call("list_tools_page", page_size=2)

    assert [t.name for t in tools] == [t.name for t in TOOLS]
    requests = [seen[3] for seen in service.seen]
    assert [r.cursor for r in requests[:3]] == ["", "2", "4"]
    assert all(r.page_size == 2 for r in requests)
    assert [t.name for t in first.tools] == ["tools.test.t0", "tools.test.t1"]
    assert first.next_cursor == "2"


async def test_list_tools_refuses_a_repeated_cursor(
    make_client: MakeClient, fake_server: tuple[str, FakeToolService]
) -> None:
    _, service = fake_server
    client = make_client(metadata=[("x-test-paging", "same-cursor")])
    error = await _expect_error(client.call("list_tools"))
    assert "again" in str(error)
    assert len(service.seen) == 2


async def test_list_tools_stops_after_max_pages(
    make_client: MakeClient,
    fake_server: tuple[str, FakeToolService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, service = fake_server
    monkeypatch.setattr(client_module, "MAX_PAGES", 4)
    client = make_client(metadata=[("x-test-paging", "endless")])
    await _expect_error(client.call("list_tools"))
    assert len(service.seen) == 4


async def test_tool_info_schemas_and_annotations(make_client: MakeClient) -> None:
    status = await make_client().call("status")

    assert status.enabled is True
    first, second = status.tools
    assert first.name == "tools.test.t0"
    assert (first.title, first.description) == ("Tool 0", "test tool 0")
    max_length = first.input_schema["properties"]["prompt"]["maxLength"]
    assert type(max_length) is int
    assert max_length == 100000
    assert first.output_schema["properties"]["ratio"]["minimum"] == 0.5
    # An explicit False is not the same as "not said".
    assert first.annotations == ToolAnnotations(
        read_only_hint=False, destructive_hint=None, idempotent_hint=None, open_world_hint=True
    )
    assert second.annotations == ToolAnnotations()
    assert second.annotations.read_only_hint is None


async def test_tool_error_result(make_client: MakeClient) -> None:
    client = make_client()
    result = await client.call("call_tool", "fails", {"prompt": "p"})

    assert result.is_error is True
    assert result.structured_content is None
    assert result.error is not None
    assert result.error.code == "UPSTREAM_TIMEOUT"
    assert result.error.message == "upstream timed out"
    assert result.error.retryable is True
    assert result.error.retry_after == 1.5
    assert result.text == "upstream timed out\ntry again"
    assert isinstance(result.content[1], UnknownContent)
    assert (result.trace_id, result.request_id) == ("trace-2", "req-2")

    newer = await client.call("call_tool", "fails-new-code", {})
    assert newer.error.code == "UNKNOWN_99"
    assert newer.error.retry_after is None
    assert newer.content == []


# --------------------------------------------------------------------------------------------
# Refusals


async def test_invalid_argument_carries_reason_and_violations(make_client: MakeClient) -> None:
    error = await _expect_error(make_client().call("call_tool", "invalid", {"guidelines": "x"}))

    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "arguments do not match the input schema"
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == "aiservices"
    assert error.error_metadata == {"tool": "invalid"}
    assert error.field_violations == [
        ("arguments.guidelines", "too long"),
        ("arguments.extra", "unknown key"),
    ]
    assert error.retry_after is None
    assert "grpc-status-details-bin" not in error.trailing_metadata
    assert isinstance(error.__cause__, grpc.RpcError)
    assert "arguments.guidelines: too long" in str(error)


async def test_resource_exhausted_prefers_retry_info(make_client: MakeClient) -> None:
    client = make_client()
    error = await _expect_error(client.call("call_tool", "limited", {}))

    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "RATE_LIMIT_EXCEEDED"
    assert error.retry_after == 2.25
    assert error.trailing_metadata["retry-after"] == "3"
    assert error.trailing_metadata["x-ratelimit-limit"] == "10"
    assert error.field_violations == []

    header_only = await _expect_error(client.call("call_tool", "limited-header-only", {}))
    assert header_only.retry_after == 3.0


async def test_plain_status_without_details(make_client: MakeClient) -> None:
    error = await _expect_error(make_client().call("call_tool", "nope", {}))
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.message == "no tool nope"
    assert (error.reason, error.retry_after, error.field_violations) == (None, None, [])


async def test_closed_client_refuses_calls(make_client: MakeClient) -> None:
    client = make_client()
    await client.call("status")
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.call("status")


async def test_context_managers_close(fake_server: tuple[str, FakeToolService]) -> None:
    target, _ = fake_server

    def use_sync() -> ToolClient:
        with ToolClient(target) as client:
            assert client.status().enabled
        return client

    sync_client = await asyncio.to_thread(use_sync)
    with pytest.raises(RuntimeError):
        sync_client.status()

    async with AsyncToolClient(target) as aio_client:
        assert (await aio_client.status()).enabled
    with pytest.raises(RuntimeError):
        await aio_client.status()


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="api_key"):
        ToolClient("127.0.0.1:1", api_key=" ")
    with pytest.raises(ValueError, match="timeout"):
        AsyncToolClient("127.0.0.1:1", timeout=0)
    # gRPC would take it, and fail every call as if the server refused it (INVALID_ARGUMENT).
    with pytest.raises(ValueError, match="load_balancing"):
        ToolClient("127.0.0.1:1", load_balancing="round-robin")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Conversion without a server


def test_struct_to_dict_numbers() -> None:
    struct = _struct({"a": 3.0, "b": -0.5, "c": 1e300, "d": [2.0, True], "e": None})
    struct.fields["f"].CopyFrom(struct_pb2.Value())  # no kind set at all
    converted = struct_to_dict(struct)
    assert json.dumps(converted, sort_keys=True) == json.dumps(
        {"a": 3, "b": -0.5, "c": 1e300, "d": [2, True], "e": None, "f": None}, sort_keys=True
    )
    assert type(converted["c"]) is float


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"a": b"bytes"}, TypeError),
        ({"a": {1, 2}}, TypeError),
        ({"a": object()}, TypeError),
        ({1: "non-str key"}, TypeError),
        ({"a": {"b": [math.nan]}}, ValueError),
        ({"a": math.inf}, ValueError),
        ({"a": 2**60}, ValueError),
    ],
)
def test_dict_to_struct_rejects_non_json(value: dict[Any, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=r"\$"):
        dict_to_struct(value)


def test_dict_to_struct_rejects_cycles_and_non_mappings() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = [looped]
    with pytest.raises(ValueError, match="circular"):
        dict_to_struct(looped)
    with pytest.raises(TypeError):
        dict_to_struct(["not", "a", "mapping"])  # type: ignore[arg-type]
    shared = [1]
    assert struct_to_dict(dict_to_struct({"a": shared, "b": shared})) == {"a": [1], "b": [1]}


def test_public_names() -> None:
    expected = [
        "ToolClient",
        "AsyncToolClient",
        "ToolResult",
        "ToolInfo",
        "ToolAnnotations",
        "ToolErrorInfo",
        "TextContent",
        "Status",
        "ToolPage",
        "ToolServiceError",
        "struct_to_dict",
        "dict_to_struct",
    ]
    for name in expected:
        assert name in aiservices.__all__
        assert getattr(aiservices, name) is not None
