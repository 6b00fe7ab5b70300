"""Catalog, pagination, Struct numbers, health and reflection on the real server."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aiservices import AsyncToolClient, ToolClient, ToolServiceError
from aiservices.client import MAX_NESTING
from aiservices_server.call import Call
from aiservices_server.tools.base import JsonObject, ToolDefinition, ToolResult
from tests.support.keys import load_test_keys
from tests.support.servers import ServerThread, make_settings


class EchoTool:
    """A tool that returns its arguments: shows exactly what the handler received."""

    def __init__(self, name: str, permission: str = "echo") -> None:
        self._definition = ToolDefinition(
            name=name,
            title=f"Echo {name}",
            description="Returns its arguments.",
            input_schema={
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "count": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "nested": {
                        "type": "object",
                        "properties": {"ids": {"type": "array", "items": {"type": "integer"}}},
                    },
                    "flag": {"type": "boolean"},
                    "label": {"type": "string"},
                },
            },
            output_schema={"type": "object"},
            permission=permission,
        )
        self.received: list[JsonObject] = []

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        self.received.append(arguments)
        return ToolResult(text="echo", structured=arguments)


def full_client(server: ServerThread) -> ToolClient:
    return ToolClient(server.target, api_key=load_test_keys().full)


@pytest.fixture
def echo_server() -> Any:
    tools = [EchoTool(f"tests.echo.{index:02d}") for index in range(7)]
    # Enabled (the upstream is never called) and with room for many calls.
    settings = make_settings("http://127.0.0.1:9", rate_limit_burst=1000)
    with ServerThread(settings, tools=tools) as running:
        running.tools = tools  # type: ignore[attr-defined]
        yield running


def test_list_tools_pages_with_an_opaque_cursor(echo_server: ServerThread) -> None:
    with full_client(echo_server) as client:
        first = client.list_tools_page(page_size=3)
        assert [t.name for t in first.tools] == [f"tests.echo.{i:02d}" for i in range(3)]
        assert first.next_cursor
        second = client.list_tools_page(cursor=first.next_cursor, page_size=3)
        third = client.list_tools_page(cursor=second.next_cursor, page_size=3)
        assert [t.name for t in third.tools] == ["tests.echo.06"]
        assert third.next_cursor == ""
        assert [t.name for t in client.list_tools(page_size=2)] == [
            f"tests.echo.{i:02d}" for i in range(7)
        ]


@pytest.mark.parametrize("cursor", ["garbage!", "djE6eA", "bm90LWEtY3Vyc29y"])
def test_a_bad_cursor_is_invalid_argument(echo_server: ServerThread, cursor: str) -> None:
    with (
        full_client(echo_server) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        client.list_tools_page(cursor=cursor)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.field_violations).keys() == {"cursor"}


def test_a_negative_page_size_is_invalid_argument(echo_server: ServerThread) -> None:
    with (
        full_client(echo_server) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        client.list_tools_page(page_size=-1)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_struct_integers_survive_the_round_trip(echo_server: ServerThread) -> None:
    arguments = {
        "count": 3,
        "ratio": 2.5,
        "nested": {"ids": [1, 2, 40000000000]},
        "flag": True,
        "label": "7",
    }
    with full_client(echo_server) as client:
        result = client.call_tool("tests.echo.00", arguments)
    received = echo_server.tools[0].received[0]  # type: ignore[attr-defined]
    assert received == arguments
    assert type(received["count"]) is int
    assert type(received["nested"]["ids"][2]) is int
    assert type(received["ratio"]) is float
    assert result.structured_content == arguments
    assert type(result.structured_content["count"]) is int


def test_a_float_where_an_integer_is_required_is_refused(echo_server: ServerThread) -> None:
    with (
        full_client(echo_server) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        client.call_tool("tests.echo.00", {"count": 2.5})
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.field_violations) == {"arguments.count": "must be an integer"}


async def test_async_client_calls_the_real_server(echo_server: ServerThread) -> None:
    async with AsyncToolClient(echo_server.target, api_key=load_test_keys().full) as client:
        results = await asyncio.gather(
            *(client.call_tool("tests.echo.01", {"count": n}) for n in range(20))
        )
        status = await client.status()
    assert sorted(r.structured_content["count"] for r in results) == list(range(20))  # type: ignore[index]
    assert status.enabled
    assert len(status.tools) == 7


def test_health_serves_both_names_and_turns_not_serving_on_drain(
    echo_server: ServerThread,
) -> None:
    with grpc.insecure_channel(echo_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "aiservices.v1.ToolService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        echo_server.run(echo_server.server.health.enter_graceful_shutdown())
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(echo_server: ServerThread) -> None:
    with grpc.insecure_channel(echo_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {service.name for service in reply.list_services_response.service}
    assert {"aiservices.v1.ToolService", "grpc.health.v1.Health"} <= names


def test_reflection_can_be_turned_off() -> None:
    with (
        ServerThread(make_settings(None, reflection=False)) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _nested_struct_bytes(depth: int) -> bytes:
    """A Struct nested `depth` levels deep, encoded by hand: protobuf refuses to build it."""

    def length_delimited(field: int, payload: bytes) -> bytes:
        size, length = b"", len(payload)
        while True:
            byte = length & 0x7F
            length >>= 7
            size += bytes([byte | (0x80 if length else 0)])
            if not length:
                break
        return bytes([(field << 3) | 2]) + size + payload

    struct = b""
    for _ in range(depth):
        value = length_delimited(5, struct)  # Value.struct_value
        entry = length_delimited(1, b"k") + length_delimited(2, value)  # map entry
        struct = length_delimited(1, entry)  # Struct.fields
    return length_delimited(1, b"tests.echo.00") + length_delimited(2, struct)


def test_an_undecodable_request_is_invalid_argument_with_details(
    echo_server: ServerThread,
) -> None:
    with grpc.insecure_channel(echo_server.target) as channel:
        call_tool: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/aiservices.v1.ToolService/CallTool"
        )
        # As a future, the refused call is a grpc.Call: code, details and trailers, typed.
        refused = call_tool.future(
            _nested_struct_bytes(200),
            metadata=(("authorization", f"Bearer {load_test_keys().full}"),),
            timeout=5,
        )
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded" in refused.details()
        trailers = dict(refused.trailing_metadata())
        assert "x-request-id" in trailers
        assert "grpc-status-details-bin" in trailers
        with pytest.raises(grpc.RpcError) as anonymous:
            call_tool(_nested_struct_bytes(200), timeout=5)
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"k": value}
    return value


def test_the_deepest_arguments_the_client_sends_are_decoded(echo_server: ServerThread) -> None:
    # The client's limit (aiservices.client.MAX_NESTING) is one the server can decode.
    arguments = {"nested": _nested(MAX_NESTING - 2)}
    with full_client(echo_server) as client:
        result = client.call_tool("tests.echo.00", arguments)
        assert result.structured_content == arguments
        with pytest.raises(ValueError, match="nested deeper"):
            client.call_tool("tests.echo.00", {"nested": _nested(MAX_NESTING)})


def test_get_status_names_the_upstream_in_use_and_nothing_while_disabled(
    client: ToolClient,
) -> None:
    status = client.status()
    assert (status.enabled, status.upstream) == (True, "agenta")
    with (
        ServerThread(make_settings()) as disabled,
        ToolClient(disabled.target, api_key=load_test_keys().editor, timeout=10) as other,
    ):
        off = other.status()
    assert (off.enabled, off.upstream, off.tools) == (False, "", [])
