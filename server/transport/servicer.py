"""aiservices.v1.ToolService over grpc.aio: protobuf in, DTOs to the dispatcher, protobuf out.

Every domain error becomes a gRPC status here; anything unexpected becomes INTERNAL with a
support id that is also logged, and nothing of the exception reaches the caller.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeAlias, TypeVar

import grpc
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc

from server.errors import DeadlineExceeded, ServiceError
from server.metrics import Metrics
from server.service.dispatch import MAX_NAME_SHOWN, ToolDispatcher
from server.tools.base import (
    CallContext,
    ToolDefinition,
    ToolErrorCode,
    ToolFailure,
    ToolResult,
)
from server.transport.convert import call_response, dict_from, tool_message
from server.transport.state import current_call
from server.transport.status import abort, report_unexpected

Request = TypeVar("Request")
Response = TypeVar("Response")
Context: TypeAlias = grpc.aio.ServicerContext
Method = Callable[[Any, Request, Context], Awaitable[Response]]

# A tool timeout this close to the caller's deadline is the deadline passing.
_DEADLINE_SLACK = 0.05


def guarded(method: Method[Request, Response]) -> Method[Request, Response]:
    @wraps(method)
    async def run(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except ServiceError as error:
            state = current_call()
            state.refusing(error)
            await abort(context, error, state.trailers)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, report_unexpected(exc), current_call().trailers)

    return run


# W3C trace context: version ff is invalid, and so are all-zero trace and parent ids.
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


class ToolServicer(pb_grpc.ToolServiceServicer):
    def __init__(
        self,
        dispatcher: ToolDispatcher,
        *,
        metrics: Metrics | None = None,
        log_payloads: bool = False,
        max_reply_bytes: int | None = None,
    ) -> None:
        """`max_reply_bytes`: the server's send limit (grpc.max_send_message_length)."""
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._log_payloads = log_payloads
        self._max_reply_bytes = max_reply_bytes
        # Built once: GetStatus is on every caller's hot path, and its answer depends only on
        # the caller's permissions (a handful of distinct sets, one per kind of key).
        self._messages: dict[str, pb.Tool] = {}
        self._status_by_permissions: dict[frozenset[str], pb.GetStatusResponse] = {}

    def _tool_messages(self, definitions: list[ToolDefinition]) -> list[pb.Tool]:
        messages = []
        for definition in definitions:
            message = self._messages.get(definition.name)
            if message is None:
                message = self._messages[definition.name] = tool_message(definition)
            messages.append(message)
        return messages

    @guarded
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        principal = current_call().principal
        response = self._status_by_permissions.get(principal.permissions)
        if response is None:
            tools = self._dispatcher.visible_tools(principal)
            response = pb.GetStatusResponse(
                enabled=self._dispatcher.enabled, tools=self._tool_messages(tools)
            )
            self._status_by_permissions[principal.permissions] = response
        return response

    @guarded
    async def ListTools(
        self, request: pb.ListToolsRequest, context: Context
    ) -> pb.ListToolsResponse:
        page = self._dispatcher.list_tools(
            current_call().principal, request.cursor, request.page_size
        )
        return pb.ListToolsResponse(
            tools=self._tool_messages(page.tools), next_cursor=page.next_cursor
        )

    @guarded
    async def CallTool(self, request: pb.CallToolRequest, context: Context) -> pb.CallToolResponse:
        state = current_call()
        state.tool = request.name[:MAX_NAME_SHOWN]
        remaining = context.time_remaining()
        traceparent = state.metadata.get("traceparent")
        if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
            traceparent = None  # malformed: do not forward it
        call = CallContext(
            principal=state.principal,
            request_id=state.request_id,
            deadline=None if remaining is None else time.monotonic() + remaining,
            traceparent=traceparent,
        )
        arguments = dict_from(request.arguments)
        if self._log_payloads:
            state.payload = {"arguments": arguments}
        result = await self._dispatcher.call(request.name, arguments, call)
        if (
            result.error is not None
            and result.error.code is ToolErrorCode.UPSTREAM_TIMEOUT
            and call.deadline is not None
            and (call.time_left() or 0.0) <= _DEADLINE_SLACK
        ):
            raise DeadlineExceeded("the call's deadline passed before the upstream answered")
        response = call_response(result, state.request_id)
        limit = self._max_reply_bytes
        if limit is not None and (size := response.ByteSize()) > limit:
            # grpc would refuse to send it, and the caller would see RESOURCE_EXHAUSTED while
            # the log and metrics said OK: answer with what can be sent, and record that.
            result = ToolResult.failure(
                ToolFailure(
                    ToolErrorCode.UPSTREAM_ERROR,
                    f"the tool's result is larger than this server may send ({size} bytes, "
                    f"limit {limit})",
                    trace_id=result.trace_id,
                )
            )
            response = call_response(result, state.request_id)
        state.trace_id = result.trace_id
        state.tool_outcome = result.error.code.value if result.error else "OK"
        if self._metrics is not None:
            self._metrics.tool_call(request.name, state.tool_outcome, state.principal.key_id)
        if state.payload is not None:
            state.payload["result"] = result.structured or result.text
        return response
