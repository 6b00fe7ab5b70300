"""An exception nobody planned for, anywhere around a call (a rate-limit store that breaks, a
request parser or a response serializer that fails), reaches the caller as INTERNAL with a
support id, never as UNKNOWN with the exception's text; the log line with that support id says
what and where, and the access log and metrics record INTERNAL, as the caller saw it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from aiservices import ToolClient, ToolServiceError
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.app import AiServicesServer
from aiservices_server.core.auth import Authenticator
from aiservices_server.core.drain import Drain
from aiservices_server.faces.envelope import Envelope
from aiservices_server.faces.grpc.auth import AuthenticationInterceptor
from aiservices_server.faces.grpc.handlers import Method, generic_handler
from aiservices_server.faces.grpc.outermost import OutermostInterceptor
from aiservices_server.faces.grpc.rpc import Reply, Rpc
from aiservices_server.logs import JsonFormatter
from aiservices_server.metrics import Metrics
from aiservices_server.ratelimit import Decision, RateLimit
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_caller
from tests.support.responsive import responsive_during
from tests.support.servers import ServerThread, make_settings

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {"prompt_template_json": '{"messages": [{"role": "user", "content": "Hi {{name}}"}]}'}
SERVICE = "aiservices.v1.ToolService"
# In every exception the test provokes; must never reach a caller or a log line.
SECRET = "secret-detail-7f3a"


class BrokenStore:
    """A rate-limit store failing in a way the code never planned for (a driver bug, say)."""

    async def acquire(self, key: str, limit: RateLimit) -> Decision:
        raise RuntimeError(f"store exploded on {key}: {SECRET}")

    async def refund(self, key: str, limit: RateLimit) -> None:
        raise RuntimeError(SECRET)

    async def close(self) -> None:
        return None


@pytest.fixture
def broken_store_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    settings = make_settings(upstream.url)
    thread = ServerThread(settings)
    thread.server = AiServicesServer(settings, limiter=BrokenStore())
    with thread:
        yield thread


def wait_for(records: Callable[[], list[logging.LogRecord]], count: int) -> list[logging.LogRecord]:
    """`records()` once it holds `count`: the server logs a call just after answering it."""
    deadline = time.monotonic() + 5
    while len(found := records()) < count and time.monotonic() < deadline:
        time.sleep(0.005)  # polling a condition, with a deadline
    return found


def handled(metrics: Metrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = JsonFormatter()
    return caplog.text + "\n".join(formatter.format(record) for record in caplog.records)


def test_a_failing_rate_limit_store_is_internal_with_a_support_id(
    broken_store_server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = broken_store_server
    with ToolClient(server.target, api_key=keys.editor, timeout=10) as client:
        with pytest.raises(ToolServiceError) as caught:
            responsive_during(server, lambda: client.call_tool(TOOL, ARGUMENTS))
        # Calls the limiter has no say in still work.
        assert client.status().enabled

    refused = caught.value
    assert refused.code is grpc.StatusCode.INTERNAL
    assert (refused.reason, refused.domain) == ("INTERNAL", "aiservices")
    support_id = refused.error_metadata["support_id"]
    assert len(support_id) >= 16
    assert support_id in refused.message
    assert SECRET not in str(refused) and "RuntimeError" not in refused.message

    (error,) = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert getattr(error, "support_id", None) == support_id
    assert getattr(error, "error", None) == "RuntimeError"
    assert __file__.rsplit("/", 1)[-1] in str(getattr(error, "at", ""))

    access = wait_for(lambda: [r for r in caplog.records if r.name == "aiservices.access"], 2)
    call = [r for r in access if getattr(r, "method", "").endswith("/CallTool")]
    assert [getattr(r, "code", None) for r in call] == ["INTERNAL"]
    assert getattr(call[0], "key_id", None) == "editor"
    assert getattr(call[0], "request_id", None) == getattr(error, "request_id", None)
    assert SECRET not in everything_logged(caplog)

    metrics = server.server.metrics
    assert handled(metrics, "CallTool", "INTERNAL") == 1
    assert handled(metrics, "CallTool", "UNKNOWN") == 0


# --- a parser or serializer that fails --------------------------------------------------------


class Unserializable:
    """A response whose serializer fails in a way nobody planned for."""

    def SerializeToString(self) -> bytes:
        raise TypeError(f"cannot serialize: {SECRET}")


def parser_raising(error: Exception) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        raise error

    return parse


async def get_status(request: Any, rpc: Rpc) -> Reply:
    return Reply(pb.GetStatusResponse(enabled=True))


async def unserializable_status(request: Any, rpc: Rpc) -> Reply:
    return Reply(cast(Message, Unserializable()))


CASES: dict[str, tuple[Method, grpc.StatusCode]] = {
    "a response that does not serialize": (
        Method(pb.GetStatusRequest.FromString, unserializable_status),
        grpc.StatusCode.INTERNAL,
    ),
    "a parser failing unexpectedly": (
        Method(parser_raising(TypeError(SECRET)), get_status),
        grpc.StatusCode.INTERNAL,
    ),
    "request bytes that do not parse": (
        Method(parser_raising(DecodeError(SECRET)), get_status),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


class _Seen(logging.Handler):
    """Sets `event` when a record arrives."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self._event = event

    def emit(self, record: logging.LogRecord) -> None:
        self._event.set()


@pytest.mark.parametrize("case", list(CASES))
async def test_a_failing_parser_or_serializer_never_answers_unknown(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The gRPC face's interceptors around a method whose request parser or response
    serializer fails: a real grpc server on loopback, called by a real client."""
    caplog.set_level(logging.INFO)
    method, expected = CASES[case]
    metrics = Metrics()
    authentication = AuthenticationInterceptor(Authenticator(None, metrics))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            generic_handler(
                SERVICE,
                {"GetStatus": method},
                OutermostInterceptor(Envelope(metrics, Drain())),
                [authentication],
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    access_logged = asyncio.Event()
    seen = _Seen(access_logged)
    access_log = logging.getLogger("aiservices.access")
    access_log.addHandler(seen)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ToolServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetStatus(pb.GetStatusRequest(), timeout=5)
        # The caller can have its status before the server has written the access line.
        await asyncio.wait_for(access_logged.wait(), 5)
    finally:
        access_log.removeHandler(seen)
        await server.stop(0)

    refused = caught.value
    assert refused.code() is expected
    assert SECRET not in (refused.details() or "")
    status = rpc_status.from_call(refused)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "aiservices"
    if expected is grpc.StatusCode.INTERNAL:
        assert info.metadata["support_id"] in (refused.details() or "")
        (error,) = [r for r in caplog.records if r.getMessage() == "unexpected error"]
        assert getattr(error, "support_id", None) == info.metadata["support_id"]
    (access,) = [r for r in caplog.records if r.name == "aiservices.access"]
    assert getattr(access, "code", None) == expected.name
    assert handled(metrics, "GetStatus", expected.name) == 1
    assert SECRET not in everything_logged(caplog)


# --- the same over MCP ----------------------------------------------------------------------------


async def test_a_failing_rate_limit_store_over_mcp_is_an_internal_error_with_a_support_id(
    upstream: StandinUpstream, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(upstream.url, mcp_address="127.0.0.1:0")
    thread = ServerThread(settings)
    thread.server = AiServicesServer(settings, limiter=BrokenStore())
    await asyncio.to_thread(thread.start)
    try:
        async with mcp_caller(thread, keys.editor) as caller:
            with pytest.raises(MCPError) as caught:
                await caller.client.call_tool(TOOL, ARGUMENTS)
            # Calls the limiter has no say in still work.
            assert [tool.name for tool in (await caller.client.list_tools()).tools] == [TOOL]
    finally:
        await asyncio.to_thread(thread.stop)

    refused = caught.value
    assert refused.code == INTERNAL_ERROR
    assert isinstance(refused.data, dict) and refused.data["reason"] == "INTERNAL"
    support_id = refused.data["support_id"]
    assert support_id in refused.message
    assert SECRET not in str(refused) and "RuntimeError" not in refused.message
    (error,) = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert getattr(error, "support_id", None) == support_id
    call = [r for r in caplog.records if getattr(r, "method", "") == "tools/call"]
    assert [(getattr(r, "code", None), getattr(r, "transport", None)) for r in call] == [
        ("INTERNAL", "mcp")
    ]
    assert SECRET not in everything_logged(caplog)
